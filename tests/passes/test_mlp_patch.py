"""The MLP patch (estimate_patch kind "mlp"): the least-squares patch T and a gated MLP block on
the stream after it, trained together by regression on the calibration streams. Structural,
numeric (float64), negative and idempotent tests (STYLE 12), and its way through prune_layers,
fuse_patch, rotate and the ONNX backend, on tests/tiny.py's random decoders."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from splice.frontend.decoder import build_decoder
from splice.ir import Module
from splice.passes import PassError
from splice.passes.distill_patch import DistillPatchPass
from splice.passes.estimate_patch import EstimatePatchPass, find_patches
from splice.passes.numerics.mlp_patch import MLPWeights
from splice.passes.fold_norms import FoldNormsPass
from splice.passes.fuse_patch import FusePatchPass
from splice.passes.prune_layers import PruneLayersPass
from splice.passes.rotate import RotatePass
from tests.passes.test_patch_rotated import (  # noqa: F401 (one_thread: autouse)
    ctx, ids, logits64, model, one_thread, rel)
from tests.tiny import tiny_spec, tiny_weights

FAST = dict(mlp_rank=16, mlp_steps=150, mlp_lr=3e-3, mlp_batch=128)


def estimated(seed: int = 0, dtype: torch.dtype = torch.float64, **settings) -> tuple[Module, dict]:
    module = model(seed) if dtype == torch.float64 else build_decoder(
        tiny_spec(num_layers=4), tiny_weights(tiny_spec(num_layers=4), seed), origin="tests")
    r = EstimatePatchPass(kind="mlp", start=1, n=2, **{**FAST, **settings})(module, ctx(seed))
    return module, r.report


def weights_of(module: Module) -> MLPWeights:
    dense, mlp = find_patches(module.graph)
    w = {n.op + str(i): module.weight(n.inputs[1]) for i, n in enumerate(mlp.nodes)
         if n.op == "linear"}
    return MLPWeights(module.weight(dense.nodes[0].inputs[1]), w["linear1"], w["linear2"],
                      w["linear5"])


# -- structural --------------------------------------------------------------------------------

def test_structural_a_dense_patch_then_an_mlp_block_wait_on_the_stream():
    module, report = estimated()
    dense, mlp = find_patches(module.graph)
    assert (dense.form, mlp.form) == ("dense", "mlp") and mlp.x is dense.y
    assert [n.op for n in mlp.nodes] == ["rms_norm", "linear", "linear", "silu", "mul", "linear",
                                        "add"]
    assert mlp.dangling(module.graph) and not dense.dangling(module.graph)
    assert report["kind"] == report["form"] == "mlp" and report["patch"] == mlp.y.name
    assert set(report["holdout_errors"]) == {"none", "lstsq", "mlp"}
    assert report["mlp"]["parameters"] == 64 * 64 + 3 * 16 * 64
    assert dense.nodes[0].inputs[0].name == "layers.0.out" or dense.x.producer is not None


# -- numeric -----------------------------------------------------------------------------------

def test_numeric_estimate_is_exact_and_reports_the_held_out_errors():
    before = logits64(model())
    module, report = estimated()
    assert rel(logits64(module), before) == 0.0  # the patch waits: nothing reads it yet
    err = report["holdout_errors"]
    assert all(0 < err[k]["token_rel"] < 1 for k in ("none", "lstsq", "mlp"))


def test_numeric_fit_recovers_a_gated_mlp_least_squares_cannot():
    """Streams made by a known MLP patch: the trained one comes close on held-out tokens, far
    closer than the best linear map."""
    from splice.passes.numerics.mlp_patch import fit_mlp_patch
    from splice.passes.numerics.patch_fits import ridge_lstsq, stream_errors

    gen = torch.Generator().manual_seed(0)
    d, r = 16, 8
    truth = MLPWeights(torch.eye(d) + 0.1 * torch.randn(d, d, generator=gen),
                       torch.randn(r, d, generator=gen), torch.randn(r, d, generator=gen),
                       0.5 * torch.randn(d, r, generator=gen))
    x = torch.randn(3000, d, generator=gen, dtype=torch.float64)
    y = truth(x)
    fit, hold = slice(0, 2500), slice(2500, None)
    t = ridge_lstsq(x[fit], y[fit], 1e-6, "test")
    f = fit_mlp_patch(x[fit], y[fit], t, rank=r, steps=1500, lr=1e-2, batch=256, seed=0,
                      pass_name="test")
    linear = stream_errors(x[hold] @ t, y[hold])["token_rel"]
    trained = stream_errors(f(x[hold]), y[hold])["token_rel"]
    assert trained < 0.4 * linear, (trained, linear)  # measured 0.27 against 0.93


def test_numeric_pruning_runs_the_patch_on_the_stream():
    """After prune_layers the stream after the cut is MLPWeights(x_in), the function trained."""
    from tests.passes.test_patch import streams

    module, _ = estimated()
    x_in = find_patches(module.graph)[0].x.name
    (x,) = streams(module, ids(), [x_in])
    f = weights_of(module)
    assert PruneLayersPass()(module).report["patch"] == find_patches(module.graph)[1].y.name
    (y,) = streams(module, ids(), [find_patches(module.graph)[1].y.name])
    torch.testing.assert_close(y, f(x), rtol=1e-12, atol=1e-12)


def test_numeric_fuse_keeps_it_and_rotate_is_exact():
    module, _ = estimated()
    c = ctx()
    for p in (PruneLayersPass(), FusePatchPass(strategy="auto"), FoldNormsPass()):
        p(module, c)
    assert [p.form for p in find_patches(module.graph)] == ["dense", "mlp"]
    before = logits64(module)
    RotatePass(seed=0)(module, c)
    assert rel(logits64(module), before) < 1e-12
    assert [p.form for p in find_patches(module.graph)] == ["dense", "mlp"]


def test_numeric_onnx_artefact_matches_the_interpreter(tmp_path):
    from splice.backends.onnx import lower, save
    from tests.backends.test_onnx import compare, reference_trajectory, session

    module, _ = estimated(dtype=torch.float32)
    PruneLayersPass()(module)
    FusePatchPass(strategy="auto")(module)
    path = save(lower(module), tmp_path)
    traj = reference_trajectory(module, ids()[:1], 4)
    for level in ("off", "on"):
        assert compare(session(path, level), module, traj) <= 1e-4


def test_numeric_training_is_seeded():
    a, _ = estimated(seed=2)
    b, _ = estimated(seed=2)
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)


# -- negative ----------------------------------------------------------------------------------

@pytest.mark.parametrize("settings, match", [
    ({"mlp_rank": 0}, "mlp_rank = 0; it must be an integer >= 1"),
    ({"mlp_steps": 1.5}, "mlp_steps = 1.5; it must be an integer >= 1"),
    ({"mlp_lr": 0.0}, "mlp_lr = 0.0; it must be a finite number > 0"),
])
def test_negative_settings(settings, match):
    module = model()
    text = str(module.graph)
    with pytest.raises(PassError, match=match):
        EstimatePatchPass(kind="mlp", start=1, n=2, **settings)(module, ctx())
    assert str(module.graph) == text


def test_negative_fold_and_distillation_refuse_it():
    module, _ = estimated()
    with pytest.raises(PassError, match="'fold' folds a linear patch into a down_proj; .* is an "
                                         "MLP patch"):
        FusePatchPass(strategy="fold")(module, ctx())
    with pytest.raises(PassError, match="is an MLP patch .* distill_patch trains a linear patch"):
        DistillPatchPass(steps=1)(module, ctx())


def test_negative_diverging_training_is_reported():
    with pytest.raises(PassError, match="the MLP patch's training diverged .* lower mlp_lr"):
        estimated(mlp_lr=1e30)


# -- idempotent --------------------------------------------------------------------------------

def test_idempotent_a_waiting_mlp_patch_is_kept():
    module, _ = estimated()
    text = str(module.graph)
    again = EstimatePatchPass(kind="mlp", start=1, n=2, **FAST)(module, ctx())
    assert not again.modified and again.report["skipped"] == "a patch already waits on this block"
    assert str(module.graph) == text


def test_a_stale_mlp_patch_goes_whole():
    module, _ = estimated()
    r = EstimatePatchPass(kind="lstsq", start=2, n=1)(module, ctx())
    assert r.report["removed_stale_patches"] == 2  # the MLP block, then its dense patch
    assert [p.form for p in find_patches(module.graph)] == ["dense"]
    assert not any(k.startswith("patch.1") for k in module.weights)


def test_builtin_recipe_prune4_mlp_patch():
    from splice.passes import PassManager
    from splice.recipe import Recipe

    recipe = Recipe.named("prune4_mlp_patch")
    assert [p.name for p in recipe.passes] == ["select_layers", "estimate_patch", "prune_layers",
                                              "fuse_patch", "fold_norms"]
    assert (recipe.calibration_samples, recipe.calibration_seq_len) == (512, 512)
    quick = Recipe("q", [dataclasses.replace(p, **FAST) if p.name == "estimate_patch" else p
                         for p in recipe.passes])
    out, report = PassManager(quick.build()).run(model(seed=8, layers=6), ctx(8))
    assert out.config.num_layers == 2
    assert [p.form for p in find_patches(out.graph)] == ["dense", "mlp"]
