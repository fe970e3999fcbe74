"""Whole-model passes in layer-by-layer mode (passes/infra/layerwise.py): select_layers, estimate_patch,
prune_layers, fuse_patch and absorb_post_norm run on the lazily read model before the per-layer
passes, and the patched, pruned, rotated, quantized result equals the in-memory compile bit for
bit, from memory and from disk; recipes in another order are refused."""

from __future__ import annotations

import math

import pytest
import torch
import transformers as T

import splice
from splice.frontend.hf import load_hf
from splice.frontend.lazy import LazyWeights, load_hf_lazy
from splice.ir.interpreter import Interpreter, run_logits
from splice.passes.infra.base import PassContext
from splice.passes.infra.layer_parts import LayerwiseError, split_stages
from splice.passes.infra.layerwise import run_layerwise
from splice.passes.infra.manager import PassManager
from splice.recipe import Recipe
from tests.frontend.test_hf import CONFIGS, randomise
from tests.scale.test_layerwise import (A8_TENSOR, FOLD, GPTQ, ROTATE, compiles_equal, quant,
                                        same_module)
from tests.tiny import VARIANTS, tiny_module

SELECT = ("select_layers", {"n": 1})
PRUNE = ("prune_layers", {})
AUTO = ("fuse_patch", {"strategy": "auto"})
R1_PATCH = ("estimate_patch", {"kind": "linearpatch", "basis": "r1"})
# (passes, tiny_module settings)
RECIPES = {
    # the better of LinearPatch and least squares, multiplied out for rotate to rotate
    "auto_patch_gptq": ((SELECT, ("estimate_patch", {}), PRUNE, ("fuse_patch", {
        "strategy": "dense"}), FOLD, ROTATE, GPTQ), {}),
    # LinearPatch in R1's basis: rotate turns it into one channel scale in the layer's part
    "r1_patch_rotate": ((SELECT, R1_PATCH, PRUNE, AUTO, FOLD, ROTATE, quant()), {}),
    # two layers by the angular distance, LinearPatch as one FWHT chain (no rotation can pass
    # it), static int8 activations
    "fwht_static_a8": ((("select_layers", {"n": 2, "metric": "angular"}),
                        ("estimate_patch", {"kind": "linearpatch"}), PRUNE,
                        ("fuse_patch", {"strategy": "fwht"}), FOLD, quant(), A8_TENSOR),
                       {"num_layers": 5}),
    # the perplexity metric (one pruned clone per candidate), the patch folded into down_proj
    "ppl_fold": ((("select_layers", {"n": 1, "metric": "ppl"}), ("estimate_patch", {}), PRUNE,
                  ("fuse_patch", {"strategy": "fold"}), FOLD, ROTATE, GPTQ), {}),
    # the last layers pruned: the patch sits before the final norm, in the last part's tail
    "last_block_tied": ((("estimate_patch", {"start": 3, "n": 1}), PRUNE, FOLD, ROTATE, quant()),
                        {"tie_embeddings": True}),
    # Gemma 2's sandwich post-norms absorbed first, so that rotate's R1 can run
    "absorb_gemma2": ((("absorb_post_norm", {"max_spread": math.inf}), FOLD, ROTATE, GPTQ),
                      {**VARIANTS["gemma2"], "num_layers": 2}),
    # the MLP patch (least squares and a gated MLP block): rotate rotates both in the part of
    # the layer after the cut
    "mlp_patch_rotate": ((SELECT, ("estimate_patch", {"kind": "mlp", "mlp_rank": 8,
                                                      "mlp_steps": 20, "mlp_batch": 64}),
                          PRUNE, AUTO, FOLD, ROTATE, GPTQ), {}),
    # whole-model passes only: no per-layer phase
    "prune_only": ((SELECT, ("estimate_patch", {}), PRUNE), {}),
}


def calib(seed: int = 0) -> torch.Tensor:
    """192 tokens: enough for a 64 x 64 patch with a quarter held out."""
    return torch.randint(0, 258, (8, 24), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", sorted(RECIPES))
def test_whole_model_passes_then_layers_equal_in_memory_bit_for_bit(tmp_path, case):
    passes, variant = RECIPES[case]
    variant = {"num_layers": 4, **variant}
    r = Recipe("t", passes)
    ctx = PassContext(calibration=calib())
    whole, expected = PassManager(r.build()).run(tiny_module(**variant), ctx)
    layered, report = run_layerwise(tiny_module(**variant), r.build(), ctx, tmp_path)
    same_module(whole, layered)
    assert layered.config.extra == whole.config.extra
    assert [e["name"] for e in report] == [name for name, _ in passes]
    assert [e["step"] for e in report] == list(range(len(passes)))
    for got, want in zip(report, expected):  # the whole-model passes' own reports, unchanged
        if got["name"] in ("select_layers", "estimate_patch", "prune_layers", "fuse_patch"):
            assert got["report"] == want["report"]


def test_a_patch_between_layers_belongs_to_the_layer_after_it():
    ctx = PassContext(calibration=calib())
    r = Recipe("t", (("estimate_patch", {"start": 1, "n": 1, "kind": "linearpatch"}), PRUNE))
    module, _ = PassManager(r.build()).run(tiny_module(num_layers=4), ctx)
    _, layers, post = split_stages(module.graph)
    assert [n.op for n in layers[1][:3]] == ["hadamard", "channel_scale", "hadamard"]
    assert all(n.layer is None and n.role == "patch" for n in layers[1][:3])
    assert all(n.layer == 1 for n in layers[1][3:]) and all(n.layer == 0 for n in layers[0])
    assert post[0].role == "final_norm"


def hf_model(layers: int = 4):
    config = CONFIGS["llama"]()  # tied embeddings, biases
    config.num_hidden_layers = layers
    return randomise(T.AutoModelForCausalLM.from_config(config))


def test_from_disk_equals_in_memory_and_spills_what_the_passes_write(tmp_path, monkeypatch):
    """A lazy bf16 checkpoint: the whole-model passes read it one weight at a time, the patch
    and the folded down_proj go to spill files (threshold lowered to 0 bytes here), and the
    result equals the eager import's compile bit for bit."""
    from splice.passes.infra import layerwise

    monkeypatch.setattr(layerwise, "SPILL_MIN_BYTES", 0)
    hf_model().to(torch.bfloat16).save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    r = Recipe("t", RECIPES["ppl_fold"][0])
    ids = torch.randint(0, 160, (8, 24), generator=torch.Generator().manual_seed(1))
    ctx = PassContext(calibration=ids)
    whole, _ = PassManager(r.build()).run(load_hf(tmp_path / "hf"), ctx)
    lazy = load_hf_lazy(tmp_path / "hf")
    layered, _ = run_layerwise(lazy, r.build(), ctx, tmp_path / "work")
    same_module(whole, layered)
    assert layered.config.extra == whole.config.extra
    assert isinstance(layered.weights, LazyWeights) and layered.weights.resident_bytes() < 4096
    assert list((tmp_path / "work" / "whole_model").glob("spilled_*.safetensors"))
    assert lazy.weights._spill is None  # spilling ends with the whole-model passes


def test_the_interpreter_reads_a_lazy_weight_at_each_use():
    """A weight on disk is read at the node that uses it and not kept; an in-memory one is."""
    calls = []

    class Ref:
        def __init__(self, t):
            self.t = t

        def load(self):
            calls.append(1)
            return self.t.clone()

    module = tiny_module()
    eager = {k: v for k, v in module.weights.items()}
    lazy = LazyWeights({k: Ref(v) for k, v in eager.items() if k.startswith("layers.")},
                       {k: v for k, v in eager.items() if not k.startswith("layers.")})
    ids = torch.randint(0, 258, (1, 5))
    want = run_logits(module, ids)["logits"]
    module.weights = lazy
    interp = Interpreter(module)
    from splice.ir.interpreter import default_feeds

    for _ in range(2):
        got = interp.run(default_feeds(module, ids, None, torch.float32))["logits"]
        assert torch.equal(got, want)
    per_run = len(calls) // 2
    assert per_run >= sum(1 for k in eager if k.startswith("layers."))
    assert all(not k.startswith("layers.") for k in interp._weights)


def test_compile_layerwise_prune4_patch_onnx(tmp_path):
    """The built-in prune recipe through splice.compile(layerwise=True) from disk: the same
    ONNX weights and logits as the in-memory compile."""
    from splice.runtime import load

    hf_model(6).save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(1))
    b = compiles_equal(tmp_path, Recipe.named("prune4_patch"), ids)
    assert load(b).manifest["config"]["num_layers"] == 2


def test_recipes_layer_by_layer_mode_cannot_run_are_refused(tmp_path):
    ctx = PassContext(calibration=calib())
    late = Recipe("late", (FOLD, SELECT, ("estimate_patch", {}), PRUNE))
    with pytest.raises(LayerwiseError, match="runs the whole-model passes .* first, then the "
                                             "per-layer ones; this recipe has select_layers, "
                                             "estimate_patch, prune_layers after fold_norms: "
                                             "put it before"):
        run_layerwise(tiny_module(num_layers=4), late.build(), ctx, tmp_path)
    distill = Recipe("d", (SELECT, ("estimate_patch", {}), ("distill_patch", {}), PRUNE))
    with pytest.raises(LayerwiseError, match="this recipe also has distill_patch .distill_patch "
                                             "trains the patch through every layer after the "
                                             "cut"):
        splice.compile(tiny_module(num_layers=4), distill, out=tmp_path / "x", layerwise=True,
                       calibration=calib())
    assert not (tmp_path / "x").exists()
