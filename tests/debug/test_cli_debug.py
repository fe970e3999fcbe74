"""`splice debug`, `splice bisect` and `splice inspect --calib` end to end on stories260K, and
their bad-input contract (one line on stderr, exit code 2)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.paths import STORIES, TINYSTORIES, needs_stories
from tests.reliability.forkserver import run_splice

pytestmark = needs_stories


def splice(*args: str) -> subprocess.CompletedProcess:
    """`python -m splice ARGS` as a forked child of the suite's warm server (imports done)."""
    return run_splice(*args, timeout=300)


def test_debug_writes_the_report_with_every_section(tmp_path: Path):
    out = tmp_path / "debug"
    r = splice("debug", str(STORIES), "--recipe", "fold_norms", "--out", str(out),
               "--calib", str(TINYSTORIES), "--tokens", "64", "--check-lowering")
    assert r.returncode == 0, r.stderr
    assert "fold_norms" in r.stdout and "ok" in r.stdout
    assert "lowering check: all" in r.stdout and "report:" in r.stdout
    html = (out / "report.html").read_text(encoding="utf-8")
    for needle in ('<table id="passes">', "Activation statistics", "block influence",
                   "every IR value agrees", "layer 0 expanded", "64 tokens from the middle",
                   "256 calibration tokens"):
        assert needle in html, needle
    data = json.loads((out / "report.json").read_text())
    assert len(data["activation_stats"]["input model"]["layers"]) == 5
    assert data["passes"][0]["numeric"]["float64_max_rel_diff"] <= 1e-9


def test_bisect_reports_a_clean_recipe_with_exit_3(tmp_path: Path, capsys):
    from splice.cli import main

    # in process (the same main() as `python -m splice`), to spare a second interpreter start
    out = tmp_path / "bisect"
    code = main(["bisect", str(STORIES), "--recipe", "fold_norms", "--metric", "kl",
                 "--tolerance", "1e-6", "--tokens", "32", "--out", str(out)])
    assert code == 3
    assert "no pass crosses the tolerance kl > 1e-06" in capsys.readouterr().out
    assert (out / "report.html").is_file()


def test_bisect_finds_the_lossy_pass_and_its_layer(tmp_path: Path):
    from splice.passes.infra.registry import registered

    if "quantize_weights" not in registered():
        pytest.skip("no quantize_weights pass registered in this checkout")
    recipe = tmp_path / "q.toml"
    recipe.write_text('[[pass]]\nname = "fold_norms"\n\n[[pass]]\nname = "quantize_weights"\n'
                      'method = "rtn"\nbits = 4\ngroup_size = 0\n')
    out = tmp_path / "bisect"
    r = splice("bisect", str(STORIES), "--recipe", str(recipe), "--metric", "kl",
               "--tolerance", "0.001", "--calib", str(TINYSTORIES), "--tokens", "64",
               "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "first bad pass: quantize_weights (step 1), first bad layer: " in r.stdout
    data = json.loads((out / "report.json").read_text())
    assert data["bisect"]["culprit_name"] == "quantize_weights"
    assert data["bisect"]["layer"] == data["graph"]["expanded_layer"]
    assert [p["name"] for p in data["passes"]] == ["fold_norms", "quantize_weights"]


def test_inspect_calib_prints_the_statistics():
    r = splice("inspect", str(STORIES), "--calib", str(TINYSTORIES), "--tokens", "256")
    assert r.returncode == 0, r.stderr
    assert "activation statistics over 256 tokens" in r.stdout
    rows = [ln.split() for ln in r.stdout.splitlines()]
    layer_rows = [ln for ln in rows if len(ln) == 5 and ln[0].isdigit() and "/" in ln[3]]
    assert [int(ln[0]) for ln in layer_rows] == [0, 1, 2, 3, 4]


def _bad(args: list[str], needle: str) -> None:
    r = splice(*args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[-1], r.stderr


def test_bad_inputs_exit_2(tmp_path: Path):
    _bad(["bisect", str(STORIES), "--recipe", "fold_norms", "--metric", "kl", "--tolerance",
          "-1", "--out", str(tmp_path / "b")], "tolerance must be a finite number >= 0")
    _bad(["debug", str(STORIES), "--recipe", "fold_norms", "--out", str(tmp_path / "d"),
          "--calib", str(tmp_path / "missing.txt")], "missing.txt not found")
    assert not (tmp_path / "d").exists()
