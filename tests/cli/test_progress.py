"""splice's own progress display (splice/progress.py): one line naming each step, shown on a
terminal only, and nothing else on stderr: transformers' own bars stay silent."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
import time

from splice.progress import Progress
from tests.paths import STORIES, needs_stories


def test_stages_are_named_counted_and_the_line_cleared():
    out = io.StringIO()
    with Progress("splice compile", 3, file=out) as shown:
        for name in ("import", "pass fold_norms", "export (onnx)", "load"):
            shown.stage(name)
    text = out.getvalue()
    for name in ("splice compile: import", "pass fold_norms", "export (onnx)", "load"):
        assert name in text
    assert "[3/4 steps" in text          # a fourth step beyond the three expected is counted
    assert text.endswith("\r") or text.endswith("\x1b[A") or "\r" in text[-5:]


def test_disabled_does_nothing():
    out = io.StringIO()
    with Progress("x", 2, enabled=False, file=out) as shown:
        shown.stage("import")
    assert out.getvalue() == ""


def _compile(tmp_path, tty: bool, extra: tuple[str, ...] = ()) -> tuple[int, str]:
    argv = [sys.executable, "-m", "splice", "compile", str(STORIES), "--recipe", "fold_norms",
            "--out", str(tmp_path / f"art{tty}{len(extra)}"), *extra]
    if not tty:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        return r.returncode, r.stderr
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            data = os.read(master, 4096)
        except OSError:      # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=60), b"".join(chunks).decode("utf-8", "replace")


@needs_stories
def test_compile_shows_its_steps_on_a_terminal_only(tmp_path):
    rc, err = _compile(tmp_path, tty=True)
    assert rc == 0
    for name in ("splice compile: import", "pass fold_norms", "export (onnx)"):
        assert name in err, err
    rc, err = _compile(tmp_path, tty=True, extra=("-q",))
    assert rc == 0 and "splice compile" not in err
    rc, err = _compile(tmp_path, tty=False)
    assert rc == 0 and err == ""


class _Terminal(io.StringIO):
    """stderr as a terminal: what the display is shown on."""

    def isatty(self) -> bool:
        return True


@needs_stories
def test_debug_and_bisect_show_their_steps_on_a_terminal_only(tmp_path, monkeypatch):
    """In-process through main(), stderr replaced by a terminal and then by a plain stream; the
    bisection's w8 crosses a tolerance of 1e-12, so its layer search is shown too."""
    from splice.cli import main

    def run(command: str, stream: io.StringIO, out: str) -> int:
        argv = [command, str(STORIES), "--out", str(tmp_path / out)]
        argv += (["--recipe", "fold_norms"] if command == "debug" else
                 ["--recipe", "w8", "--metric", "kl", "--tolerance", "1e-12"])
        monkeypatch.setattr(sys, "stderr", stream)
        return main(argv)

    shown = _Terminal()
    assert run("debug", shown, "d1") == 0
    for name in ("splice debug: import", "pinned batch", "pass fold_norms", "report",
                 "steps"):
        assert name in shown.getvalue(), shown.getvalue()
    shown = _Terminal()
    assert run("bisect", shown, "b1") == 0
    for name in ("splice bisect: import", "reference logits", "pass quantize_weights",
                 "layer search: changes of layers <=", "report: pass quantize_weights"):
        assert name in shown.getvalue(), shown.getvalue()
    for command in ("debug", "bisect"):
        plain = io.StringIO()
        run(command, plain, f"{command}2")
        assert f"splice {command}" not in plain.getvalue()
