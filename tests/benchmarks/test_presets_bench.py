"""The presets benchmark runs (quick mode: stories260K compiled with every CPU preset): a benchmark
is not a test, so nothing here looks at speed or perplexity; it checks that each row is produced
with positive figures, that the llama.cpp peer is measured where llama-cpp-python is installed and
said to be skipped where it is not, and that the per-pass report reaches the table."""

from __future__ import annotations

import json

from benchmarks.peer_engines import llama_available
from benchmarks.presets import BACKEND_ROWS, LLAMA, PRESETS, Q4_0, measured, tvm_available
from benchmarks.run import main
from tests.paths import needs_stories


@needs_stories
def test_presets_quick(tmp_path):
    out, raw = tmp_path / "B.md", tmp_path / "b.json"
    assert main(["--quick", "--only", "presets", "--out", str(out), "--json", str(raw)]) == 0
    text = out.read_text()
    figures = json.loads(raw.read_text())["presets"]
    rows = figures["rows"]
    assert set(PRESETS) | {"float32"} <= set(rows)
    for name in PRESETS:
        row = rows[name]
        assert row["compile_s"] > 0 and row["size_mb"] > 0 and row["ppl"] > 1, name
        assert {p["name"] for p in row["passes"]} >= {"quantize_weights"}, name
        assert all(p["time_s"] >= 0 and p["peak_rss_mb"] > 0 for p in row["passes"]), name
    assert rows["fastest"]["size_mb"] < rows["float32"]["size_mb"]
    if tvm_available():  # fastest and balanced through the TVM backend, int8 activations
        for name in BACKEND_ROWS:
            assert rows[name]["compile_s"] > 0 and rows[name]["ppl"] > 1, name
            assert f"splice {name}" in text
    # the preset files' measured figures follow the backend `splice compile` gives a preset
    assert measured(figures, "fastest")["backend"].startswith("tvm" if tvm_available() else "onnx")
    for row in rows.values():
        for t in (1, 2):
            assert row[f"speed_{t}"]["decode_tok_s"] > 0 and row[f"speed_{t}"]["prefill_tok_s"] > 0
    if llama_available():
        assert set(LLAMA) <= set(rows) and figures["llama_note"] is None
        assert rows[Q4_0]["vs_q4_0_by_round_1"] == [1.0] * figures["rounds"]
        assert rows["llama.cpp Q8_0"]["size_mb"] > rows[Q4_0]["size_mb"]
    else:
        assert not set(LLAMA) & set(rows)
        assert "skipped the llama.cpp peer" in text and "make llama" in text
    assert "Per pass of each preset's compile" in text
