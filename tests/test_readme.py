"""The README is the user's guide: the commands and code in it run as written, from any directory.

Every ```sh block is run line by line in a fresh directory outside the checkout, with `splice` on
the PATH and the two text files the README's examples name (`valid.txt`, `test.txt`, taken from
../shared's WikiText-2); then every ```python block runs there in that order. A command that exits
non-zero fails the test with its output.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.paths import WIKITEXT_TEST, WIKITEXT_VALID, needs_smollm2

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(encoding="utf-8"), re.M | re.S)


def commands() -> list[str]:
    return [line for block in blocks("sh") for line in block.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_readme_has_examples_for_every_command():
    """The user's guide shows each subcommand; the parser finds the blocks it runs."""
    from splice.cli import build_parser

    shown = {c.split()[1] for c in commands() if c.startswith("splice ")}
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert shown, "no ```sh block found in the README"
    missing = set(sub.choices) - shown - {"debug", "bisect"}  # long-running: in the table, not run here
    assert not missing, f"README examples do not run: {sorted(missing)}"
    assert blocks("python"), "no ```python block found in the README"


@pytest.mark.slow
@needs_smollm2
def test_readme_commands_run_as_written(tmp_path):
    if not (WIKITEXT_VALID.is_file() and WIKITEXT_TEST.is_file()):
        pytest.skip("../shared/data is absent")
    (tmp_path / "valid.txt").write_text(WIKITEXT_VALID.read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "test.txt").write_text(WIKITEXT_TEST.read_text(encoding="utf-8"), encoding="utf-8")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for line in commands():
        done = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, f"`{line}` exited {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
    for code in blocks("python"):
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"README python block failed:\n{code}\n{done.stderr[-3000:]}"
