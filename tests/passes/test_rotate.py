"""rotate: structural, numeric, negative and idempotent tests (STYLE rule 12), plus a property
test over random small shapes that R1 + R2 + R3 + R4 leave the float64 logits unchanged."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from splice.frontend.decoder import DecoderSpec, build_decoder
from splice.frontend.hf import from_transformers
from splice.frontend.hf_families import convert
from splice.ir import Module, run_logits
from splice.ir.hadamard import factorize, hadamard_matrix, random_hadamard
from splice.passes import NumericCheckInstrument, PassContext, PassError, PassManager
from splice.passes.absorb_post_norm import AbsorbPostNormPass
from splice.passes.estimate_patch import EstimatePatchPass
from splice.passes.fold_norms import FoldNormsPass
from splice.passes.fuse_patch import FusePatchPass
from splice.passes.prune_layers import PruneLayersPass
from splice.passes.rotate import RotatePass
from splice.passes.numerics.rotation import apply_hadamard, kron_factors, random_signs
from tests.frontend.test_hf import CONFIGS, ids_for, tiny
from tests.passes.models import SPECS, random_weights, tiny_model, token_batch

log = logging.getLogger(__name__)
DTYPES = {"f64": torch.float64, "f32": torch.float32}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny float64 matmuls: one thread is faster, and much faster on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def logits64(module: Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    return run_logits(module, token_batch() if ids is None else ids, torch.float64)["logits"]


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def folded(kind: str, **kw) -> Module:
    module = tiny_model(kind, **kw)
    assert FoldNormsPass()(module).modified
    return module


def snapshot(module: Module) -> tuple[str, dict[str, torch.Tensor]]:
    return str(module.graph), {k: v.clone() for k, v in module.weights.items()}


def unchanged(module: Module, snap: tuple[str, dict[str, torch.Tensor]]) -> bool:
    text, weights = snap
    return (str(module.graph) == text and weights.keys() == module.weights.keys()
            and all(torch.equal(module.weights[k], v) for k, v in weights.items()))


# -- structural --------------------------------------------------------------------------------

def test_random_signs_are_those_of_random_hadamard():
    for n in (8, 12, 20, 24, 36, 64):
        q = random_signs(n, 7)[:, None] * hadamard_matrix(n)
        assert torch.equal(q, random_hadamard(n, 7))


@pytest.mark.parametrize("n", [2, 8, 12, 20, 96, 576, 1536, 4096])
def test_kron_transform_is_the_ops_matrix(n):
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    torch.testing.assert_close(apply_hadamard(x, n), x @ hadamard_matrix(n), rtol=0, atol=1e-12)
    assert math.prod(kron_factors(n)) == n and max(kron_factors(n)) <= max(64, factorize(n)[0])


def test_structural_weights_and_online_transforms():
    module = folded("gqa")
    spec = SPECS["gqa"]
    w0 = {k: v.clone() for k, v in module.weights.items()}
    counts = module.graph.op_counts()
    result = RotatePass(r3=True, seed=3)(module)
    assert result.modified and result.report["applied"] == ["r1", "r2", "r3", "r4"]
    layers = spec.num_layers
    assert module.graph.op_counts() == {**counts, "hadamard": 3 * layers}  # q, k, down
    q1 = random_hadamard(spec.hidden_size, 3)
    torch.testing.assert_close(module.weights["embed.weight"], w0["embed.weight"] @ q1,
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(module.weights["lm_head.weight"], w0["lm_head.weight"] @ q1,
                               rtol=0, atol=1e-12)
    p = "layers.1."
    # a stream reader: input side only (k is not touched by R2); its bias is not rotated
    torch.testing.assert_close(module.weights[p + "attn.k_proj.weight"],
                               w0[p + "attn.k_proj.weight"] @ q1, rtol=0, atol=1e-12)
    assert torch.equal(module.weights[p + "attn.k_proj.bias"], w0[p + "attn.k_proj.bias"])
    # v_proj: R1 on its input, R2 per kv head on its output rows and bias
    q2 = random_hadamard(spec.head_dim, 4)
    q2v = torch.block_diag(*[q2] * spec.num_kv_heads)
    torch.testing.assert_close(module.weights[p + "attn.v_proj.weight"],
                               q2v.T @ w0[p + "attn.v_proj.weight"] @ q1, rtol=0, atol=1e-12)
    torch.testing.assert_close(module.weights[p + "attn.v_proj.bias"],
                               w0[p + "attn.v_proj.bias"] @ q2v, rtol=0, atol=1e-12)
    # o_proj: R2 per query head on its input columns, R1 on its output rows
    q2o = torch.block_diag(*[q2] * spec.num_heads)
    torch.testing.assert_close(module.weights[p + "attn.o_proj.weight"],
                               q1.T @ w0[p + "attn.o_proj.weight"] @ q2o, rtol=0, atol=1e-12)
    # down_proj: R4's deterministic H on its input, R1 on its output
    h4 = hadamard_matrix(spec.intermediate_size)
    torch.testing.assert_close(module.weights[p + "mlp.down_proj.weight"],
                               q1.T @ w0[p + "mlp.down_proj.weight"] @ h4, rtol=0, atol=1e-12)
    for down in module.graph.find(role="mlp.down_proj"):
        had = down.inputs[0].producer
        assert had.op == "hadamard" and had.role == "mlp.down_proj.hadamard"
        assert had.attrs == {"size": 48, "block": 0, "group": 0, "scale": 1.0}
        assert had.origin == "rotate" and had.layer == down.layer
        assert had.inputs[0].producer.role == "mlp.mul"
    for attn in module.graph.find(op="attention"):
        qh, kh = attn.inputs[0].producer, attn.inputs[1].producer
        assert (qh.role, qh.attrs["group"], qh.attrs["size"]) == ("attn.q_hadamard", 4, 8)
        assert (kh.role, kh.attrs["group"]) == ("attn.k_hadamard", 2)
        assert qh.inputs[0].producer.op == "rotary"
    extra = module.config.extra["rotation"]
    assert extra["r1"]["size"] == 32 and extra["r1"]["seed"] == 3 and extra["r2"]["seed"] == 4
    assert extra["r4"]["factors"] == [12, 4]
    assert result.report["r4"] == {"size": 48, "factors": [12, 4], "block": 0, "layers": 2}


def test_structural_r1_rotates_online_after_post_norms_with_a_scale():
    module = folded("gemma", seed=2)
    spec = SPECS["gemma"]
    w0 = {k: v.clone() for k, v in module.weights.items()}
    counts = module.graph.op_counts()
    result = RotatePass(r2=False, r4=False, seed=5)(module)
    assert result.report["applied"] == ["r1"]
    online = [f"layers.{i}.{r}" for i in range(spec.num_layers)
              for r in ("attn_post_norm", "mlp_post_norm")]
    assert result.report["r1"]["online_post_norms"] == online
    assert module.graph.op_counts() == {**counts, "hadamard": 2 * spec.num_layers}
    signs = random_signs(spec.hidden_size, 5)
    for norm in module.graph.find(op="rms_norm"):
        if "post_norm" not in norm.role:
            continue
        had = norm.output.users()[0]
        assert (had.op, had.role, had.origin) == ("hadamard", norm.role + ".hadamard", "rotate")
        assert had.attrs == {"size": spec.hidden_size, "block": 0, "group": 0, "scale": 1.0}
        assert [u.op for u in had.output.users()] == ["add"] and norm.attrs["offset"] == 0.0
        w = norm.inputs[1].const
        torch.testing.assert_close(module.weights[w], (w0[w] + 1.0) * signs, rtol=0, atol=1e-15)
        lin = norm.inputs[0].producer  # o_proj / down_proj: not rotated on its output side
        assert torch.equal(module.weights[lin.inputs[1].const], w0[lin.inputs[1].const])


def test_structural_tied_head_stays_tied():
    module = folded("tied", unit_final_norm=True)  # all-ones final norm: fold_norms keeps the tie
    head = module.graph.find(role="lm_head")[0]
    assert head.inputs[1] is module.graph.consts["embed.weight"]
    before = logits64(module)
    assert RotatePass()(module).modified
    assert head.inputs[1] is module.graph.consts["embed.weight"]
    assert "lm_head.weight" not in module.weights
    assert rel_diff(logits64(module), before) <= 1e-9


def spec_with(kind: str, **changes) -> DecoderSpec:
    return DecoderSpec(**{**SPECS[kind].__dict__, **changes})


def test_structural_block_diagonal_fallback():
    # 376 = 8 * 47: no Hadamard matrix of that order, the largest order dividing it is 8
    spec = spec_with("llama", intermediate_size=376)
    module = build_decoder(spec, random_weights(spec, 0), origin="test")
    FoldNormsPass()(module)
    before = logits64(module)
    snap = snapshot(module)
    with pytest.raises(PassError, match=r"intermediate size .* is 376, which has no Hadamard "
                                        r"matrix; supported orders .*allow_block=True"):
        RotatePass()(module)
    assert unchanged(module, snap)  # a refusal leaves the module as it was
    result = RotatePass(allow_block=True)(module)
    assert result.report["r4"]["block"] == 8
    assert any("block-diagonal Hadamard spreads outliers" in n for n in result.report["notes"])
    assert {n.attrs["block"] for n in module.graph.find(op="hadamard")} == {8}
    assert rel_diff(logits64(module), before) <= 1e-9


# -- numeric -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(SPECS))
def test_numeric_tiny_models_float64(kind):
    module = tiny_model(kind, seed=1)
    check = NumericCheckInstrument(token_batch(1))
    out, report = PassManager([FoldNormsPass(), RotatePass(r3=True)],
                              [check]).run(module)
    assert report[1]["modified"]
    assert report[1]["numeric"]["max_rel_diff"] <= 1e-9


@pytest.fixture(scope="module")
def hf_modules():
    """family -> ({"f32": module, "f64": module}, ids): each HF model built once and imported
    as it is and in float64."""
    out = {}
    for family in sorted(CONFIGS):
        model = tiny(family)
        f32 = from_transformers(model, source=f"tiny-{family}")
        spec, weights = convert(model)  # the frontend's canonical weights, kept in float64
        f64 = build_decoder(spec, {k: v.double() for k, v in weights.items()}, origin="test")
        out[family] = ({"f32": f32, "f64": f64}, ids_for(model))
    return out


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_numeric_every_family_float64_and_float32(hf_modules, family):
    """fold_norms + R1 + R2 + R4 (Gemma without R1: its post-norms) on every family: the float64
    logits do not move beyond 1e-9; with float32 storage only rounding remains."""
    imported, ids = hf_modules[family]
    gemma = "gemma" in family
    diffs = {}
    for name in ("f64", "f32"):
        module = imported[name].clone()
        assert {t.dtype for t in module.weights.values()} == {DTYPES[name]}
        before = logits64(module, ids)
        out, report = PassManager([FoldNormsPass(), RotatePass(r1=not gemma)]).run(module)
        assert report[1]["report"]["applied"] == (["r2", "r4"] if gemma else ["r1", "r2", "r4"])
        diffs[name] = rel_diff(logits64(out, ids), before)
    log.info("rotate %s: max rel logit diff float64 %.3g, float32 %.3g", family, diffs["f64"],
             diffs["f32"])
    assert diffs["f64"] <= 1e-9
    assert diffs["f32"] <= 1e-5


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_numeric_gemma_r1_online_after_post_norms(hf_modules, family):
    """R1 through Gemma's sandwich post-norms, rotated online after them: exact in float64."""
    imported, ids = hf_modules[family]
    module = imported["f64"].clone()
    before = logits64(module, ids)
    out, report = PassManager([FoldNormsPass(), RotatePass(r3=True)]).run(module)
    assert report[1]["report"]["applied"] == ["r1", "r2", "r3", "r4"]
    assert len(report[1]["report"]["r1"]["online_post_norms"]) == 2 * module.config.num_layers
    assert rel_diff(logits64(out, ids), before) <= 1e-9


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_numeric_gemma_r1_after_absorbing_post_norms(hf_modules, family):
    imported, ids = hf_modules[family]
    module = imported["f64"].clone()
    ctx = PassContext(calibration=ids)
    out, report = PassManager([FoldNormsPass(), AbsorbPostNormPass(max_spread=math.inf,
                                                                   min_tokens=1)]).run(module, ctx)
    before = logits64(out, ids)
    result = RotatePass(r3=True)(out)
    assert result.report["applied"] == ["r1", "r2", "r3", "r4"]
    assert rel_diff(logits64(out, ids), before) <= 1e-9


@settings(max_examples=15, deadline=None)
@given(head_dim=st.sampled_from([4, 8, 12]), heads=st.sampled_from([1, 2, 4]),
       kv_div=st.sampled_from([1, 2, 4]), hidden=st.sampled_from([8, 12, 16, 20, 24, 28, 32, 40]),
       inter=st.sampled_from([8, 12, 16, 20, 24, 36, 40, 48]), qkv_bias=st.booleans(),
       out_bias=st.booleans(), tied=st.booleans(), seed=st.integers(0, 2**16))
def test_property_rotations_preserve_logits(head_dim, heads, kv_div, hidden, inter, qkv_bias,
                                            out_bias, tied, seed):
    kv = heads // kv_div if heads % kv_div == 0 else heads
    spec = DecoderSpec(architecture="Random", vocab_size=64, hidden_size=hidden,
                       intermediate_size=inter, num_layers=2, num_heads=heads, num_kv_heads=kv,
                       head_dim=head_dim, rms_eps=1e-6, max_position=64, qkv_bias=qkv_bias,
                       o_bias=out_bias, mlp_bias=out_bias, tie_embeddings=tied)
    weights = random_weights(spec, seed)
    gen = torch.Generator().manual_seed(seed)
    for i in range(2):
        sizes = {"attn.o_proj": hidden, "mlp.gate_proj": inter, "mlp.up_proj": inter,
                 "mlp.down_proj": hidden} if out_bias else {}
        for name, n in sizes.items():
            weights[f"layers.{i}.{name}.bias"] = torch.randn(n, generator=gen, dtype=torch.float64)
    module = build_decoder(spec, weights, origin="test")
    FoldNormsPass()(module)
    ids = token_batch(seed % 7, batch=2, seq=5)
    before = logits64(module, ids)
    result = RotatePass(r3=True, seed=seed)(module)
    assert result.modified
    assert rel_diff(logits64(module, ids), before) <= 1e-9


def pruned_with_patch(kind: str, strategy: str) -> Module:
    """A 5-layer llama with layers 2-3 pruned and bridged by a linear patch, norms folded."""
    spec = spec_with("llama", num_layers=5)
    module = build_decoder(spec, random_weights(spec, 0), origin="test")
    ctx = PassContext(calibration=token_batch(0, batch=8, seq=16))
    out, _ = PassManager([EstimatePatchPass(kind=kind, start=2, n=2), PruneLayersPass(),
                          FusePatchPass(strategy=strategy), FoldNormsPass()]).run(module, ctx)
    return out


@pytest.mark.parametrize("kind", ["linearpatch", "lstsq"])
def test_numeric_pruned_model_with_a_dense_patch(kind):
    """The stream passes through the patch x @ P, which R1 turns into P' = Q^T P Q."""
    module = pruned_with_patch(kind, "dense")
    patch = module.graph.find(op="matmul", role="patch")[0]
    p0 = module.weight(patch.inputs[1]).clone()
    before = logits64(module)
    assert RotatePass()(module).report["applied"] == ["r1", "r2", "r4"]
    q1 = random_hadamard(SPECS["llama"].hidden_size, 0)
    torch.testing.assert_close(module.weight(patch.inputs[1]), q1.T @ p0 @ q1, rtol=0, atol=1e-12)
    assert rel_diff(logits64(module), before) <= 1e-9


# -- negative ----------------------------------------------------------------------------------

def test_negative_factored_patch_asks_for_a_dense_one():
    module = pruned_with_patch("linearpatch", "fwht")
    snap = snapshot(module)
    with pytest.raises(PassError, match=r"linear patch .* factored form.*fuse_patch with "
                                        r"strategy = \"dense\""):
        RotatePass()(module)
    assert unchanged(module, snap)


def test_negative_refuses_unfolded_norms():
    module = tiny_model("llama")
    snap = snapshot(module)
    with pytest.raises(PassError, match=r"layers\.0\.attn_norm reads the residual stream and still "
                                        r"carries a weight .*put fold_norms before rotate"):
        RotatePass()(module)
    assert unchanged(module, snap)


def test_negative_r1_refuses_post_norms_with_a_scale():
    module = folded("gemma")
    snap = snapshot(module)
    with pytest.raises(PassError, match=r"layers\.0\.attn_post_norm is a post-norm with a "
                                        r"per-channel scale.*online.*absorb_post_norm.*r1=False"):
        RotatePass(post_norms="refuse")(module)
    assert unchanged(module, snap)
    assert RotatePass(r1=False).call(module, PassContext()).modified  # R2 and R4 still apply


def test_negative_unknown_post_norms_setting():
    with pytest.raises(PassError, match=r"post_norms 'absorb'; accepted: online, refuse"):
        RotatePass(post_norms="absorb")


def test_negative_nothing_requested_changes_nothing():
    module = folded("llama")
    snap = snapshot(module)
    result = RotatePass(r1=False, r2=False, r4=False)(module)
    assert not result.modified and result.report["applied"] == []
    assert unchanged(module, snap) and "rotation" not in module.config.extra


# -- idempotent --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(SPECS))
def test_idempotent_second_run_changes_nothing(kind):
    module = folded(kind)
    rot = RotatePass(r3=True)  # Gemma: R1 with online transforms after its post-norms
    assert rot(module).modified
    snap = snapshot(module)
    again = rot(module)
    assert not again.modified and again.report["applied"] == []
    assert again.report["already_applied"] == [r for r in ("r1", "r2", "r3", "r4")
                                               if getattr(rot, r)]
    assert unchanged(module, snap)


def test_idempotent_rotations_added_one_at_a_time():
    module = folded("llama")
    before = logits64(module)
    assert RotatePass(r2=False, r4=False)(module).report["applied"] == ["r1"]
    assert RotatePass(r2=False)(module).report["applied"] == ["r4"]
    assert RotatePass()(module).report["applied"] == ["r2"]
    snap = snapshot(module)
    assert not RotatePass()(module).modified and unchanged(module, snap)
    assert len(module.graph.find(op="hadamard")) == SPECS["llama"].num_layers
    assert rel_diff(logits64(module), before) <= 1e-9
