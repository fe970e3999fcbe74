"""fold_norms: structural, numeric, negative and idempotent tests (STYLE rule 12)."""

from __future__ import annotations

import pytest
import torch

from splice.ir import Graph, Module, emit, run_logits
from splice.passes import NumericCheckInstrument, PassManager
from splice.passes.fold_norms import FoldNormsPass
from tests.passes.models import HIDDEN, SPECS, VOCAB, config, hand_built, tiny_model, token_batch


def logits64(module: Module) -> torch.Tensor:
    return run_logits(module, token_batch(), torch.float64)["logits"]


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def norms(module: Module) -> list:
    return module.graph.find(op="rms_norm")


# -- structural --------------------------------------------------------------------------------

def test_structural_fold_into_linear_columns():
    module = hand_built()
    g1, g2 = module.weights["n1.weight"].clone(), module.weights["n2.weight"].clone()
    a, b = module.weights["a.weight"].clone(), module.weights["b.weight"].clone()
    bias, head = module.weights["b.bias"].clone(), module.weights["head.weight"].clone()
    counts = module.graph.op_counts()
    result = FoldNormsPass()(module)
    assert result.modified and result.module is module
    assert module.graph.op_counts() == counts
    for n in norms(module):
        assert len(n.inputs) == 1 and n.attrs["offset"] == 0.0 and n.origin == "fold_norms"
    assert [n.output.name for n in norms(module)] == ["attn_norm.0", "final_norm"]
    assert set(module.weights) == {"embed.weight", "a.weight", "b.weight", "b.bias", "head.weight"}
    assert set(module.graph.consts) == set(module.weights)
    torch.testing.assert_close(module.weights["a.weight"], a * g1[None, :], rtol=0, atol=0)
    torch.testing.assert_close(module.weights["b.weight"], b * g1[None, :], rtol=0, atol=0)
    torch.testing.assert_close(module.weights["head.weight"], head * g2[None, :], rtol=0, atol=0)
    assert torch.equal(module.weights["b.bias"], bias)
    # the linears still read the (renamed-in-place) norm outputs
    q = module.graph.find(role="attn.q_proj")[0]
    assert q.inputs[0] is norms(module)[0].output
    assert result.report == {"folded": ["layers.0.attn_norm", "final_norm"], "left": {},
                             "untied": [], "dropped_weights": ["n1.weight", "n2.weight"]}


def test_structural_grouped_norm_and_offset():
    """A per-group norm with an offset that feeds a linear: gamma tiles over the groups."""
    g = Graph()
    ids = g.add_input("input_ids", "i64", ("batch", "seq"))
    w = {"embed.weight": torch.randn(VOCAB, HIDDEN, dtype=torch.float64),
         "n.weight": torch.randn(8, dtype=torch.float64) * 0.2,
         "head.weight": torch.randn(VOCAB, HIDDEN, dtype=torch.float64)}
    x = emit(g, "embedding", [ids, g.const("embed.weight", "f64", (VOCAB, HIDDEN))]).output
    n = emit(g, "rms_norm", [x, g.const("n.weight", "f64", (8,))],
             {"eps": 1e-6, "offset": 1.0, "group": 8}, role="final_norm").output
    emit(g, "linear", [n, g.const("head.weight", "f64", (VOCAB, HIDDEN))], name="logits")
    g.outputs = [g.nodes[-1].output]
    module = Module(g, w, config())
    head, gamma = w["head.weight"].clone(), 1.0 + w["n.weight"]
    before = logits64(module)
    assert FoldNormsPass()(module).modified
    torch.testing.assert_close(module.weights["head.weight"], head * gamma.repeat(4)[None, :],
                               rtol=0, atol=0)
    assert norms(module)[0].attrs == {"eps": 1e-6, "offset": 0.0, "group": 8}
    assert rel_diff(logits64(module), before) <= 1e-9


# -- numeric -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(SPECS))
@pytest.mark.parametrize("seed", [0, 1])
def test_numeric_float64_logits_unchanged(kind, seed):
    module = tiny_model(kind, seed=seed)
    embed = module.weights["embed.weight"].clone()
    before = logits64(module)
    check = NumericCheckInstrument(token_batch(seed))
    out, report = PassManager([FoldNormsPass()], [check]).run(module)
    assert report[0]["modified"] and report[0]["numeric"]["max_rel_diff"] <= 1e-9
    assert rel_diff(logits64(out), before) <= 1e-9
    layers = SPECS[kind].num_layers
    assert len(report[0]["report"]["folded"]) == 2 * layers + 1
    tied = SPECS[kind].tie_embeddings
    assert report[0]["report"]["untied"] == (["lm_head.weight"] if tied else [])
    head = out.graph.find(role="lm_head")[0].inputs[1]
    assert head.name == "lm_head.weight"
    assert torch.equal(out.weights["embed.weight"], embed)  # the embedding keeps its scale
    if tied:
        assert out.config.extra["tie_embeddings"] is False


def test_numeric_gemma_keeps_post_and_qk_norms():
    module = tiny_model("gemma")
    kept = {n.role: n.inputs[1].name for n in norms(module)
            if n.role in ("attn_post_norm", "mlp_post_norm", "attn.q_norm", "attn.k_norm")}
    result = FoldNormsPass()(module)
    left = result.report["left"]
    assert len(left) == 8
    assert "feeds add" in left["layers.0.attn_post_norm"]
    assert "feeds rotary" in left["layers.1.attn.q_norm"]
    for n in norms(module):
        if n.role in kept:
            assert n.inputs[1] is not None and n.attrs["offset"] == 1.0
        else:
            assert len(n.inputs) == 1 and n.attrs["offset"] == 0.0


@pytest.mark.parametrize("kind", ["tied", "gemma"])
def test_numeric_no_untie_when_gamma_is_all_ones(kind):
    module = tiny_model(kind, unit_final_norm=True)
    before = logits64(module)
    result = FoldNormsPass()(module)
    assert result.modified and result.report["untied"] == []
    head = module.graph.find(role="lm_head")[0]
    assert head.inputs[1] is module.graph.consts["embed.weight"]
    assert "lm_head.weight" not in module.weights
    assert rel_diff(logits64(module), before) <= 1e-9


def test_numeric_float32_changes_rounding_only():
    module = tiny_model("gqa", dtype=torch.float32)
    before = logits64(module)
    FoldNormsPass()(module)
    assert all(t.dtype == torch.float32 for t in module.weights.values())
    assert rel_diff(logits64(module), before) <= 1e-6


# -- negative ----------------------------------------------------------------------------------

def test_negative_norms_without_weights_are_left_alone():
    module = hand_built(norm_weights=False)
    text, weights = str(module.graph), {k: v.clone() for k, v in module.weights.items()}
    result = FoldNormsPass()(module)
    assert not result.modified
    assert str(module.graph) == text
    assert all(torch.equal(module.weights[k], v) for k, v in weights.items())
    assert set(result.report["left"].values()) == {"no weight (nothing to fold)"}


def test_negative_norm_feeding_a_non_linear_is_left_alone():
    module = hand_built(norm_feeds_add=True)
    a, b = module.weights["a.weight"].clone(), module.weights["b.weight"].clone()
    before = logits64(module)
    result = FoldNormsPass()(module)
    assert result.report["left"] == {
        "layers.0.attn_norm": "its output feeds add (mlp.residual), not only linears"}
    n1 = module.graph.find(role="attn_norm")[0]
    assert n1.inputs[1].name == "n1.weight" and "n1.weight" in module.weights
    assert torch.equal(module.weights["a.weight"], a) and torch.equal(module.weights["b.weight"], b)
    assert result.report["folded"] == ["final_norm"]  # the other norm still folds
    assert rel_diff(logits64(module), before) <= 1e-9


def test_negative_tied_head_is_left_when_untie_is_off():
    module = tiny_model("tied")
    before = logits64(module)
    result = FoldNormsPass(untie=False)(module)
    assert "untie=False" in result.report["left"]["final_norm"]
    assert result.report["untied"] == [] and "lm_head.weight" not in module.weights
    assert len(result.report["folded"]) == 2 * SPECS["tied"].num_layers
    assert rel_diff(logits64(module), before) <= 1e-9


# -- idempotent --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(SPECS))
def test_idempotent_second_run_changes_nothing(kind):
    module = tiny_model(kind)
    assert FoldNormsPass()(module).modified
    text = str(module.graph)
    weights = {k: v.clone() for k, v in module.weights.items()}
    again = FoldNormsPass()(module)
    assert not again.modified
    assert str(module.graph) == text
    assert weights.keys() == module.weights.keys()
    assert all(torch.equal(module.weights[k], v) for k, v in weights.items())
    assert again.report["folded"] == [] and again.report["dropped_weights"] == []
