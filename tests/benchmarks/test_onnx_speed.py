"""The ONNX speed benchmark runs (quick mode: a tiny random Llama, one row of each kind of engine
and of artefact build, seconds): a benchmark is not a test, so nothing here looks at speed; it
checks that each row is produced with positive figures and that both runtimes agree on the greedy
tokens. The rows only the full mode runs (the same engines on artefacts that differ in settings)
are checked for the text they add: the full mode's markdown, on quick rows copied under their
names."""

from __future__ import annotations

import json

import pytest
from benchmarks.onnx_speed import FULL, FULL_R12, G32_SYM, GPTQ, PRUNED, ROTATED, markdown
from benchmarks.run import main

pytest.importorskip("onnxruntime_genai")

G32, TVM32, F32 = "splice ONNX int4 g32", "splice TVM int4 g32", "splice ONNX float32"
B4 = "builder int4 (onnxruntime-genai)"
AHEAD = "splice ONNX int4 g32, prompt lookup (up to 8 drafts)"
QUICK_ROWS = {G32, B4, TVM32, AHEAD, "splice ONNX int4 g32, threads not spinning",
              "builder int4 (onnxruntime-genai), threads not spinning",
              "splice int4 g32 run by onnxruntime-genai", FULL,
              "splice full pipeline, prompt lookup (up to 8 drafts)", F32,
              "splice ONNX float32, standard ops only", "Hugging Face eager float32"}
# full-mode rows -> the quick row of the same engine and kind of artefact
FULL_ONLY = {"splice ONNX int4 g128": G32, "splice TVM int4 g128": TVM32, G32_SYM: G32,
             GPTQ: FULL, ROTATED: FULL, PRUNED: FULL, FULL_R12: FULL,
             "splice ONNX int4 g128, prompt lookup (up to 8 drafts)": AHEAD,
             "builder float32 (onnxruntime-genai)": B4}


def test_onnx_speed_quick(tmp_path):
    out, raw = tmp_path / "B.md", tmp_path / "b.json"
    assert main(["--quick", "--only", "onnx_speed", "--out", str(out), "--json", str(raw)]) == 0
    text = out.read_text()
    assert "ONNX Runtime speed: tiny random Llama" in text and "builder int4" in text
    figures = json.loads(raw.read_text())["onnx_speed"]
    speed = figures["speed"]
    assert set(speed) == QUICK_ROWS
    for name, row in speed.items():
        assert row["decode_tok_s"] > 0 and row["prefill_tok_s"] > 0, name
        assert row["peak_rss_mb"] > 0 and row["size_mb"] > 0, name
    assert figures["same_tokens_genai_vs_splice"] is True
    ahead = speed[AHEAD]
    assert ahead["decode_steps"] + ahead["accepted"] == figures["new_tokens"] - 1
    rated = [name for name, row in speed.items() if "ppl" in row]
    assert set(rated) == {G32, FULL, F32, B4, TVM32}
    assert all(1 < speed[n]["ppl"] < 1e4 for n in rated)  # vocabulary 512
    assert all(speed[n]["kernel_limit_tok_s"] > 0 for n in rated) and "kernel limit" in text
    rounds = figures["rounds"]
    assert speed[B4]["vs_builder_int4_by_round"] == [1.0] * rounds
    assert all(len(row["vs_builder_int4_by_round"]) == rounds for row in speed.values())
    # pruned by 4 of 6 layers, g128 groups: fewer weights a step than the whole model at g32
    assert speed[FULL]["weight_mb_per_step"] < speed[G32]["weight_mb_per_step"]
    # the TVM row: the same graph as the ONNX int4 row, its own kernel limit and weights
    assert speed[TVM32]["kernel_limit_tok_s"] > 0 and speed[TVM32]["ppl"] > 1
    assert 0.5 < speed[TVM32]["weight_mb_per_step"] / speed[G32]["weight_mb_per_step"] < 1.1
    assert "TVM against splice's ONNX artefact of the same graph" in text
    assert len(figures["lookahead_study"]) == 3 and "Prompt lookup on more prompts" in text
    assert speed[G32]["weight_mb_per_step"] < speed[F32]["weight_mb_per_step"]
    assert 0 <= figures["accuracy_level_4_vs_0"]["rel_rms"] < 0.1
    bw = figures["bandwidth_by_method_gb_s"]
    assert bw["best"] == max(bw["numpy_sum"], bw["ort_gemv"]) == figures["bandwidth_gb_s"] > 0

    full = dict(figures, speed={**speed, **{k: speed[v] for k, v in FULL_ONLY.items()}},
                same_tokens_lookahead_vs_plain={G32: True, "splice ONNX int4 g128": True})
    text = markdown(full)
    assert "Pruned by 4 layers: decode" in text and "with R1 and R2 only" in text
    assert "g128 decode" in text and "int4 g128 GPTQ (32 x 512" in text
    assert "int4 g128 " in text.split("Prompt lookup decoding")[1].split("\n")[0]
