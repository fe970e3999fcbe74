"""Arguments the bad-input corpus cannot write as a command line (issue 26): the Python API given
None where a model, a text or a prompt belongs, and an output in a read-only filesystem, which
root (who ignores permission bits, so test_arguments' chmod test skips) meets on a read-only
mount. Each refusal is an InputError on one line, and nothing is left beside the output."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest

import splice
from splice.cli import main
from splice.errors import InputError
from splice.evaluate import perplexity_of


def _one_line(e: pytest.ExceptionInfo, *needles: str) -> None:
    text = str(e.value)
    assert "\n" not in text.strip(), text
    for needle in needles:
        assert needle in text, text


@pytest.fixture(scope="module")
def art(bases):
    return splice.load(bases["artefact"])


@pytest.mark.parametrize("call", ["generate", "stream"])
def test_a_prompt_of_none_is_named_by_its_type(art, call):
    with pytest.raises(InputError) as e:
        result = getattr(art, call)(None, max_new_tokens=2)
        list(result)
    _one_line(e, "prompt", "got NoneType")


def test_perplexity_of_none(bases, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("Once upon a time there was a cat.\n")
    with pytest.raises(InputError) as e:
        perplexity_of(None, text)
    _one_line(e, "model is missing (None)", "accepted")
    with pytest.raises(InputError) as e:
        perplexity_of(bases["artefact"], None)
    _one_line(e, "text file is missing (None)")


@contextlib.contextmanager
def _read_only_mount(path: Path):
    """A read-only tmpfs at `path`, or a skip where this process may not mount one."""
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"no read-only mount here: {r.stderr.strip() or r.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root (test_arguments covers a "
                                              "read-only directory for other users)")
def test_an_output_on_a_read_only_filesystem_is_refused_before_work(bases, tmp_path, capsys):
    with _read_only_mount(tmp_path / "ro") as ro:
        # a model that does not exist: the refusal must come from --out, before any import
        assert main(["compile", str(tmp_path / "no-such-model.bin"), "--out", str(ro / "art"),
                     "--recipe", "fold_norms"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "cannot write" in err and "Read-only" in err, err
        for command in (["debug", str(bases["stories"])], ["bisect", str(bases["stories"]),
                        "--recipe", "none", "--metric", "kl", "--tolerance", "1"]):
            assert main([*command, "--out", str(ro / "report")]) == 2
            assert "Read-only" in capsys.readouterr().err
        with pytest.raises(InputError) as e:
            splice.compile(bases["stories"], "fold_norms", out=ro / "art")
        _one_line(e, "cannot write", "Read-only")
        assert list(ro.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ro"]
