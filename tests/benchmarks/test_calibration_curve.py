"""The calibration-size curve runs (quick mode: stories260K compiled with the balanced preset at
two calibration sizes): each row has its compile's wall and CPU seconds, the load it ran under
and a perplexity; nothing here judges the figures (a benchmark is not a test)."""

from __future__ import annotations

import json

from benchmarks.calibration_curve import SCREEN, main
from tests.paths import needs_stories


@needs_stories
def test_calibration_curve_quick(tmp_path, capsys):
    out = tmp_path / "curve.json"
    assert main(["--quick", "--sizes", "1", "2", "--threads", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["preset"] == "balanced" and [r["samples"] for r in res["rows"]] == [1, 2]
    for r in res["rows"]:
        assert r["compile_s"] > 0 and r["compile_cpu_s"] > 0 and r["load_avg_1min"] >= 0
        assert r["passes_s"]["quantize_weights"] >= 0 and r["ppl"] > 1
        # quick mode scores 512 tokens: fewer than the screening count, so both figures agree
        assert r[f"ppl_first_{SCREEN}"] == r["ppl"]
    table = capsys.readouterr().out
    assert "| compile CPU s |" in table and table.count("\n| ") >= 2
