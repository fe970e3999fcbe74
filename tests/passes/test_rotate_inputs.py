"""rotate_inputs: structural, numeric, negative and idempotent tests (STYLE rule 12)."""

from __future__ import annotations

import pytest
import torch

from splice.ir import run_logits
from splice.passes import PassManager
from splice.passes.fold_norms import FoldNormsPass
from splice.passes.infra.base import PassContext
from splice.passes.infra.layerwise import LayerwiseError, run_layerwise
from splice.passes.quantize_weights import QuantizeWeightsPass
from splice.passes.rotate import RotatePass
from splice.passes.rotate_inputs import RotateInputsPass
from tests.passes.models import hand_built, token_batch
from splice.recipe import Recipe
from tests.passes.test_fold_norms import planted_massive
from tests.scale.test_layerwise import calib, quant, same_module
from tests.tiny import tiny_module


def logits64(module):
    return run_logits(module, token_batch(), torch.float64)["logits"]


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_structural_hadamard_after_each_scaled_norm():
    module = hand_built()
    a, g1 = module.weights["a.weight"].clone(), module.weights["n1.weight"].clone()
    counts = module.graph.op_counts()
    result = RotateInputsPass()(module)
    assert result.modified
    assert result.report["rotated"] == ["layers.0.attn_norm", "final_norm"]
    assert module.graph.op_counts() == {**counts, "hadamard": 2}
    for norm in module.graph.find(op="rms_norm"):
        (user,) = norm.output.users()
        assert user.op == "hadamard" and user.origin == "rotate_inputs"
        assert user.role == f"{norm.role}.hadamard" and norm.attrs["offset"] == 0.0
        assert {u.op for u in user.output.users()} == {"linear"}
    # the signs went into the scale (|g| unchanged), the Hadamard into the weight's columns
    assert torch.equal(module.weights["n1.weight"].abs(), g1.abs())
    assert not torch.allclose(module.weights["a.weight"], a)
    assert torch.allclose(module.weights["a.weight"].norm(dim=1), a.norm(dim=1))


def gemma_like(seed: int):
    """planted_massive with layer 0's attention norm unplanted: fold_norms folds that one and
    leaves the other pre-norms, as on Gemma 3 270M."""
    module = planted_massive(seed)
    norm = next(n for n in module.graph.find(op="rms_norm")
                if n.layer == 0 and n.role == "attn_norm")
    module.weights[norm.inputs[1].const][5] = 0.5
    return module


@pytest.mark.parametrize("seed", [0, 1])
def test_numeric_float64_logits_unchanged(seed):
    """Exact on a tiny Gemma 3 whose pre-norms fold_norms leaves but one (weightless: it gets the
    signs as its scale); rotate then finds R1 done and applies R2 and R4; and with W4 after it the
    model is closer to float than after fold_norms + R1 (the stream rotation, on a fold of every
    norm) on the same model."""
    module = gemma_like(seed)
    ref = logits64(module)
    out, rep = PassManager([FoldNormsPass(), RotateInputsPass(seed=seed), RotatePass()]).run(
        module.clone())
    assert rep[0]["report"]["folded"] == ["layers.0.attn_norm"]
    report = rep[1]["report"]
    assert len(report["rotated"]) == 4 and "layers.0.attn_norm" in report["rotated"]
    assert "shares its weight" in report["left"]["final_norm"]  # the tied lm_head
    assert report["r1"]["by"] == "rotate_inputs" and len(out.graph.find(op="hadamard")) >= 4
    assert rep[2]["report"]["already_applied"] == ["r1"] and rep[2]["report"]["applied"] == [
        "r2", "r4"]
    assert rel_diff(logits64(out), ref) <= 1e-12
    w4 = QuantizeWeightsPass(method="rtn", bits=4, group_size=16, output_error=False)
    rotated = rel_diff(logits64(PassManager([w4]).run(out)[0]), ref)
    stream = PassManager([FoldNormsPass(max_gain=0), RotatePass(), w4]).run(module.clone())[0]
    assert rotated <= 0.005 and rel_diff(logits64(stream), ref) >= 3 * rotated


def test_negative_nothing_when_every_norm_is_folded():
    """Every norm weightless (fold_norms folded them all, SmolLM2's case): R1 applies, nothing
    to do; a norm feeding an add is never touched."""
    folded = hand_built(norm_weights=False)
    before = folded.graph.op_counts()
    r = RotateInputsPass()(folded)
    assert not r.modified and "R1 rotates the stream" in r.report["note"] and r.report["left"] == {}
    assert folded.graph.op_counts() == before and "rotation" not in folded.config.extra
    residual = hand_built(norm_feeds_add=True)
    w = residual.weights["a.weight"].clone()
    r = RotateInputsPass()(residual)
    assert r.report["rotated"] == ["final_norm"]
    assert "feeds add" in r.report["left"]["layers.0.attn_norm"]
    assert torch.equal(residual.weights["a.weight"], w)


def test_idempotent_second_run_changes_nothing():
    module = hand_built()
    RotateInputsPass()(module)
    weights = {k: v.clone() for k, v in module.weights.items()}
    text = module.graph.op_counts()
    r = RotateInputsPass()(module)
    assert not r.modified and r.report["rotated"] == [] and module.graph.op_counts() == text
    assert "already applied" in r.report["note"]
    assert all(torch.equal(module.weights[k], v) for k, v in weights.items())


@pytest.mark.parametrize("variant,method", [({}, "rtn"),
                                            ({"num_layers": 3, "qk_norm": True,
                                              "tie_embeddings": True}, "gptq")])
def test_layer_by_layer_equals_in_memory_bit_for_bit(tmp_path, variant, method):
    """Without fold_norms every pre-norm keeps its scale: each layer's sub-module rotates its own
    norms' readers (the stub head's norm left), rotate adds R2 / R4, W4 after them; the merged
    model, its weights and logits equal the in-memory compile bit for bit, R1's record too."""
    passes = (("rotate_inputs", {}), ("rotate", {}), quant(method=method))
    ctx = PassContext(calibration=calib() if method == "gptq" else None)
    whole, _ = PassManager(Recipe("t", passes).build()).run(tiny_module(**variant), ctx)
    layered, report = run_layerwise(tiny_module(**variant), Recipe("t", passes).build(), ctx,
                                    tmp_path)
    same_module(whole, layered)
    assert layered.config.extra["rotation"] == whole.config.extra["rotation"]
    assert whole.config.extra["rotation"]["r1"]["by"] == "rotate_inputs"
    n = variant.get("num_layers", 2)
    assert len(whole.config.extra["rotation"]["r1"]["online_after_norms"]) >= 2 * n
    assert report[0]["modified"] and len(report[0]["report"]["layers"]) == n


def test_layer_by_layer_refuses_layers_that_decide_otherwise(tmp_path):
    """Layer 0's norms of ones keep no per-channel scale, layer 1's do: in memory the pass rotates
    both (the model keeps a scale); layer by layer layer 0 alone would leave R1 to rotate, so the
    driver refuses at layer 1."""
    module = tiny_module()
    for name in ("layers.0.attn_norm.weight", "layers.0.mlp_norm.weight"):
        module.weights[name] = torch.ones_like(module.weights[name])
    passes = Recipe("t", (("rotate_inputs", {}),)).build()
    assert PassManager(passes).run(module.clone())[1][0]["report"]["rotated"][:2] == [
        "layers.0.attn_norm", "layers.0.mlp_norm"]
    with pytest.raises(LayerwiseError, match="rotated the norms' readers online in layer 1 but "
                                             "not in layer 0"):
        run_layerwise(module, passes, PassContext(), tmp_path)
