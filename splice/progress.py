"""splice's own progress display for the CLI: one line on stderr naming the step under way (import,
each pass, export, loading), how many of the expected steps are done, and the time so far.

It is shown only on a terminal and never with -q: a log file or a pipe gets nothing from it. The
line is refreshed twice a second by a daemon thread, so a step that takes a minute shows its clock
moving rather than a frozen line. Libraries' own bars (the Hugging Face hub's, transformers' GGUF
reader's) are silenced, so this is the one display. tqdm draws it (a dependency already).
"""

from __future__ import annotations

import shutil
import threading
import time
from typing import Any

from splice.passes.infra.instruments import Instrument, _pass_name


class Progress:
    """`stage(name)` starts the next step; `close()` ends the line. With `enabled` False every
    call does nothing, so callers need no branches."""

    def __init__(self, what: str, total: int | None = None, *, enabled: bool = True,
                 file: Any = None):
        self.what, self.enabled = what, enabled
        self._bar: Any = None
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        if not enabled:
            return
        from tqdm import tqdm

        # disable=False: shown even where tqdm's defaults (TQDM_DISABLE) turn library bars off
        # the terminal's size, 80 x 24 where it reports none (a fresh pseudo-terminal says 0 x 0,
        # and tqdm would then hide its bar as below the screen's last row)
        size = shutil.get_terminal_size((80, 24))
        self._bar = tqdm(total=total, desc=what, disable=False, leave=False, file=file,
                         ncols=size.columns, nrows=size.lines,
                         bar_format="{desc} [{n_fmt}/{total_fmt} steps, {elapsed}]")
        self._thread = threading.Thread(target=self._tick, daemon=True)
        self._thread.start()

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            bar = self._bar
            if bar is not None:
                bar.refresh()

    def stage(self, name: str) -> None:
        if self._bar is None:
            return
        if self._bar.desc.rstrip(": ") != self.what:   # the previous step is done
            self._bar.update(1)
        if self._bar.total is not None and self._bar.n >= self._bar.total:
            self._bar.total = self._bar.n + 1          # more steps than expected (layerwise)
        self._bar.set_description_str(f"{self.what}: {name}", refresh=True)

    def close(self) -> None:
        self._stop.set()
        bar, self._bar = self._bar, None
        if bar is not None:
            bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class StageInstrument(Instrument):
    """Reports each pass to a `progress(name)` callback as it starts."""

    def __init__(self, progress):
        self.progress = progress

    def before_pass(self, module, pass_, ctx) -> None:
        self.progress(f"pass {_pass_name(pass_)}")
