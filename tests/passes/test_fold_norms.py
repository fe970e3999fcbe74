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
    gains = result.report.pop("gains")  # random inputs: gamma and input energy unrelated
    assert set(gains) == {"layers.0.attn_norm", "final_norm"} and max(gains.values()) < 1.5
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


# -- massive activations (issue 27): a norm whose fold would hurt a quantizer is left -----------

def planted_massive(seed: int = 0) -> Module:
    """A tiny random Gemma 3 with Gemma 3 270M's pattern: one residual channel carries most of
    the stream's energy on every token, and every norm scales it down to 0.02 (median ~1)."""
    module = tiny_model("gemma", seed)
    emb = module.weights["embed.weight"]
    emb[:, 5] = 30.0 * emb.abs().max()
    for n in norms(module):
        if n.role in ("attn_norm", "mlp_norm", "final_norm"):
            w = module.weights[n.inputs[1].const]
            w[5] = 0.02 - n.attrs["offset"]
    return module


def w4_error(module: Module, **fold) -> tuple[float, dict]:
    """Max logit error (relative to the largest logit) of fold_norms(**fold) + W4 RTN g16."""
    from splice.passes.quantize_weights import QuantizeWeightsPass
    ref = logits64(module)
    out, rep = PassManager([FoldNormsPass(**fold), QuantizeWeightsPass(
        method="rtn", bits=4, group_size=16, output_error=False)]).run(module.clone())
    return rel_diff(logits64(out), ref), rep[0]["report"]


@pytest.mark.parametrize("seed", [0, 1])
def test_numeric_massive_channel_norms_left_and_w4_stays_near_float(seed):
    module = planted_massive(seed)
    before = logits64(module)
    folded = module.clone()
    result = FoldNormsPass()(folded)
    stream = {f"layers.{i}.{r}" for i in range(2) for r in ("attn_norm", "mlp_norm")}
    stream.add("final_norm")
    assert set(result.report["left"]) >= stream and not result.report["folded"]
    assert all(result.report["gains"][k] > 2.5 for k in stream)
    assert rel_diff(logits64(folded), before) <= 1e-12
    kept, _ = w4_error(module)
    every, rep = w4_error(module, max_gain=0)  # the fold before issue 27's fix
    assert rep["left"] == {k: v for k, v in rep["left"].items() if "post_norm" in k or
                           "q_norm" in k or "k_norm" in k}  # every pre-norm folded
    assert kept <= 0.005 and every >= 3 * kept, (kept, every)


def test_negative_massive_probe_uses_calibration_when_given():
    """The gain is measured on calibration tokens when given (the same planted channel is found),
    and max_gain = 0 measures nothing and folds every pre-norm."""
    from splice.passes import PassContext
    module = planted_massive()
    calib = token_batch(seed=3, batch=2, seq=16)
    r = FoldNormsPass()(module.clone(), PassContext(calibration=calib))
    assert "layers.0.attn_norm" in r.report["left"]
    assert r.report["gains"]["layers.0.attn_norm"] > 2.5
    r0 = FoldNormsPass(max_gain=0)(module.clone())
    assert "gains" not in r0.report and "layers.0.attn_norm" in r0.report["folded"]
    with pytest.raises(Exception, match="max_gain"):
        FoldNormsPass(max_gain=-1.0)
