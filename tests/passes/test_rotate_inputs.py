"""rotate_inputs: structural, numeric, negative and idempotent tests (STYLE rule 12)."""

from __future__ import annotations

import pytest
import torch

from splice.ir import run_logits
from splice.passes import PassManager
from splice.passes.fold_norms import FoldNormsPass
from splice.passes.quantize_weights import QuantizeWeightsPass
from splice.passes.rotate import RotatePass
from splice.passes.rotate_inputs import RotateInputsPass
from tests.passes.models import hand_built, token_batch
from tests.passes.test_fold_norms import planted_massive


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


@pytest.mark.parametrize("seed", [0, 1])
def test_numeric_float64_logits_unchanged(seed):
    """On a tiny Gemma 3 whose pre-norms fold_norms leaves (planted massive channel): exact, and
    with W4 after it closer to float than fold_norms + R1 (the rotation that needs a folded
    stream) on the same model."""
    module = planted_massive(seed)
    ref = logits64(module)
    out, rep = PassManager([FoldNormsPass(), RotateInputsPass(seed=seed)]).run(module.clone())
    assert len(rep[1]["report"]["rotated"]) == 4  # 2 x (attn, mlp) pre-norms
    assert "shares its weight" in rep[1]["report"]["left"]["final_norm"]  # the tied lm_head
    assert rel_diff(logits64(out), ref) <= 1e-12
    w4 = QuantizeWeightsPass(method="rtn", bits=4, group_size=16, output_error=False)
    rotated = rel_diff(logits64(PassManager([w4]).run(out)[0]), ref)
    stream = PassManager([FoldNormsPass(max_gain=0), RotatePass(r2=False, r4=False), w4]).run(
        module.clone())[0]
    assert rotated <= 0.005 and rel_diff(logits64(stream), ref) >= 3 * rotated


def test_negative_weightless_or_non_linear_readers_left_alone():
    folded = hand_built(norm_weights=False)
    before = folded.graph.op_counts()
    r = RotateInputsPass()(folded)
    assert not r.modified and r.report["left"] == {} and folded.graph.op_counts() == before
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
    assert all(torch.equal(module.weights[k], v) for k, v in weights.items())
