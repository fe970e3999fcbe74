"""quantize_weights: structural, numeric, negative and idempotent tests (STYLE rule 12), the GPTQ
solver's known cases, and the quantized graph through ONNX Runtime."""

from __future__ import annotations

import dataclasses
import numpy as np
import onnxruntime as ort
import pytest
import torch
from splice.backends.onnx import RULES, lower, save
from splice.backends.onnx.quant import qlinear_rules
from splice.frontend.decoder import build_decoder
from splice.ir import Module, run_logits
from splice.ir import quant
from splice.passes.numerics import quantizers
from splice.ir.interpreter import Interpreter, default_feeds
from splice.passes import PassManager
from splice.passes.infra.base import PassContext, PassError
from splice.passes.infra.instruments import NumericCheckInstrument
from splice.passes.quantize_weights import DECODER_LINEARS, QuantizeWeightsPass
from splice.passes.infra.registry import make_pass

from tests.passes.models import SPECS, VOCAB, hand_built, random_weights, tiny_model, token_batch


def calibration(seed: int = 1, batch: int = 4, seq: int = 32) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def correlated_model(seed: int = 0) -> Module:
    """The tiny llama with a rank-4 (plus noise) embedding table: the linears' inputs are strongly
    correlated, which is what GPTQ's error feedback exploits."""
    spec = SPECS["llama"]
    w = random_weights(spec, seed)
    gen = torch.Generator().manual_seed(seed + 5)
    low = torch.randn(VOCAB, 4, generator=gen, dtype=torch.float64) @ torch.randn(
        4, spec.hidden_size, generator=gen, dtype=torch.float64)
    w["embed.weight"] = low + 0.05 * torch.randn(VOCAB, spec.hidden_size, generator=gen,
                                                 dtype=torch.float64)
    return build_decoder(spec, w, origin="tests", source=f"correlated seed {seed}")


def logits64(module: Module) -> torch.Tensor:
    return run_logits(module, token_batch(), torch.float64)["logits"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def onnx_logits(module: Module, ids: torch.Tensor, path, level=None) -> np.ndarray:
    """The module's logits for `ids` (empty cache) through ONNX Runtime, lowered with MatMulNBits
    at accuracy level 0 (float compute, as the interpreter)."""
    model = save(lower(module, rules={**RULES, **qlinear_rules(0)}), path)
    opts = ort.SessionOptions()
    if level is not None:
        opts.graph_optimization_level = level
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids.numpy(),
             "position_ids": np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()}
    for v in module.graph.inputs:
        if v.name.startswith("past."):
            feeds[v.name] = np.zeros((ids.shape[0], v.shape[1], 0, v.shape[3]), np.float32)
    return sess.run(["logits"], feeds)[0]


def snapshot(module: Module):
    return str(module.graph), {k: v.clone() for k, v in module.weights.items()}


def unchanged(module: Module, snap) -> bool:
    text, weights = snap
    return str(module.graph) == text and weights.keys() == module.weights.keys() and all(
        torch.equal(module.weights[k], v) for k, v in weights.items())


# -- structural --------------------------------------------------------------------------------

def test_structural_linears_become_qlinears():
    module = hand_built(dtype=torch.float32)
    bias = module.weights["b.bias"].clone()
    result = QuantizeWeightsPass(bits=8, group_size=0)(module)
    assert result.modified and result.module is module
    g = module.graph
    assert g.op_counts()["qlinear"] == 2 and g.op_counts()["linear"] == 1  # lm_head is kept
    q, k = g.find(role="attn.q_proj")[0], g.find(role="attn.k_proj")[0]
    for node in (q, k):
        assert node.op == "qlinear" and node.origin == "quantize_weights" and node.layer == 0
        assert node.attrs == {"bits": 8, "group_size": 32, "in_features": 32, "out_features": 32,
                              "symmetric": False}
        assert [v.dtype for v in node.inputs[1:4]] == ["u8", "f32", "u8"]
        assert node.inputs[1].shape == (32, 1, 32) and node.inputs[2].shape == (32, 1)
        assert node.inputs[0] is g.find(role="attn_norm")[0].output
    assert k.inputs[4].name == "b.bias" and torch.equal(module.weights["b.bias"], bias)
    assert len(q.inputs) == 4
    assert q.output.name == "attn.q_proj.0" and g.find(op="add")[0].inputs[0] is q.output
    assert "a.weight" not in module.weights and "b.weight" not in module.weights
    assert "layers.0.attn.q_proj.qweight" in module.weights
    assert result.report["quantized"] == ["layers.0.attn.q_proj", "layers.0.attn.k_proj"]
    assert result.report["bytes"] == {"float": 2 * 32 * 32 * 4,
                                      "quantized": 2 * (32 * 32 + 32 * 4 + 32)}
    assert module.config.extra["quantization"]["weights"]["bits"] == 8


def test_structural_symmetric_int4_lm_head_and_graph_output():
    module = tiny_model("tied")
    result = QuantizeWeightsPass(bits=4, group_size=16, symmetric=True, lm_head="int4")(module)
    head = module.graph.find(role="lm_head")[0]
    assert head.op == "qlinear" and len(head.inputs) == 3  # no zero points
    assert head.output.name == "logits" and module.graph.outputs[0] is head.output
    assert head.inputs[1].shape == (VOCAB, 2, 8)
    # the embedding keeps its float table; the lm_head has its own packed copy
    assert module.graph.find(op="embedding")[0].inputs[1].name == "embed.weight"
    assert "lm_head" in result.report["quantized"]
    assert module.graph.op_counts().get("linear", 0) == 0


def test_structural_int8_embeddings_share_the_tied_lm_head_table():
    module = tiny_model("gemma", dtype=torch.float32)  # tied, embedding scale sqrt(hidden)
    result = QuantizeWeightsPass(bits=4, group_size=16, embeddings="int8", lm_head="int8")(module)
    (emb,) = module.graph.find(op="qembedding")
    head = module.graph.find(role="lm_head")[0]
    assert head.op == "qlinear" and emb.inputs[1:] == head.inputs[1:4]  # one packed table
    assert emb.attrs == {"bits": 8, "group_size": 16, "embedding_dim": 32, "num_embeddings": VOCAB,
                         "symmetric": False, "scale": pytest.approx(32 ** 0.5)}
    assert "embed.weight" not in module.weights and emb.output.name == "embed"
    assert result.report["layers"]["embed"] == {"shared_with_lm_head": True}
    assert result.report["bytes"]["float"] > 2.5 * result.report["bytes"]["quantized"]
    untied = tiny_model("tied")  # lm_head kept in float: the table stays for it, with a warning
    report = QuantizeWeightsPass(group_size=16, embeddings="int8")(untied).report
    assert "embed.weight" in untied.weights
    assert "tied lm_head kept in float" in report["warnings"][0]


# -- numeric -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,symmetric", [("gqa", False), ("gemma", True)])
def test_numeric_qlinear_equals_linear_over_dequantized_weights(kind, symmetric):
    """The rewrite is exactly `linear(x, dequant(W))` (bias included): the same graph with each
    weight replaced by its dequantized value gives the same float64 logits."""
    module, ref = tiny_model(kind), tiny_model(kind)
    QuantizeWeightsPass(bits=4, group_size=16, symmetric=symmetric)(module)
    for node in module.graph.find(op="qlinear"):
        a = node.attrs
        has_zp = len(node.inputs) > 3 and node.inputs[3] is not None
        zp = module.weight(node.inputs[3]) if has_zp else None
        w = quant.dequantize(module.weight(node.inputs[1]), module.weight(node.inputs[2]), zp,
                             a["bits"], a["group_size"], torch.float64)
        twin = ref.graph.find(op="linear", role=node.role, layer=node.layer)[0]
        ref.weights[twin.inputs[1].const] = w
    assert rel(logits64(module), logits64(ref)) <= 1e-12
    assert rel(logits64(module), logits64(tiny_model(kind))) > 1e-4  # and it did quantize


@pytest.mark.parametrize("bits,group,tol", [(8, 0, 0.03), (4, 16, 0.3)])
def test_numeric_logit_error_is_bounded_and_reported(bits, group, tol):
    module = tiny_model("llama")
    before = logits64(module)
    check = NumericCheckInstrument(token_batch())
    manager = PassManager([QuantizeWeightsPass(bits=bits, group_size=group)], [check])
    out, report = manager.run(module)
    err = rel(logits64(out), before)
    assert 0 < err < tol
    assert report[0]["numeric"]["max_rel_diff"] == pytest.approx(err, rel=1e-6)
    assert len(report[0]["report"]["layers"]) == 7 * SPECS["llama"].num_layers


def test_numeric_rtn_output_error_uses_calibration_unless_declined():
    ctx = PassContext(calibration=calibration())
    plain = QuantizeWeightsPass(group_size=16)(tiny_model("llama"))
    measured = QuantizeWeightsPass(group_size=16)(tiny_model("llama"), ctx)
    declined = QuantizeWeightsPass(group_size=16, output_error=False)(tiny_model("llama"), ctx)
    for result in (measured, declined):
        assert all(torch.equal(result.module.weights[k], plain.module.weights[k])
                   for k in plain.module.weights)
    assert all("rel_error" in e for e in measured.report["layers"].values())
    assert declined.report["layers"] == plain.report["layers"]
    assert "calibration_tokens" not in declined.report


def test_numeric_int8_embedding_rows_dequantize_exactly():
    module = tiny_model("llama")
    table = module.weights["embed.weight"].clone()
    QuantizeWeightsPass(group_size=16, embeddings="int8", symmetric=True, roles=())(module)
    (emb,) = module.graph.find(op="qembedding")
    qw = quantizers.rtn(table, 8, 16, symmetric=True)
    ids = token_batch()
    out = Interpreter(module, torch.float64).run(
        default_feeds(module, ids, None, torch.float64), capture=["embed"])["embed"]
    assert torch.equal(out, qw.dequantize()[ids])
    assert (out - table[ids]).abs().max() <= qw.scales.max() / 2 + 1e-12


def test_numeric_gptq_beats_rtn_on_correlated_inputs():
    calib = calibration()
    for act_order in (False, True):
        gptq = QuantizeWeightsPass(method="gptq", bits=4, group_size=16, act_order=act_order)(
            correlated_model(), PassContext(calibration=calib)).report
        rtn = QuantizeWeightsPass(method="rtn", bits=4, group_size=16)(
            correlated_model(), PassContext(calibration=calib)).report
        assert gptq["calibration_tokens"] == 128 and not gptq["warnings"]
        for name, entry in gptq["layers"].items():
            assert entry["rel_error"] < entry["rtn_rel_error"], name
        assert gptq["mean_rel_error"] < 0.75 * rtn["mean_rel_error"]


def test_per_linear_formats_by_role_label_and_lm_head_in_one_gptq_pass():
    """Mixed formats: a role at int8, one layer's linear at int8 per channel (its label wins over
    its role's entry), the lm_head in groups of 32, the rest int4 g16; the int8 ones come back
    with a much smaller output error than at int4, a linear left alone exactly as without."""
    calib = calibration()
    mixed = QuantizeWeightsPass(method="gptq", bits=4, group_size=16, lm_head="int4",
                                per_linear={"attn.v_proj": (8, 16), "mlp.down_proj": (4, 32),
                                            "layers.1.mlp.down_proj": (8, 0), "lm_head": (4, 32)})
    module = correlated_model()
    report = mixed(module, PassContext(calibration=calib)).report
    plain = QuantizeWeightsPass(method="gptq", bits=4, group_size=16, lm_head="int4")(
        correlated_model(), PassContext(calibration=calib)).report
    want = {"layers.0.attn.v_proj": (8, 16), "layers.1.attn.v_proj": (8, 16),
            "layers.0.mlp.down_proj": (4, 32), "layers.1.mlp.down_proj": (8, 48), "lm_head": (4, 32)}
    for node in module.graph.find(op="qlinear"):
        name = f"layers.{node.layer}.{node.role}" if node.layer is not None else node.role
        assert (node.attrs["bits"], node.attrs["group_size"]) == want.get(name, (4, 16)), name
    assert module.config.extra["quantization"]["weights"]["per_linear"]["lm_head"] == [4, 32]
    for name in ("layers.0.attn.v_proj", "layers.1.mlp.down_proj"):
        assert report["layers"][name]["rel_error"] < 0.2 * plain["layers"][name]["rel_error"]
    assert report["layers"]["layers.0.attn.q_proj"] == plain["layers"]["layers.0.attn.q_proj"]
    again = make_pass("quantize_weights", {"per_linear": {"mlp.down_proj": [4, 256]}})
    assert again.per_linear == {"mlp.down_proj": (4, 256)} and hash(again) == hash(again)


def test_negative_per_linear_that_matches_nothing_or_is_no_format_is_refused():
    module = tiny_model("llama")
    snap = snapshot(module)
    with pytest.raises(PassError, match=r"per_linear \['layers.7.mlp.down_proj'\] match no "
                                        "selected linear"):
        QuantizeWeightsPass(group_size=16, per_linear={"layers.7.mlp.down_proj": (8, 16)})(module)
    with pytest.raises(PassError, match=r"per_linear \['attn.v_proj', 'lm_head'\] match no"):
        QuantizeWeightsPass(group_size=16, roles=("attn.q_proj",),
                            per_linear={"attn.v_proj": (8, 16), "lm_head": (4, 16)})(module)
    assert unchanged(module, snap)
    with pytest.raises(PassError, match=r"per_linear 'attn.v_proj' = \[3, 16\]; bits 4 or 8"):
        make_pass("quantize_weights", {"per_linear": {"attn.v_proj": [3, 16]}})
    with pytest.raises(PassError, match=r"per_linear 'attn.v_proj' = \[4, 96\]"):
        QuantizeWeightsPass(per_linear={"attn.v_proj": (4, 96)})


def test_numeric_hessian_samples_uses_the_first_calibration_rows():
    """hessian_samples = 2 of 4 rows gives exactly GPTQ on those 2 rows."""
    calib = calibration()
    cut = QuantizeWeightsPass(method="gptq", bits=4, group_size=16, hessian_samples=2)
    a, b = correlated_model(), correlated_model()
    report = cut(a, PassContext(calibration=calib)).report
    QuantizeWeightsPass(method="gptq", bits=4, group_size=16)(
        b, PassContext(calibration=calib[:2]))
    assert report["calibration_tokens"] == 2 * calib.shape[1]
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)


def test_numeric_float_zero_points_gptq_and_onnx(tmp_path):
    module = correlated_model()
    result = QuantizeWeightsPass(method="gptq", group_size=16, float_zero_points=True,
                                 lm_head="int8")(module, PassContext(calibration=calibration()))
    q = module.graph.find(role="attn.q_proj", layer=0)[0]
    assert q.inputs[3].dtype == "f32" and q.inputs[3].shape == (32, 2)
    head = module.graph.find(role="lm_head")[0]
    assert head.attrs["bits"] == 8 and head.inputs[3].dtype == "u8"  # int8 keeps integer zeros
    assert result.report["mean_rel_error"] < result.report["mean_rtn_rel_error"]
    ids = token_batch()
    ref = run_logits(module, ids)["logits"].numpy()
    assert np.abs(onnx_logits(module, ids, tmp_path) - ref).max() <= 1e-4 * np.abs(ref).max()


def test_numeric_gptq_with_identity_hessian_is_rtn():
    """With H = I no error is fed forward, so GPTQ rounds exactly as RTN does (every option)."""
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for group, sym, act, clip in [(16, False, False, False), (64, True, True, False),
                                  (16, False, True, True)]:
        q, info = quantizers.gptq(w, torch.eye(64), 4, group, symmetric=sym, act_order=act, clip=clip,
                             block_size=32)
        r = quantizers.rtn(w, 4, group, symmetric=sym, clip=clip)
        assert torch.equal(q.codes, r.codes) and torch.equal(q.scales, r.scales), (group, sym, act)
        assert info.dead_inputs == 0


def test_numeric_gptq_gives_rtn_on_its_static_groups_bit_for_bit():
    """With act-order the static groups' parameters are RTN's: GPTQ hands that RTN result back
    (the report's comparison then needs no second clip search), equal to rtn() in every field,
    partial last group included; with a dead input (its weights zeroed first) it gives none."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(24, 72, generator=g, dtype=torch.float64)
    x = torch.randn(200, 72, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 72)
    h = 2 * x.T @ x / 200
    for group, sym, clip, fz in [(32, False, True, False), (16, True, True, False),
                                 (32, False, False, True), (64, True, False, False)]:
        _, info = quantizers.gptq(w, h, 4, group, symmetric=sym, clip=clip, act_order=True,
                                  float_zero=fz)
        r = quantizers.rtn(w, 4, group, symmetric=sym, clip=clip, float_zero=fz)
        for field in ("codes", "scales", "zeros"):
            assert torch.equal(getattr(info.rtn, field), getattr(r, field)), (group, sym, field)
    x[:, 3] = 0.0
    assert quantizers.gptq(w, 2 * x.T @ x / 200, 4, 32, act_order=True)[1].rtn is None
    assert quantizers.gptq(w, h, 4, 32, act_order=False)[1].rtn is None


def test_structural_fit_groups_takes_the_largest_unpadded_group():
    assert [quantizers.fitted_group(g, k) for g, k in [(128, 576), (128, 1536), (128, 64),
            (64, 48), (32, 48), (128, 200), (128, 2048)]] == [64, 128, 64, 48, 16, 128, 128]
    fitted = tiny_model("llama")  # hidden 32, intermediate 48: down_proj's 48 inputs
    QuantizeWeightsPass(group_size=32, fit_groups=True, embeddings="int8")(fitted)
    plain = tiny_model("llama")
    QuantizeWeightsPass(group_size=32, embeddings="int8")(plain)
    for module, down in ((fitted, 16), (plain, 32)):  # plain: a partial last group of 16
        groups = {n.role: n.attrs["group_size"] for n in module.graph.find(op="qlinear")}
        assert groups["mlp.down_proj"] == down and groups["attn.q_proj"] == 32
    assert fitted.graph.find(op="qembedding")[0].attrs.get("group_size", 32) == 32


def test_numeric_symmetric_int4_uses_the_signed_max_grid():
    """4-bit symmetric groups: the value of largest magnitude m is code 0 (scale m / -8 in
    float32, negative when m is positive), the others within half a step unless past the top of
    the grid (at most one step); the whole [-8, 7] grid is used, so the error is below the absmax
    grid's (2 * absmax / 15) on Gaussian weights."""
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    q = quantizers.rtn(w, 4, 32, symmetric=True)
    groups = w.reshape(64, 4, 32)
    at = groups.abs().argmax(-1, keepdim=True)
    m = torch.gather(groups, -1, at)[..., 0]
    assert torch.equal(q.scales, (m / -8).to(torch.float32))
    assert bool((torch.gather(q.codes.reshape(64, 4, 32), -1, at) == 0).all())
    step = q.scales.abs().to(torch.float64)[..., None]
    err = (q.dequantize() - w).reshape(64, 4, 32).abs()
    inside = groups / q.scales.to(torch.float64)[..., None] <= 7.5
    assert bool((err <= step + 1e-12).all()) and bool((err[inside] <= (step / 2).expand_as(
        err)[inside] + 1e-12).all())
    absmax = 2 * groups.abs().amax(-1, keepdim=True) / 15
    old = (torch.clamp(torch.round(groups / absmax) + 8, 0, 15) - 8) * absmax
    assert q.rel_error(w) < float((old - groups).norm() / groups.norm())
    q8 = quantizers.rtn(w, 8, 32, symmetric=True)  # 8 bits keep positive absmax scales
    assert bool((q8.scales > 0).all())


def test_numeric_gptq_dead_inputs_and_few_tokens():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = torch.randn(100, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x[:, 5] = 0.0
    q, info = quantizers.gptq(w, 2 * x.T @ x / 100, 4, 16)
    assert info.dead_inputs == 1 and bool((q.dequantize()[:, 5] == 0).all())
    module = tiny_model("llama")
    few = QuantizeWeightsPass(method="gptq", group_size=16)(
        module, PassContext(calibration=calibration(batch=1, seq=20)))
    assert any("dampening raised to 0.1" in w for w in few.report["warnings"])
    assert all(e["damp"] >= 0.1 for e in few.report["layers"].values())


def test_numeric_onnx_runtime_runs_the_quantized_graph(tmp_path):
    module = tiny_model("gqa", dtype=torch.float32)
    QuantizeWeightsPass(method="gptq", bits=4, group_size=16, lm_head="int8", embeddings="int8")(
        module, PassContext(calibration=calibration()))
    assert len(module.graph.find(op="qembedding")) == 1
    ids = token_batch()
    ref = run_logits(module, ids)["logits"].numpy()
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        logits = onnx_logits(module, ids, tmp_path, level)
        assert np.abs(logits - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_builtin_recipes():
    from splice.recipe import Recipe

    w4 = Recipe.named("w4_gptq")
    (p,) = w4.passes
    assert (p.method, p.bits, p.group_size, p.symmetric) == ("gptq", 4, 128, False)
    assert (w4.calibration_samples, w4.calibration_seq_len) == (128, 512)
    assert Recipe.named("w4_rtn").passes[0].method == "rtn"
    rot = Recipe.named("w4_gptq_rotate")
    assert [p.name for p in rot.passes] == ["fold_norms", "rotate_inputs", "rotate",
                                            "quantize_weights"]
    q = rot.passes[-1]
    assert (q.method, q.act_order, q.clip_search) == ("gptq", True, True)
    assert rot.calibration_samples == 128
    module = tiny_model("llama")
    calib = torch.randint(0, module.config.vocab_size, (2, 16))
    passes = rot.build()  # the tiny model's linears are narrower than 128: groups of 16
    passes[-1] = dataclasses.replace(passes[-1], group_size=16)
    out, report = PassManager(passes).run(module, PassContext(calibration=calib))
    assert out.graph.op_counts()["qlinear"] == 14 and out.graph.op_counts()["hadamard"] > 0
    r12 = Recipe.named("w4_gptq_rotate_r12")  # the same without R4: no online hadamard
    passes = r12.build()
    passes[-1] = dataclasses.replace(passes[-1], group_size=16)
    out, _ = PassManager(passes).run(tiny_model("llama"), PassContext(calibration=calib))
    assert out.graph.op_counts()["qlinear"] == 14 and "hadamard" not in out.graph.op_counts()
    assert r12.calibration_samples == 128
    (w8,) = Recipe.named("w8").passes
    assert (w8.bits, w8.group_size) == (8, 0)
    module = tiny_model("llama")
    out, report = PassManager(Recipe.named("w8").build()).run(module)
    assert report[0]["modified"] and out.graph.op_counts()["qlinear"] == 14


# -- negative ----------------------------------------------------------------------------------

def test_negative_unsupported_bits_and_settings():
    with pytest.raises(PassError, match="int3 is not supported; bits must be 4 or 8"):
        QuantizeWeightsPass(bits=3)
    with pytest.raises(PassError, match="int3 is not supported"):
        make_pass("quantize_weights", {"bits": 3})
    with pytest.raises(PassError, match="method 'awq' is not supported; accepted: 'rtn', 'gptq'"):
        QuantizeWeightsPass(method="awq")
    with pytest.raises(PassError, match="group_size 96 is not supported"):
        QuantizeWeightsPass(group_size=96)
    with pytest.raises(PassError, match="lm_head 'int2'; accepted: keep, int8, int4"):
        QuantizeWeightsPass(lm_head="int2")
    with pytest.raises(PassError, match="embeddings 'int2'; accepted: keep, int8, int4"):
        QuantizeWeightsPass(embeddings="int2")
    with pytest.raises(PassError, match="scale_dtype 'bfloat16'; accepted: float32, float16"):
        QuantizeWeightsPass(scale_dtype="bfloat16")
    with pytest.raises(PassError, match="float_zero_points needs asymmetric 4-bit weights"):
        QuantizeWeightsPass(float_zero_points=True, symmetric=True)
    with pytest.raises(PassError, match="hessian_samples = -1; it must be >= 0"):
        QuantizeWeightsPass(hessian_samples=-1)


def test_negative_group_larger_than_in_features_leaves_the_module_alone():
    module = tiny_model("llama")
    snap = snapshot(module)
    with pytest.raises(PassError, match=r"group_size 64 exceeds the in_features of "
                                        r"layers.0.attn.q_proj \(in_features 32\), "):
        QuantizeWeightsPass(group_size=64)(module)
    assert unchanged(module, snap)


def test_negative_gptq_needs_calibration():
    module = tiny_model("llama")
    snap = snapshot(module)
    with pytest.raises(PassError, match="quantize_weights needs at least 1 calibration tokens"):
        QuantizeWeightsPass(method="gptq", group_size=16)(module)
    assert unchanged(module, snap)


def test_negative_no_selected_linears_changes_nothing():
    module = tiny_model("llama")
    snap = snapshot(module)
    result = QuantizeWeightsPass(group_size=16, roles=("mlp.no_such_proj",))(module)
    assert not result.modified and result.report["quantized"] == []
    assert unchanged(module, snap)


# -- idempotent --------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_idempotent_second_run_changes_nothing(method):
    module = tiny_model("gqa")
    p = QuantizeWeightsPass(method=method, group_size=16, lm_head="int8", embeddings="int8",
                            roles=DECODER_LINEARS)
    ctx = PassContext(calibration=calibration())
    assert p(module, ctx).modified
    snap = snapshot(module)
    again = p(module, ctx)
    assert not again.modified and again.report["quantized"] == []
    assert unchanged(module, snap)
