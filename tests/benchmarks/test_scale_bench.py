"""The scale benchmark runs in quick mode (a small random LLaMA written to disk, compiled layer by
layer and in memory in child processes); speed is not checked, only that the figures exist and
the two compiles wrote the same ONNX weights."""

from __future__ import annotations

import json

from benchmarks.run import main


def test_scale_quick(tmp_path):
    out, raw = tmp_path / "B.md", tmp_path / "b.json"
    assert main(["--quick", "--only", "scale", "--out", str(out), "--json", str(raw)]) == 0
    assert "Scale: random LLaMA, 4 layers" in out.read_text()
    figures = json.loads(raw.read_text())["scale"]
    assert figures["onnx_weights_equal"] is True
    assert figures["prune_onnx_weights_equal"] is True  # whole-model passes from disk
    for run in ("layerwise_rtn", "in_memory_rtn"):
        assert figures[run]["peak_rss_gb"] > 0 and figures[run]["artefact_gb"] > 0
