"""The debug report: a recipe run with every instrument on, written as one self-contained HTML file
(checked as text, and rendered by a headless Chromium when one is installed) and as JSON."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from splice.cli_debug import build_report
from splice.passes.infra.report import render
from splice.passes.infra.trace import debug_run, ir_diff
from splice.recipe import Recipe

from tests.debug.helpers import FalselyExactPass, five_layer_model, registered
from tests.passes.models import tiny_model

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.is_file(),
    reason="/usr/bin/chromium is absent (`make browser` installs Debian's chromium as root; the "
           "install failed or was not run)")


@pytest.fixture(scope="module")
def fold_report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("debug") / "report"
    module = tiny_model("llama", dtype=torch.float32)
    build_report(module, Recipe.named("fold_norms"), out, calib=None, tokens=16,
                 check_lowering=True, model_name="tiny llama")
    return out


def test_report_has_the_pass_table_and_every_section(fold_report: Path):
    text = (fold_report / "report.html").read_text(encoding="utf-8")
    table = re.search(r'<table id="passes">(.*?)</table>', text, re.S)
    assert table is not None
    assert "fold_norms" in table.group(1) and "exact" in table.group(1)
    assert "float64 max rel diff" in table.group(1)
    for needle in ("IR diff", "nodes by op", "Lowering check", "every IR value agrees",
                   "Graph after the run", '<svg class="graph"', 'class="legend"'):
        assert needle in text, needle
    data = json.loads((fold_report / "report.json").read_text())
    [p] = data["passes"]
    assert p["modified"] is True and p["numeric"]["exact"] is True
    assert p["numeric"]["float64_max_rel_diff"] <= 1e-9
    assert p["timing"]["peak_rss_mb"] > 0 and p["time_s"] >= 0
    assert p["before"]["ops"]["rms_norm"] == p["after"]["ops"]["rms_norm"] == 5
    assert "layers.0.attn_norm.weight" in p["weights_removed"]
    # the diff shows the folded norm losing its weight operand
    assert any(ln.startswith("-") and "attn_norm.0" in ln and "rms_norm(" in ln
               for ln in p["diff"]["lines"])
    assert data["graph"]["origins"]["fold_norms"] == 5
    assert data["lowering_check"]["ok"] is True
    assert (fold_report / "ir" / "000_input.txt").is_file()
    assert (fold_report / "ir" / "001_fold_norms.txt").is_file()


def test_report_is_self_contained(fold_report: Path):
    text = (fold_report / "report.html").read_text(encoding="utf-8")
    assert not re.search(r"https?://|//cdn|<link\b|@import|\bsrc\s*=", text, re.I)
    assert "<style>" in text and "<script>" in text


def test_long_diffs_are_cut_and_say_so():
    before = "\n".join(f"line {i}" for i in range(1000))
    after = "\n".join(f"line {i} changed" for i in range(1000))
    d = ir_diff(before, after, max_lines=50)
    assert d["truncated"] and len(d["lines"]) == 50 and d["total_lines"] > 2000
    assert d["added"] == d["removed"] == 1000


def test_a_pass_failing_its_exactness_claim_is_reported(tmp_path: Path):
    module = five_layer_model()
    with registered(FalselyExactPass):
        recipe = Recipe("bad", ("fold_norms", "test_falsely_exact", "fold_norms"))
        _, data = debug_run(module, recipe, tmp_path, batch=torch.randint(0, 64, (1, 12)))
    assert data["status"] == "failed"
    assert data["error"]["pass"] == "test_falsely_exact" and data["error"]["step"] == 1
    assert "claims to be exact" in data["error"]["message"]
    assert len(data["passes"]) == 2           # the run stopped at the failing pass
    assert data["passes"][1]["numeric"]["max_rel_diff"] > 1e-3
    html = render(data)
    assert "Stopped at pass test_falsely_exact" in html


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=120)


def _console(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]


@needs_chromium
def test_report_renders_in_headless_chromium(fold_report: Path, tmp_path: Path):
    url = (fold_report / "report.html").resolve().as_uri()
    shot = tmp_path / "shot.png"
    r = _chromium(f"--screenshot={shot}", "--window-size=1280,2000", url,
                  profile=tmp_path / "profile1")
    assert shot.is_file() and shot.stat().st_size > 10_000, r.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = _chromium("--enable-logging=stderr", "--v=0", "--dump-dom", url,
                  profile=tmp_path / "profile2")
    dom = r.stdout
    assert 'data-script="ran"' in dom           # the inline script ran to its last line
    table = re.search(r'<table id="passes">(.*?)</table>', dom, re.S)
    assert table is not None and "fold_norms" in table.group(1)
    assert "<svg" in dom
    assert _console(r.stderr) == [], _console(r.stderr)


@needs_chromium
def test_console_error_detection_works(tmp_path: Path):
    """The check above can fail: a page whose script throws shows up in Chromium's log."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><script>undefinedThing.call();</script>"
                    "</body></html>")
    r = _chromium("--enable-logging=stderr", "--v=0", "--dump-dom", page.resolve().as_uri(),
                  profile=tmp_path / "profile")
    assert any("Uncaught" in ln for ln in _console(r.stderr)), r.stderr[-2000:]

