"""The TVM benchmark section runs (quick mode, stories260K) through benchmarks.run: the table has
every engine, compile and tuning time, and the logits agree with the interpreter. A benchmark is
not a test: nothing here looks at speed beyond it being measured."""

from __future__ import annotations

import json

import pytest

from benchmarks.run import main
from tests.paths import needs_stories

pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install 'splice[tvm]')")


@needs_stories
def test_tvm_section_quick(tmp_path):
    out, raw = tmp_path / "B.md", tmp_path / "b.json"
    assert main(["--quick", "--only", "tvm_bench", "--out", str(out), "--json", str(raw)]) == 0
    text = out.read_text()
    assert "TVM backend: stories260K" in text and "tuning s" in text
    figures = json.loads(raw.read_text())["tvm_bench"]
    engines = ("ONNX float32", "TVM float32", "ONNX int4", "TVM int4")
    assert list(figures["speed"]) == list(engines)
    for engine in engines:
        assert figures["speed"][engine]["decode_tok_s"] > 0
        assert figures["speed"][engine]["prefill_tok_s"] > 0
    diff = figures["logit_diff"]
    # TVM against the interpreter of the same graph: float32 to rounding, int4 to its semantics
    for engine in ("TVM float32", "TVM int4"):
        assert diff[engine]["max_abs"] <= 1e-3 * max(1.0, diff[engine]["max_abs_logit"])
        assert diff[engine]["top1_agreement"] == 1.0
    assert figures["compile"]["TVM int4"]["tuning_s"] == 0.0
