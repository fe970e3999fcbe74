"""The CLI's own surface (issue 26): global flags anywhere, help with defaults and exit codes,
the compile summary, refusals before any output, and the Python API's refusals of None and of
text that is not Unicode. The bad-input corpus (tests/reliability) covers every argument's bad
values; these are the cases that are not one bad value of one argument."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import splice
from splice.cli import _print_report, _summary, build_parser, main
from splice.errors import InputError
from tests.paths import STORIES, TINYSTORIES, needs_stories


def test_global_flags_are_accepted_before_and_after_the_command():
    p = build_parser()
    for argv in (["--debug", "-v", "run", "a", "b"], ["run", "a", "b", "--debug", "-v"],
                 ["run", "--debug", "a", "-v", "b"]):
        a = p.parse_args(argv)
        assert a.debug and a.verbose and not a.quiet, argv
    assert not p.parse_args(["run", "a", "b"]).debug
    assert p.parse_args(["eval", "m", "--text", "t", "-q"]).quiet


@needs_stories
def test_debug_after_the_command_shows_the_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "splice", "compile", str(STORIES), "--recipe",
                        "no_such_recipe", "--out", str(tmp_path / "o"), "--debug"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" in r.stderr and "no_such_recipe" in r.stderr


@needs_stories
def test_verbose_logs_splices_steps_not_onnx_irs_stack_dumps(tmp_path):
    """The NPU lowering runs onnx_ir's graph passes, which log at INFO with a stack each."""
    if importlib.util.find_spec("onnxruntime_qnn") is None:
        pytest.skip("the npu extra (onnxruntime-qnn) is not installed")
    r = subprocess.run([sys.executable, "-m", "splice", "compile", str(STORIES), "--target",
                        "npu", "--calib", str(TINYSTORIES), "--out", str(tmp_path / "o"), "-v"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "INFO splice.api: compiled" in r.stderr
    assert "onnx_ir" not in r.stderr and "Stack (most recent call last)" not in r.stderr


def test_help_shows_defaults_exit_codes_and_the_default_report_directory(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 64)" in text and "(default: 1.0)" in text and "0 = greedy" in text
    with pytest.raises(SystemExit):
        main(["bisect", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "exit codes: 0" in text and "3 no pass crosses it" in text
    assert "(default: splice-bisect)" in text


def test_summary_shows_values_not_lengths(capsys):
    assert _summary({"float": 1000, "quantized": 250}) == "{float 1000, quantized 250}"
    assert _summary([1, 2.5]) == "[1, 2.5]" and _summary(list(range(20))) == "(20 items)"
    _print_report({"passes": [{"name": "quantize_weights", "modified": True, "time_s": 0.5,
                               "report": {"bytes": {"float": 1000, "quantized": 250}}}]})
    out = capsys.readouterr().out
    assert "bytes {float 1000, quantized 250}" in out
    assert "numeric check" not in out      # no pass was checked: no column of "-"
    _print_report({"passes": [{"name": "fold_norms", "modified": True, "time_s": 0.1,
                               "numeric": {"exact": True, "max_rel_diff": 1e-12}}]})
    assert "numeric check" in capsys.readouterr().out


@needs_stories
def test_refusals_leave_no_file_anywhere(tmp_path, capsys):
    """--out /dev/null: refused before any work, and no lock file is left in /dev (the writer's
    lock needs no file); a refusal at the end of a compile leaves the parent as it was."""
    before = set(os.listdir("/dev"))
    assert main(["compile", str(STORIES), "--recipe", "fold_norms", "--out", "/dev/null"]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert set(os.listdir("/dev")) == before
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    assert main(["compile", str(STORIES), "--recipe", "fold_norms", "--out", str(foreign)]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_read_only_directory_is_refused_before_work(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["compile", "no-such-model.bin", "--out", str(ro / "art")]) == 2
        assert "cannot write" in capsys.readouterr().err
    finally:
        ro.chmod(0o755)


def test_run_refuses_settings_before_echoing_the_prompt(tmp_path, capsys):
    assert main(["run", str(tmp_path), "Once upon", "--temperature", "inf"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "temperature" in captured.err


def test_api_refuses_none_and_text_that_is_not_unicode(tmp_path):
    with pytest.raises(InputError, match="out"):
        splice.compile(STORIES, "fold_norms", out=None)
    with pytest.raises(InputError, match="model is missing"):
        splice.compile(None, out=tmp_path / "a")
    with pytest.raises(InputError, match="artefact path"):
        splice.load(None)
    with pytest.raises(InputError, match="seed"):
        splice.compile(STORIES, "fold_norms", out=tmp_path / "a", seed=-5)
    with pytest.raises(InputError, match="is a directory"):
        splice.compile(STORIES, "fold_norms", out=tmp_path / "a", calibration=tmp_path)
    assert list(tmp_path.iterdir()) == []
    from splice.runtime.tokenizer import checked_text

    with pytest.raises(InputError, match="not valid Unicode"):
        checked_text("Once \udcff upon")


@needs_stories
def test_an_unsupported_gguf_architecture_is_refused_before_transformers(tmp_path):
    from splice.frontend.hf import check_gguf_file
    from tests.reliability.inputs import _gguf_arch, write_gguf_file

    good = write_gguf_file(tmp_path / "tiny.gguf")
    assert check_gguf_file(good) == good
    bad = _gguf_arch(good, tmp_path / "bloom.gguf", b"bloom")
    with pytest.raises(InputError, match="general.architecture='bloom'.*supported: llama"):
        check_gguf_file(bad)
    assert Path(bad).stat().st_size == Path(good).stat().st_size


def test_transformers_gguf_bar_is_silenced(tmp_path):
    """transformers' own GGUF bar never reaches stderr: splice's display is the one (issue 26)."""
    from tests.reliability.inputs import write_gguf_file

    gguf = write_gguf_file(tmp_path / "tiny.gguf")
    r = subprocess.run([sys.executable, "-m", "splice", "inspect", str(gguf)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "GGUF tensors" not in r.stderr and "%|" not in r.stderr, r.stderr


@pytest.mark.parametrize("argv", [["compile", "m", "--out", "o", "--seed", "abc"], ["compile"],
                                  ["frob"], ["compile", "m", "--out", "o", "--backend", "z"],
                                  ["run", "a", "b", "--max-new-tokens", "1.5"]])
def test_parse_errors_are_one_line_exit_2(argv, capsys):
    """argparse's own errors (a value of the wrong type, a missing or unknown argument) keep the
    CLI's promise too: one line naming what was wrong, exit 2, nothing on stdout."""
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and out == ""
    assert err.count("\n") == 1 and "error:" in err and "--help" in err, err
