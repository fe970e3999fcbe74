"""SmolLM2-135M through the CLI to a GGUF file that llama.cpp runs, as a user takes the path:
`splice compile --backend gguf` (fold norms, rotate R1 R2, RTN on llama.cpp's Q4_0 grid: no
calibration, so it stays quick), then `splice run` and `splice eval` through llama-cpp-python."""

from __future__ import annotations

import json
import re

import pytest

from tests.paths import WIKITEXT_TEST, needs_smollm2
from tests.reliability.forkserver import run_splice as splice

RECIPE = """name = "q4_0_rtn"
[[pass]]
name = "fold_norms"
[[pass]]
name = "rotate"
r4 = false
[[pass]]
name = "quantize_weights"
method = "rtn"
bits = 4
group_size = 32
symmetric = true
lm_head = "int4"
embeddings = "int4"
scale_dtype = "float16"
"""


@pytest.mark.slow
@needs_smollm2
@pytest.mark.skipif(not WIKITEXT_TEST.is_file(), reason="../shared/data is absent")
def test_smollm2_gguf_q4_0_compile_run_eval(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (`make llama`)")
    import gguf

    recipe, out = tmp_path / "q4_0.toml", tmp_path / "smollm2-gguf"
    recipe.write_text(RECIPE)
    r = splice("compile", "smollm2-135m", "--backend", "gguf", "--recipe", recipe, "--out", out)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"] == "gguf"
    types = {t.name: t.tensor_type.name
             for t in gguf.GGUFReader(str(out / manifest["gguf"]["file"])).tensors}
    assert {k for k, v in types.items() if v != "Q4_0"} == {
        k for k in types if k.endswith("norm.weight")}  # every matrix Q4_0, norms float
    run = splice("run", out, "The capital of France is", "--max-new-tokens", "8")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("The capital of France is") and len(run.stdout.split()) > 6
    ev = splice("eval", out, "--text", WIKITEXT_TEST, "--max-tokens", "512", "--window", "256")
    assert ev.returncode == 0, ev.stderr
    ppl = float(re.search(r"perplexity ([0-9.]+)", ev.stdout + ev.stderr).group(1))
    # on these 510 tokens: the float model 30.94, this file 47.53 (llama.cpp, RTN Q4_0 with R1 R2);
    # a wrong packing, permutation or scale gives hundreds or more
    assert ppl < 56, ev.stdout
