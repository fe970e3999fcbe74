"""LinearPatch in rotate's R1 basis (estimate_patch basis = "r1") and its collapse to one channel
scale under rotate: fuse_patch strategy (c) of the LinearPatch issue. Structural, numeric (float64),
negative and idempotent tests (STYLE 12), on tests/tiny.py's random decoders in float64."""

from __future__ import annotations

import pytest
import torch

from splice.frontend.decoder import build_decoder
from splice.ir import Interpreter, Module, default_feeds, run_logits
from splice.ir.hadamard import random_hadamard
from splice.passes import NumericCheckInstrument, PassContext, PassError, PassManager
from splice.passes.distill_patch import DistillPatchPass
from splice.passes.estimate_patch import EstimatePatchPass, find_patches
from splice.passes.fold_norms import FoldNormsPass
from splice.passes.fuse_patch import FusePatchPass
from splice.passes.prune_layers import PruneLayersPass
from splice.passes.rotate import RotatePass
from splice.passes.numerics.rotation import random_signs
from splice.recipe import Recipe
from tests.passes.test_prune import bypass_logits
from tests.tiny import VOCAB, tiny_spec, tiny_weights


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model(seed: int = 0, layers: int = 4, **changes) -> Module:
    """tests.tiny's decoder (hidden 64 unless changed) with its weights in float64, so that an
    exact pass can be checked to 1e-12 without storage rounding."""
    spec = tiny_spec(num_layers=layers, **changes)
    weights = {k: v.to(torch.float64) if v.is_floating_point() else v
               for k, v in tiny_weights(spec, seed).items()}
    return build_decoder(spec, weights, origin="tests.patch_rotated")


def ctx(seed: int = 0) -> PassContext:
    ids = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(seed))
    return PassContext(calibration=ids, seed=seed, precision=torch.float64)


def ids(seed: int = 5) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))


def logits64(module: Module) -> torch.Tensor:
    return run_logits(module, ids(), torch.float64)["logits"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def pipeline(module: Module, c: PassContext, *, basis: str = "r1", basis_seed: int = 0,
             rotate_seed: int | None = 0) -> Module:
    """estimate(linearpatch, basis) -> prune -> fuse(auto) -> fold_norms [-> rotate]."""
    EstimatePatchPass(kind="linearpatch", start=1, n=2, basis=basis, basis_seed=basis_seed)(
        module, c)
    for p in (PruneLayersPass(), FusePatchPass(strategy="auto"), FoldNormsPass()):
        p(module, c)
    if rotate_seed is not None:
        RotatePass(seed=rotate_seed)(module, c)
    return module


def patch_nodes(module: Module) -> list[str]:
    return [n.op for n in module.graph.nodes if n.role == "patch"]


# -- structural --------------------------------------------------------------------------------

def test_structural_estimate_emits_the_signed_chain_in_r1_basis():
    module = model()
    r = EstimatePatchPass(kind="linearpatch", start=1, n=2, basis="r1", basis_seed=3)(
        module, ctx()).report
    (p,) = find_patches(module.graph)
    assert r["form"] == p.form == "signed" and p.dangling(module.graph)
    assert [n.op for n in p.nodes] == ["channel_scale", "hadamard", "channel_scale", "hadamard",
                                       "channel_scale"]
    assert all(n.role == "patch" and n.origin == "estimate_patch" for n in p.nodes)
    assert p.nodes[0].inputs[1] is p.nodes[4].inputs[1]  # one sigma weight, read twice
    assert sorted(k for k in module.weights if k.startswith("patch.")) == ["patch.1.scale",
                                                                           "patch.1.signs"]
    assert torch.equal(p.signs(module), random_signs(64, 3))
    assert r["basis"] == {"basis": "r1", "size": 64, "seed": 3}
    assert module.config.extra["patch_basis"] == {"patch.1": {"basis": "r1", "size": 64,
                                                              "seed": 3}}
    q = random_hadamard(64, 3)
    torch.testing.assert_close(p.matrix(module), (q * p.scale(module)) @ q.T, rtol=0, atol=1e-15)


def test_structural_rotate_collapses_the_patch_to_one_channel_scale():
    module = pipeline(model(), ctx(), rotate_seed=None)
    assert patch_nodes(module) == ["channel_scale", "hadamard", "channel_scale", "hadamard",
                                   "channel_scale"]  # fuse_patch(auto) kept it
    s = module.weights["patch.1.scale"].clone()
    hadamards = len(module.graph.find(op="hadamard"))
    result = RotatePass()(module, ctx())
    (p,) = find_patches(module.graph)
    assert result.modified and p.form == "scale" and patch_nodes(module) == ["channel_scale"]
    assert p.nodes[0].origin == "rotate" and p.y.name == "patch.1"
    assert p.x.producer is not None and p.x.producer.op == "add"  # on the residual stream
    assert "patch.1.signs" not in module.weights and torch.equal(module.weights["patch.1.scale"], s)
    assert sum(module.weights[v.const].numel() for n in p.nodes for v in n.inputs[1:]) == 64
    # the patch's two transforms are gone; R4 added one before each of the 2 kept down_projs
    assert len(module.graph.find(op="hadamard")) == hadamards - 2 + 2
    assert result.report["r1"]["patches_to_channel_scale"] == ["patch.1"]
    assert module.config.extra["rotation"]["r1"]["patches_to_channel_scale"] == ["patch.1"]


def test_structural_recipe_prune4_patch_rotate():
    recipe = Recipe.named("prune4_patch_rotate")
    assert [p.name for p in recipe.passes] == ["select_layers", "estimate_patch", "prune_layers",
                                              "fuse_patch", "fold_norms", "rotate"]
    out, report = PassManager(recipe.build()).run(model(seed=8, layers=6), ctx(8))
    assert out.config.num_layers == 2 and all(r["modified"] for r in report[:3])
    (p,) = find_patches(out.graph)
    assert p.form == "scale" and patch_nodes(out) == ["channel_scale"]


# -- numeric -----------------------------------------------------------------------------------

@pytest.mark.parametrize("hidden, heads", [(64, 4), (72, 4)])  # Sylvester 64, Paley II 36 x 2
def test_numeric_collapse_is_exact_in_float64(hidden, heads):
    c = ctx(1)
    unrotated = pipeline(model(seed=1, hidden_size=hidden, num_heads=heads), c,
                         rotate_seed=None)
    rotated = unrotated.clone()
    check = NumericCheckInstrument(ids(), rtol=1e-12)
    _, report = PassManager([RotatePass()], [check]).run(rotated, c)
    assert report[0]["numeric"]["max_rel_diff"] <= 1e-12
    assert patch_nodes(rotated) == ["channel_scale"]
    assert rel(logits64(rotated), logits64(unrotated)) <= 1e-12


def test_numeric_signed_chain_computes_its_matrix_and_s_is_the_formula():
    module, c = model(seed=2), ctx(2)
    feeds = default_feeds(module, c.calibration, None, torch.float64)
    out = Interpreter(module, torch.float64).run(feeds, capture=["h.0", "h.2"])
    xi, xo = (out[k].reshape(-1, 64) for k in ("h.0", "h.2"))
    EstimatePatchPass(kind="linearpatch", start=1, n=2, basis="r1", holdout=0.0)(module, c)
    (p,) = find_patches(module.graph)
    q = random_hadamard(64, 0)
    want = (xo @ q).abs().mean(0) / (xi @ q).abs().mean(0)
    torch.testing.assert_close(p.scale(module), want, rtol=1e-12, atol=0)
    expect = bypass_logits(module, ids(), 1, 2, patch=p.matrix(module))
    PruneLayersPass()(module)
    torch.testing.assert_close(logits64(module), expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("strategy", ["dense", "fwht", "auto"])
def test_numeric_fuse_keeps_or_multiplies_out_exactly(strategy):
    module = model(seed=3)
    c = ctx(3)
    EstimatePatchPass(kind="linearpatch", start=1, n=2, basis="r1")(module, c)
    PruneLayersPass()(module, c)
    before = logits64(module)
    result = FusePatchPass(strategy=strategy)(module, c)
    (p,) = find_patches(module.graph)
    assert result.modified == (strategy == "dense")
    assert p.form == ("dense" if strategy == "dense" else "signed")
    assert rel(logits64(module), before) <= 1e-12


def test_fold_works_from_the_signed_patch_matrix():
    module, c = model(seed=3), ctx(3)
    EstimatePatchPass(kind="linearpatch", start=1, n=2, basis="r1")(module, c)
    PruneLayersPass()(module, c)
    entry = FusePatchPass(strategy="fold")(module, c).report["patches"][0]
    assert entry["from"] == "signed" and entry["to"] == "layers.0.mlp.down_proj"
    assert not find_patches(module.graph) and not any(k.startswith("patch.") for k in module.weights)
    errors = entry["calibration_errors"]
    assert errors["fold"]["token_rel"] < errors["unpatched"]["token_rel"]


def test_numeric_a_collapsed_patch_multiplies_out_and_stays_a_scale():
    module = pipeline(model(seed=4), ctx(4))
    before = logits64(module)
    assert not FusePatchPass(strategy="auto")(module).modified  # a channel scale is kept
    assert FusePatchPass(strategy="dense")(module).modified
    (p,) = find_patches(module.graph)
    assert p.form == "dense" and rel(logits64(module), before) <= 1e-12


def test_numeric_distill_trains_s_only_and_the_patch_still_collapses():
    module, c = model(seed=9), ctx(9)
    EstimatePatchPass(kind="linearpatch", start=1, n=2, basis="r1")(module, c)
    signs = module.weights["patch.1.signs"].clone()
    r = DistillPatchPass(samples=8, seq_len=16, steps=5, batch=2, top_k=8)(module, c).report
    assert r["trained"] == "signed" and r["parameters"] == 64
    assert torch.equal(module.weights["patch.1.signs"], signs)
    for p in (PruneLayersPass(), FusePatchPass(), FoldNormsPass()):
        p(module, c)
    before = logits64(module)
    RotatePass()(module, c)
    assert patch_nodes(module) == ["channel_scale"] and rel(logits64(module), before) <= 1e-12


# -- negative ----------------------------------------------------------------------------------

@pytest.mark.parametrize("basis, basis_seed, match", [
    ("hadamard", 0, r"factored form.*fuse_patch"),
    ("r1", 1, r"factored form.*signs are not R1's \(estimate_patch basis_seed 1, rotate seed 0\)"),
])
def test_negative_patch_in_another_basis_is_refused(basis, basis_seed, match):
    module = pipeline(model(), ctx(), basis=basis, basis_seed=basis_seed, rotate_seed=None)
    text = str(module.graph)
    with pytest.raises(PassError, match=match):
        RotatePass()(module, ctx())
    assert str(module.graph) == text and "rotation" not in module.config.extra


def test_negative_seed_matching_the_patch_collapses_it():
    """The same patch as above (basis_seed 1) collapses under rotate with seed 1."""
    module = pipeline(model(), ctx(), basis_seed=1, rotate_seed=1)
    assert patch_nodes(module) == ["channel_scale"]


def test_negative_dense_patch_is_rotated_as_today_not_collapsed():
    module = model()
    EstimatePatchPass(kind="linearpatch", start=1, n=2, basis="r1")(module, ctx())
    for p in (PruneLayersPass(), FusePatchPass(strategy="dense"), FoldNormsPass()):
        p(module, ctx())
    before = logits64(module)
    r = RotatePass()(module, ctx()).report
    assert patch_nodes(module) == ["matmul"] and "patches_to_channel_scale" not in r["r1"]
    assert rel(logits64(module), before) <= 1e-12


@pytest.mark.parametrize("settings, changes, match", [
    (dict(basis="r2"), {}, r"basis 'r2'; accepted: hadamard, r1"),
    (dict(basis="r1", basis_seed=1.5), {}, "basis_seed = 1.5"),
    # 48 = Paley I 12 x 4: H is not symmetric, so the hadamard op cannot apply H^T
    (dict(basis="r1"), dict(hidden_size=48, num_heads=4), "48 has a non-symmetric Hadamard"),
])
def test_negative_estimate_settings(settings, changes, match):
    module = model(**changes)
    with pytest.raises(PassError, match=match):
        EstimatePatchPass(kind="linearpatch", start=1, n=2, **settings)(module, ctx())
    assert not find_patches(module.graph)


def test_negative_lstsq_ignores_the_basis():
    module = model()
    r = EstimatePatchPass(kind="lstsq", start=1, n=2, basis="r1")(module, ctx()).report
    assert r["form"] == "dense" and "basis" not in r
    assert "patch_basis" not in module.config.extra


# -- idempotent --------------------------------------------------------------------------------

def test_idempotent():
    module = model()
    assert EstimatePatchPass(kind="linearpatch", start=1, n=2, basis="r1")(module, ctx()).modified
    text = str(module.graph)
    assert not EstimatePatchPass(kind="linearpatch", start=1, n=2, basis="r1")(
        module, ctx()).modified
    assert str(module.graph) == text
    pipeline(module, ctx(), rotate_seed=0)
    text, weights = str(module.graph), {k: v.clone() for k, v in module.weights.items()}
    for p in (RotatePass(), FusePatchPass(strategy="auto"), FusePatchPass(strategy="fwht")):
        assert not p(module, ctx()).modified
    assert str(module.graph) == text
    assert all(torch.equal(module.weights[k], v) for k, v in weights.items())


# -- lowering ----------------------------------------------------------------------------------

@pytest.mark.parametrize("rotate", [False, True])
def test_signed_and_collapsed_patches_run_in_onnx_runtime(tmp_path, rotate):
    """The signed chain (before rotate) and the channel scale (after) lower and match the
    reference interpreter, with ONNX Runtime's graph optimisations off and on."""
    from splice.backends.onnx import lower, save
    from tests.backends.test_onnx import compare, reference_trajectory, session

    spec = tiny_spec(num_layers=4)
    module = build_decoder(spec, tiny_weights(spec, 6), origin="tests.patch_rotated")  # float32
    pipeline(module, ctx(6), rotate_seed=0 if rotate else None)
    assert patch_nodes(module) == (["channel_scale"] if rotate else
                                   ["channel_scale", "hadamard", "channel_scale", "hadamard",
                                    "channel_scale"])
    path = save(lower(module), tmp_path)
    traj = reference_trajectory(module, ids(7)[:1, :8], 4)
    for level in ("off", "on"):
        assert compare(session(path, level), module, traj) <= 1e-4
