"""The benchmarks run (quick mode, stories260K): a benchmark is not a test, so nothing here looks
at speed; it checks that every section produces its table and figures."""

from __future__ import annotations

import json

from benchmarks.run import main
from tests.paths import needs_stories


@needs_stories
def test_foundation_quick(tmp_path):
    out, raw = tmp_path / "B.md", tmp_path / "b.json"
    assert main(["--quick", "--only", "foundation", "--out", str(out), "--json", str(raw)]) == 0
    text = out.read_text()
    assert "Foundation: stories260K" in text and "decode tok/s" in text
    figures = json.loads(raw.read_text())["foundation"]
    assert figures["logit_diff"]["import vs ONNX"] < 1e-4
    assert figures["speed"]["splice ONNX float32"]["decode_tok_s"] > 0
