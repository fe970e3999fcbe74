"""The TVM bandwidth section runs (quick mode, stories260K) through benchmarks.run: a row with
its weight bytes, decode speed, the limit and the kernel limit, all measured. A benchmark is not a
test: nothing here looks at how fast anything is."""

from __future__ import annotations

import json

import pytest

from benchmarks.run import main
from tests.paths import needs_stories

pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install 'splice[tvm]')")


@needs_stories
def test_tvm_bandwidth_section_quick(tmp_path):
    out, raw = tmp_path / "B.md", tmp_path / "b.json"
    assert main(["--quick", "--only", "tvm_bandwidth", "--out", str(out), "--json",
                 str(raw)]) == 0
    assert "TVM decode against the bandwidth limit: stories260K" in out.read_text()
    figures = json.loads(raw.read_text())["tvm_bandwidth"]
    row = figures["rows"]["g32"]["1"]
    # the weights a step reads: every linear's codes and the int4 lm_head, not the int8 table
    assert 0.1e6 < row["weight_bytes"] < 0.5e6
    assert row["decode_tok_s"] > 0 and row["kernel_limit_tok_s"] > 0
    assert row["share"] == pytest.approx(row["decode_tok_s"] * row["weight_bytes"]
                                         / (figures["bandwidth_gb_s"]["1"] * 1e9))
