"""What the benchmark sections share: the folder their artefacts live in, and the command line
of a section run alone (`python -m benchmarks.NAME`)."""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def work_dir(work: str | Path | None) -> Iterator[Path]:
    """`work` (created if missing, kept after: a rerun reuses what it holds), or a temporary
    folder removed after."""
    if work is not None:
        path = Path(work)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


def section_main(prog: str, run: Callable[..., tuple[str, dict]],
                 argv: list[str] | None = None) -> None:
    """Run one section from the command line: --quick, --work DIR (keep the artefacts there),
    --rounds N, --json FILE (the raw figures); prints the section's markdown."""
    ap = argparse.ArgumentParser(prog=f"python -m {prog}")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--work", default=None, help="keep the built artefacts here and reuse them")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    text, figures = run(quick=a.quick, work=a.work, rounds=a.rounds)
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=2, default=float))
    print(text)
