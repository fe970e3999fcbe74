"""The ONNX speed benchmark runs (quick mode: a tiny random Llama, every engine and row of the full
protocol, seconds): a benchmark is not a test, so nothing here looks at speed; it checks that each
row is produced with positive figures and that both runtimes agree on the greedy tokens."""

from __future__ import annotations

import json

import pytest
from benchmarks.run import main

pytest.importorskip("onnxruntime_genai")


def test_onnx_speed_quick(tmp_path):
    out, raw = tmp_path / "B.md", tmp_path / "b.json"
    assert main(["--quick", "--only", "onnx_speed", "--out", str(out), "--json", str(raw)]) == 0
    text = out.read_text()
    assert "ONNX Runtime speed: tiny random Llama" in text and "builder int4" in text
    figures = json.loads(raw.read_text())["onnx_speed"]
    speed = figures["speed"]
    assert len(speed) == 21
    for name, row in speed.items():
        assert row["decode_tok_s"] > 0 and row["prefill_tok_s"] > 0 and row["peak_rss_mb"] > 0, name
        assert row["size_mb"] > 0, name
    assert figures["same_tokens_genai_vs_splice"] is True
    ahead = speed["splice ONNX int4 g128, prompt lookup (up to 8 drafts)"]
    assert ahead["decode_steps"] + ahead["accepted"] == figures["new_tokens"] - 1
    assert "Pruned by 4 layers: decode" in text and "with R1 and R2 only" in text
    rated = [name for name, row in speed.items() if "ppl" in row]
    assert len(rated) == 13 and all(1 < speed[n]["ppl"] < 1e4 for n in rated)  # vocabulary 512
    assert "builder int4 (onnxruntime-genai)" in rated
    assert all(speed[n]["kernel_limit_tok_s"] > 0 for n in rated) and "kernel limit" in text
    rounds = figures["rounds"]
    assert speed["builder int4 (onnxruntime-genai)"]["vs_builder_int4_by_round"] == [1.0] * rounds
    assert all(len(row["vs_builder_int4_by_round"]) == rounds for row in speed.values())
    assert speed["splice pruned (prune 4 + patch + W4 g128 GPTQ)"]["weight_mb_per_step"] < \
        speed["splice ONNX int4 g128"]["weight_mb_per_step"]
    # the TVM rows: the same graphs as the ONNX int4 rows, their own kernel limit and weights
    for g in (32, 128):
        tvm_row, onnx_row = speed[f"splice TVM int4 g{g}"], speed[f"splice ONNX int4 g{g}"]
        assert tvm_row["kernel_limit_tok_s"] > 0 and tvm_row["ppl"] > 1
        assert 0.5 < tvm_row["weight_mb_per_step"] / onnx_row["weight_mb_per_step"] < 1.1
    assert speed["splice TVM int4 g128"]["weight_mb_per_step"] < \
        speed["splice TVM int4 g32"]["weight_mb_per_step"]
    assert "TVM against splice's ONNX artefact of the same graph" in text
    assert len(figures["lookahead_study"]) == 3 and "Prompt lookup on more prompts" in text
    assert speed["splice ONNX int4 g32"]["weight_mb_per_step"] < \
        speed["splice ONNX float32"]["weight_mb_per_step"]
    assert 0 <= figures["accuracy_level_4_vs_0"]["rel_rms"] < 0.1
    bw = figures["bandwidth_by_method_gb_s"]
    assert bw["best"] == max(bw["numpy_sum"], bw["ort_gemv"]) == figures["bandwidth_gb_s"] > 0
