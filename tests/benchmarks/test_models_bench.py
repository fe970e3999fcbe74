"""The real-model matrix runs (quick mode: stories260K through float32, W4 RTN and the NPU
backend): a benchmark is not a test, so nothing here looks at speed; it checks that each row is
produced with its figures, that the NPU row reports its partitions instead of a perplexity, and
that a compile the CLI refuses is a row saying why, not the end of the matrix."""

from __future__ import annotations

import json

from benchmarks.models import QUICK_ROWS, _row
from benchmarks.run import main
from tests.paths import TINYSTORIES, needs_stories


@needs_stories
def test_models_quick(tmp_path):
    out, raw = tmp_path / "B.md", tmp_path / "b.json"
    assert main(["--quick", "--only", "models", "--out", str(out), "--json", str(raw)]) == 0
    figures = json.loads(raw.read_text())["models"]
    rows = figures["models"]["stories260K"]["rows"]
    expected = [label for label, _, backend in QUICK_ROWS
                if backend != "npu" or not any("NPU" in x for x in figures["absent"])]
    assert list(rows) == expected
    for label, row in rows.items():
        assert "error" not in row, row
        assert row["compile_s"] > 0 and row["size_mb"] > 0, label
        if row["backend"] == "npu":
            assert "ppl" not in row and len(row["partitions"]) == 2
        else:
            assert row["ppl"] > 1 and row["decode_tok_s"] > 0, label
    assert rows["W4 RTN"]["size_mb"] < rows["float32"]["size_mb"]
    assert "### stories260K" in out.read_text()


def test_a_refused_compile_is_a_row_saying_why(tmp_path):
    spec = {"model": str(tmp_path / "missing.gguf"), "calib": TINYSTORIES}
    row = _row(spec, "none", "onnx", tmp_path / "o", quick=True)
    assert "missing.gguf" in row["error"] and not (tmp_path / "o").exists()
