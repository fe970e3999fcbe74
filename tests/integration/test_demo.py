"""`make demo`'s program (splice.demo) end to end on stories260K with the `fastest` preset (no
calibration): both artefacts built, the preset's through the backend `splice compile` picks for
a CPU preset here, a streamed generation, and the comparison table."""

from __future__ import annotations

import json

from splice.presets import backend_for
from tests.paths import SHARED, STORIES, needs_stories


@needs_stories
def test_demo_compiles_the_preset_for_the_cli_backend_and_compares_with_float32(tmp_path,
                                                                                  capsys):
    from splice.demo import main

    out = tmp_path / "demo"
    assert main(["--model", str(STORIES), "--preset", "fastest", "--out", str(out),
                 "--eval-tokens", "600", "--max-new-tokens", "8", "--prompt", "Once upon",
                 "--text", str(SHARED / "data" / "tinystories_val.txt")]) == 0
    text = capsys.readouterr().out
    backend, options = backend_for("fastest", "cpu", None, {})
    manifest = json.loads((out / "fastest" / "manifest.json").read_text())
    assert manifest["backend"] == backend
    if backend == "tvm":
        assert manifest["tvm"]["activations"] == options["activations"]
        assert manifest["tvm"]["cache"]["dtype"] == options["kv_cache"]
    assert json.loads((out / "float32" / "manifest.json").read_text())["backend"] == "onnx"
    assert "fastest: decode" in text and "x float32" in text and "perplexity" in text
    rows = [line.split() for line in text.splitlines() if line.split()[:1] in (["float32"],
                                                                               ["fastest"])]
    assert [r[0] for r in rows[-2:]] == ["float32", "fastest"]
    assert all(float(r[1]) > 1 for r in rows[-2:])  # perplexities
