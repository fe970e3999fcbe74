"""Shared fixtures of the reliability suite (issue 10) and the summary it prints.

The good inputs every bad one is made from are built once per session: stories260K as it is, a
tiny random Hugging Face llama saved with save_pretrained, the same model as a GGUF file, and an
artefact compiled from stories260K. The fork server (forkserver.py) runs the CLI cases.

`--fuzz-examples N` sets how many inputs each fuzz target tries (`make fuzz`); without it the
targets run a fixed, derandomised 150 each, so CI sees the same inputs every time. The option is
read where this conftest is an initial one: give tests/reliability (or a file in it) on the
command line, as `make fuzz` does.

At the end the suite reports what it tried: bad inputs by category and surface, kill points,
fuzz inputs per target (pytest's terminal summary).
"""

from __future__ import annotations

import shutil
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from tests.paths import STORIES

TRIED: dict[str, Counter] = defaultdict(Counter)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fuzz-examples", type=int, default=None,
                     help="inputs per fuzz target in tests/reliability (default: 150, "
                          "derandomised)")


def pytest_terminal_summary(terminalreporter) -> None:
    if not TRIED:
        return
    terminalreporter.section("reliability: inputs tried")
    for what, counts in sorted(TRIED.items()):
        detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        terminalreporter.write_line(f"{what}: {sum(counts.values())} ({detail})")


@pytest.fixture(scope="session")
def fuzz_examples(request) -> tuple[int, bool]:
    """(examples per target, derandomize): fixed and derandomised unless --fuzz-examples."""
    n = request.config.getoption("--fuzz-examples", default=None)
    return (150, True) if n is None else (n, False)


@pytest.fixture(scope="session")
def forkserver():
    from tests.reliability.forkserver import shared

    return shared()  # the suite's one server (closed at exit), which the CLI tests use too


@pytest.fixture(scope="session")
def bases(tmp_path_factory) -> dict[str, Path]:
    """The good inputs: {"stories", "hf", "gguf", "artefact"}."""
    if not STORIES.is_file():
        pytest.skip(f"stories260K not found at {STORIES}")
    import splice
    from tests.reliability.inputs import write_gguf_file, write_hf_dir

    root = tmp_path_factory.mktemp("bases")
    # a copy with its tokenizer, so a test that writes beside it cannot touch ../shared
    stories = root / "stories" / STORIES.name
    stories.parent.mkdir()
    shutil.copyfile(STORIES, stories)
    shutil.copyfile(STORIES.with_name("tok512.bin"), stories.with_name("tok512.bin"))
    return {
        "stories": stories,
        "hf": write_hf_dir(root / "hf"),
        "gguf": write_gguf_file(root / "tiny.gguf"),
        "artefact": splice.compile(stories, "fold_norms", "cpu", root / "artefact", load=False),
    }


@pytest.fixture(scope="session")
def bad_inputs(bases, tmp_path_factory) -> dict[str, Path]:
    from tests.reliability.inputs import build_inputs

    return {**bases, **build_inputs(tmp_path_factory.mktemp("bad"), bases)}


def tree_digest(path: Path) -> dict[str, str]:
    """Every entry under `path` (or `path` itself) -> sha256 of its bytes, its link target or
    "dir"; {} when absent. Compared before and after a command to prove it wrote nothing."""
    import hashlib
    import os

    if not os.path.lexists(path):
        return {}
    entries = [path] if not path.is_dir() or path.is_symlink() else [path, *sorted(path.rglob("*"))]
    out = {}
    for p in entries:
        key = str(p.relative_to(path.parent))
        if p.is_symlink():
            out[key] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[key] = "dir"
        else:
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out
