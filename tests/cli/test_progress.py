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
