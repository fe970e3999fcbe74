"""estimate_patch and fuse_patch (and the prune4_patch recipe): structural, numeric, negative and
idempotent tests (STYLE 12)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from splice.frontend.decoder import build_decoder
from splice.ir import Interpreter, Module, default_feeds, run_logits
from splice.ir.hadamard import hadamard_matrix, random_orthogonal
from splice.passes import NumericCheckInstrument, PassContext, PassError, PassManager
from splice.passes.distill_patch import DistillPatchPass
from splice.passes.estimate_patch import EstimatePatchPass, find_patches
from splice.passes.fuse_patch import FusePatchPass
from splice.passes.prune_layers import PruneLayersPass
from splice.passes.select_layers import SelectLayersPass
from splice.recipe import Recipe
from tests.passes.models import SPECS, random_weights, token_batch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a loaded machine torch's spinning workers
    make them an order of magnitude slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def deep_model(kind: str = "llama", layers: int = 5, seed: int = 0,
               dtype: torch.dtype = torch.float64, **changes) -> Module:
    spec = SPECS[kind]
    types = tuple(spec.layer_types[i % len(spec.layer_types)] for i in range(layers)) \
        if spec.layer_types else ()
    spec = dataclasses.replace(spec, num_layers=layers, layer_types=types, **changes)
    return build_decoder(spec, random_weights(spec, seed, dtype), origin="tests.patch")


def calib(seed: int = 0, batch: int = 8, seq: int = 16) -> PassContext:
    return PassContext(calibration=token_batch(seed, batch=batch, seq=seq), seed=seed)


def streams(module: Module, ids: torch.Tensor, names: list[str]) -> list[torch.Tensor]:
    out = Interpreter(module, torch.float64).run(default_feeds(module, ids, None, torch.float64),
                                                 capture=names)
    return [out[n].reshape(-1, out[n].shape[-1]) for n in names]


def logits64(module: Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    return run_logits(module, token_batch(5) if ids is None else ids, torch.float64)["logits"]


def patched(kind: str = "linearpatch", model: str = "llama", **settings) -> Module:
    """A 5-layer model with layers [2, 4) pruned behind a patch of `kind`."""
    module = deep_model(model)
    EstimatePatchPass(kind=kind, start=2, n=2, **settings)(module, calib())
    PruneLayersPass()(module)
    return module


# -- estimate_patch: structural ----------------------------------------------------------------

def test_estimate_structural_factored_linearpatch_waits_on_the_stream():
    module = deep_model()
    before = logits64(module)
    result = EstimatePatchPass(kind="linearpatch", start=2, n=2)(module, calib())
    (p,) = find_patches(module.graph)
    assert result.modified and p.form == "factored" and p.dangling(module.graph)
    assert [n.op for n in p.nodes] == ["hadamard", "channel_scale", "hadamard"]
    assert all(n.role == "patch" and n.origin == "estimate_patch" and n.layer is None
               for n in p.nodes)
    assert p.x.name == "h.1" and p.y.name == "patch.2"
    assert "patch.2.scale" in module.weights and module.config.extra["prune_block"] == [2, 2]
    r = result.report
    assert r["kind"] == "linearpatch" and r["form"] == "factored" and r["symmetric"]
    assert r["rotation"] == "hadamard" and r["factors"] == [32] and r["warnings"] == []
    assert r["tokens_fit"] + r["tokens_holdout"] == 128 and r["tokens_holdout"] == 32
    torch.testing.assert_close(logits64(module), before, rtol=0, atol=0)  # nothing reads it yet


def test_estimate_structural_lstsq_and_non_symmetric_hadamard_are_dense():
    module = deep_model()
    EstimatePatchPass(kind="lstsq", start=1, n=1)(module, calib())
    (p,) = find_patches(module.graph)
    assert p.form == "dense" and list(module.weights["patch.1.weight"].shape) == [32, 32]
    # order 24 = Paley I base 12 x 2: H is not symmetric, so the LinearPatch stays a matmul
    module = deep_model(hidden_size=24)
    r = EstimatePatchPass(kind="linearpatch", start=1, n=2)(module, calib()).report
    assert r["form"] == "dense" and not r["symmetric"] and r["factors"] == [12, 2]


def test_estimate_structural_auto_reports_both_and_keeps_the_better():
    module = deep_model(seed=1)
    r = EstimatePatchPass(start=1, n=2)(module, calib(1)).report
    errors = r["holdout_errors"]
    assert set(errors) == {"none", "linearpatch", "lstsq"}
    assert r["kind"] == min(("linearpatch", "lstsq"), key=lambda k: errors[k]["token_rel"])
    assert errors["lstsq"]["token_rel"] != errors["linearpatch"]["token_rel"]


# -- estimate_patch: numeric -------------------------------------------------------------------

def test_estimate_numeric_linearpatch_is_the_formula():
    module = deep_model(seed=2)
    ctx = calib(2)
    xi, xo = streams(module, ctx.calibration, ["h.0", "h.2"])
    EstimatePatchPass(kind="linearpatch", start=1, n=2, holdout=0.0)(module, ctx)
    h = hadamard_matrix(32)
    s = (xo @ h).abs().mean(0) / (xi @ h).abs().mean(0)
    torch.testing.assert_close(module.weights["patch.1.scale"], s, rtol=1e-12, atol=0)


@pytest.mark.parametrize("token_weights", [True, False])
def test_estimate_numeric_lstsq_is_the_ridge_solution(token_weights):
    module = deep_model(seed=3)
    ctx = calib(3)
    xi, xo = streams(module, ctx.calibration, ["h.1", "h.3"])
    EstimatePatchPass(kind="lstsq", start=2, n=2, holdout=0.0, ridge=0.1,
                      token_weights=token_weights)(module, ctx)
    if token_weights:  # per-token relative error
        w = 1 / xo.norm(dim=-1, keepdim=True)
        xi, xo = xi * w, xo * w
    a = xi.T @ xi
    eye = torch.eye(32, dtype=a.dtype)
    lam = 0.1 * a.diagonal().mean()
    t = torch.linalg.solve(a + lam * eye, xi.T @ xo + lam * eye)  # ridge towards the identity
    torch.testing.assert_close(module.weights["patch.2.weight"], t, rtol=1e-9, atol=1e-12)
    # as ridge grows the patch tends to the identity, that is to pruning without a patch
    heavy = deep_model(seed=3)
    EstimatePatchPass(kind="lstsq", start=2, n=2, holdout=0.0, ridge=1e9)(heavy, ctx)
    torch.testing.assert_close(heavy.weights["patch.2.weight"], eye, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["linearpatch", "lstsq"])
def test_estimate_numeric_pruning_applies_the_patch_to_the_stream(kind):
    from tests.passes.test_prune import bypass_logits

    module = deep_model(seed=4)
    ids = token_batch(4)
    EstimatePatchPass(kind=kind, start=2, n=2)(module, calib(4))
    (p,) = find_patches(module.graph)
    want = bypass_logits(module, ids, 2, 2, patch=p.matrix(module))
    assert PruneLayersPass()(module).report["patch"] == "patch.2"
    assert not p.dangling(module.graph)
    torch.testing.assert_close(logits64(module, ids), want, rtol=1e-10, atol=1e-10)


def test_estimate_numeric_fallback_rotation_without_hadamard():
    module = deep_model(hidden_size=30, seed=5)  # 30 = 2 mod 4: no Hadamard matrix exists
    ctx = calib(5)
    xi, xo = streams(module, ctx.calibration, ["h.0", "h.1"])
    r = EstimatePatchPass(kind="linearpatch", start=1, n=1, holdout=0.0)(module, ctx).report
    assert r["rotation"] == "random_orthogonal" and r["form"] == "dense"
    assert "no Hadamard construction" in r["warnings"][0]
    q = random_orthogonal(30, 5)
    s = (xo @ q).abs().mean(0) / (xi @ q).abs().mean(0)
    torch.testing.assert_close(module.weights["patch.1.weight"], (q * s) @ q.T, rtol=1e-10,
                               atol=1e-12)


# -- estimate_patch: negative ------------------------------------------------------------------

@pytest.mark.parametrize("ctx, match", [
    (PassContext(), "needs at least 1 calibration tokens"),
    (PassContext(calibration=token_batch(0, batch=2, seq=16)), "32 calibration tokens are too few"),
])
def test_estimate_negative_calibration(ctx, match):
    module = deep_model()
    with pytest.raises(PassError, match=match):
        EstimatePatchPass(start=1, n=2)(module, ctx)
    assert not find_patches(module.graph)


def test_estimate_negative_nan_calibration():
    module = deep_model()
    module.weights["embed.weight"][:] = float("nan")
    with pytest.raises(PassError, match=r"%embed holds NaN"):
        EstimatePatchPass(start=0, n=2, allow_first=True)(module, calib())


@pytest.mark.parametrize("settings, match", [
    (dict(start=1, n=2, holdout=1.0), r"holdout = 1.0; it must be in \[0, 1\)"),
    (dict(start=1, n=2, holdout=0.0), "give holdout > 0"),
    (dict(start=1, n=2, ridge=-1.0), "ridge"),
    (dict(start=0, n=2), "layer 0.*allow_first"),
    (dict(start=1, n=5), "every layer"),
    (dict(), "no block to patch"),
])
def test_estimate_negative_settings(settings, match):
    with pytest.raises(PassError, match=match):
        EstimatePatchPass(**settings)(deep_model(), calib())


# -- estimate_patch: idempotent ----------------------------------------------------------------

def test_estimate_idempotent():
    module = deep_model()
    assert EstimatePatchPass(start=1, n=2)(module, calib()).modified
    text = str(module.graph)
    again = EstimatePatchPass(start=1, n=2)(module, calib())
    assert not again.modified and "already waits" in again.report["skipped"]
    assert str(module.graph) == text


def test_estimate_replaces_a_stale_patch_for_another_block():
    module = deep_model()
    EstimatePatchPass(kind="lstsq", start=1, n=1)(module, calib())
    EstimatePatchPass(kind="lstsq", start=2, n=2)(module, calib())
    assert [p.x.name for p in find_patches(module.graph)] == ["h.1"]
    assert "patch.1.weight" not in module.weights


# -- fuse_patch: structural --------------------------------------------------------------------

def test_fuse_structural_dense_then_fwht_round_trip():
    module = patched("linearpatch")
    s = module.weights["patch.2.scale"].clone()
    r = FusePatchPass(strategy="dense")(module)
    (p,) = find_patches(module.graph)
    assert r.modified and p.form == "dense" and p.y.name == "patch.2"
    h = hadamard_matrix(32)
    torch.testing.assert_close(module.weights["patch.2.weight"], (h * s) @ h, rtol=0, atol=1e-15)
    assert "patch.2.scale" not in module.weights
    assert FusePatchPass(strategy="fwht")(module).modified
    (p,) = find_patches(module.graph)
    assert p.form == "factored" and "patch.2.weight" not in module.weights
    torch.testing.assert_close(module.weights["patch.2.scale"], s, rtol=1e-12, atol=0)


def test_fuse_structural_fold_removes_the_patch_into_down_proj():
    module = patched("lstsq")
    w = module.weights["layers.1.mlp.down_proj.weight"].clone()
    r = FusePatchPass(strategy="fold")(module, calib())
    assert r.modified and not find_patches(module.graph)
    assert "patch.2.weight" not in module.weights
    assert not torch.equal(module.weights["layers.1.mlp.down_proj.weight"], w)
    (entry,) = r.report["patches"]
    assert entry["to"] == "layers.1.mlp.down_proj"
    errors = entry["calibration_errors"]
    assert errors["fold"]["token_rel"] <= errors["unpatched"]["token_rel"]


# -- fuse_patch: numeric -----------------------------------------------------------------------

@pytest.mark.parametrize("model", ["llama", "gemma"])
@pytest.mark.parametrize("strategies", [("dense",), ("dense", "fwht"), ("dense", "auto")])
def test_fuse_numeric_dense_and_fwht_are_exact_in_float64(model, strategies):
    module = patched("linearpatch", model)
    passes = [FusePatchPass(strategy=s) for s in strategies]
    _, report = PassManager(passes, [NumericCheckInstrument(token_batch(6))]).run(module)
    for rec in report:
        assert rec["modified"] and rec["numeric"]["max_rel_diff"] <= 1e-9


def test_fuse_numeric_dense_on_float32_changes_rounding_only():
    module = deep_model(dtype=torch.float32)
    EstimatePatchPass(kind="linearpatch", start=2, n=2)(module, calib())
    PruneLayersPass()(module)
    check = NumericCheckInstrument(token_batch(6))
    _, report = PassManager([FusePatchPass(strategy="dense")], [check]).run(module)
    numeric = report[0]["numeric"]
    assert numeric["float64_max_rel_diff"] <= 1e-9 and numeric["max_rel_diff"] <= 1e-5
    assert module.weights["patch.2.weight"].dtype == torch.float32


def test_fuse_numeric_fold_fit_is_the_least_squares_solution():
    module = patched("lstsq")
    ctx = calib(7)
    ys, ms, xs = streams(module, ctx.calibration, ["h.1.attn", "mlp.down_proj.1", "h.1"])
    target = xs @ find_patches(module.graph)[0].matrix(module)
    w = module.weights["layers.1.mlp.down_proj.weight"].clone()
    FusePatchPass(strategy="fold", ridge=0.0)(module, ctx)
    weight = 1 / target.norm(dim=-1, keepdim=True)  # per-token relative error
    t = torch.linalg.lstsq(ms * weight, (target - ys) * weight).solution
    torch.testing.assert_close(module.weights["layers.1.mlp.down_proj.weight"], t.T @ w,
                               rtol=1e-8, atol=1e-10)


# -- fuse_patch: negative ----------------------------------------------------------------------

def test_fuse_negative_no_patch_changes_nothing():
    module = deep_model()
    text = str(module.graph)
    for strategy in ("dense", "fwht", "auto", "fold"):
        r = FusePatchPass(strategy=strategy)(module, calib())
        assert not r.modified and r.report["patches"] == []
    assert str(module.graph) == text


def test_fuse_negative_fwht_refuses_what_is_not_a_linearpatch():
    module = patched("lstsq")
    with pytest.raises(PassError, match="H P H is not diagonal"):
        FusePatchPass(strategy="fwht")(module)
    auto = FusePatchPass(strategy="auto")(module)
    assert not auto.modified and "not diagonal" in auto.report["patches"][0]["kept_dense"]
    module = deep_model(hidden_size=24)
    EstimatePatchPass(kind="linearpatch", start=1, n=2)(module, calib())
    with pytest.raises(PassError, match="not symmetric"):
        FusePatchPass(strategy="fwht")(module)


@pytest.mark.parametrize("case, match", [
    ("dangling", "run prune_layers first"),
    ("post_norm", "post norm"),
    ("first", "block starting at layer 0"),
])
def test_fuse_negative_fold_preconditions(case, match):
    if case == "dangling":
        module = deep_model()
        EstimatePatchPass(kind="lstsq", start=2, n=2)(module, calib())
    elif case == "post_norm":
        module = patched("lstsq", "gemma")
    else:
        module = deep_model()
        EstimatePatchPass(kind="lstsq", start=0, n=1, allow_first=True)(module, calib())
        PruneLayersPass()(module)
    with pytest.raises(PassError, match=match):
        FusePatchPass(strategy="fold")(module, calib())


# -- fuse_patch: idempotent --------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["dense", "fwht", "auto", "fold"])
def test_fuse_idempotent(strategy):
    module = patched("linearpatch")
    FusePatchPass(strategy=strategy)(module, calib())
    text = str(module.graph)
    weights = {k: v.clone() for k, v in module.weights.items()}
    assert not FusePatchPass(strategy=strategy)(module, calib()).modified
    assert str(module.graph) == text
    assert all(torch.equal(module.weights[k], v) for k, v in weights.items())


# -- the recipe --------------------------------------------------------------------------------

def test_prune4_patch_recipe_runs_end_to_end():
    recipe = Recipe.named("prune4_patch")
    assert [p.name for p in recipe.passes] == ["select_layers", "estimate_patch", "prune_layers",
                                              "fuse_patch", "fold_norms"]
    module = deep_model(layers=6, seed=8)
    out, report = PassManager(recipe.build()).run(module, calib(8, batch=8, seq=32))
    assert out.config.num_layers == 2 and out.graph.layers() == [0, 1]
    # fuse_patch(auto) keeps what estimate_patch made: factored LinearPatch or dense lstsq
    assert [r["modified"] for r in report] == [True, True, True, False, True]
    assert len(find_patches(out.graph)) == 1


# -- distill_patch -----------------------------------------------------------------------------

def distilled(kind: str = "lstsq", **settings):
    module = deep_model(seed=9)
    ctx = calib(9, batch=8, seq=32)
    EstimatePatchPass(kind=kind, start=2, n=2)(module, ctx)
    teacher = module.clone()
    args = dict(samples=16, seq_len=16, steps=20, batch=4, lr=1e-3, top_k=10) | settings
    return module, teacher, ctx, DistillPatchPass(**args)(module, ctx)


@pytest.mark.parametrize("kind, trained, count", [("lstsq", "dense", 1024),
                                                  ("linearpatch", "factored", 32)])
def test_distill_structural_trains_only_the_waiting_patch(kind, trained, count):
    module, teacher, _, result = distilled(kind)
    r = result.report
    assert result.modified and r["trained"] == trained and r["parameters"] == count
    assert r["train_sequences"] == 14 and r["heldout_sequences"] == 2
    assert module.config.extra["distilled"] == "patch.2"
    changed = [k for k in module.weights if not torch.equal(module.weights[k], teacher.weights[k])]
    assert changed == ([] if not r["changed"] else [find_patches(module.graph)[0].nodes[
        0 if trained == "dense" else 1].inputs[1].name])
    torch.testing.assert_close(logits64(module), logits64(teacher), rtol=0, atol=0)


def test_distill_numeric_reported_kl_is_the_pruned_models():
    module, teacher, ctx, result = distilled("lstsq")
    r = result.report
    PruneLayersPass()(module)
    held = ctx.calibration[0].reshape(2, 16)  # the first two sequences are held out
    t = run_logits(teacher, held, torch.float32)["logits"].topk(10, dim=-1)
    s = torch.log_softmax(run_logits(module, held, torch.float32)["logits"], -1)
    p = torch.softmax(t.values, -1)
    kl = float((p * (p.log() - s.gather(-1, t.indices))).sum(-1).mean())
    want = r["heldout_kl_after"] if r["changed"] else r["heldout_kl_before"]
    assert kl == pytest.approx(want, rel=1e-4)


def test_distill_negative():
    module = deep_model()
    SelectLayersPass(n=2)(module, calib())
    with pytest.raises(PassError, match="run estimate_patch first"):
        DistillPatchPass()(module, calib())
    with pytest.raises(PassError, match="no block pending"):
        DistillPatchPass()(deep_model(), calib())
    with pytest.raises(PassError, match="samples = 1"):
        DistillPatchPass(samples=1)(module, calib())


def test_distill_idempotent():
    module, _, ctx, _ = distilled("lstsq")
    text, weights = str(module.graph), {k: v.clone() for k, v in module.weights.items()}
    again = DistillPatchPass(samples=16, seq_len=16, steps=20)(module, ctx)
    assert not again.modified and str(module.graph) == text
    assert all(torch.equal(module.weights[k], v) for k, v in weights.items())


# -- lowering ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, strategy", [("linearpatch", "auto"), ("linearpatch", "dense"),
                                            ("lstsq", "auto")])
def test_pruned_patched_model_runs_in_onnx_runtime(tmp_path, kind, strategy):
    """Every patch form (factored Hadamard, dense matmul) lowers, with the renumbered KV I/O."""
    from splice.backends.onnx import lower, save
    from tests.backends.test_onnx import compare, reference_trajectory, session

    module = deep_model(dtype=torch.float32)
    EstimatePatchPass(kind=kind, start=2, n=2)(module, calib())
    PruneLayersPass()(module)
    FusePatchPass(strategy=strategy)(module)
    path = save(lower(module), tmp_path)
    traj = reference_trajectory(module, token_batch(10, batch=1, seq=8), 4)
    for level in ("off", "on"):
        assert compare(session(path, level), module, traj) <= 1e-4


def test_two_patches_in_a_row_stay_two_patches():
    """Pruning twice at the same cut puts a second patch on the first one's output."""
    from tests.passes.test_prune import bypass_logits

    module = deep_model(layers=6, seed=11)
    original = module.clone()
    ids = token_batch(11)
    EstimatePatchPass(kind="linearpatch", start=2, n=1)(module, calib(11))
    PruneLayersPass()(module)
    EstimatePatchPass(kind="linearpatch", start=2, n=1)(module, calib(11))
    patches = find_patches(module.graph)
    assert [p.form for p in patches] == ["factored", "factored"]
    assert patches[1].x is patches[0].y and patches[1].dangling(module.graph)
    PruneLayersPass()(module)
    assert FusePatchPass(strategy="dense")(module).modified
    p1, p2 = (p.matrix(module) for p in find_patches(module.graph))
    assert module.config.num_layers == 4
    # original layers [2, 4) are gone; the stream entering them goes through P1, then P2
    want = bypass_logits(original, ids, 2, 2, patch=p1 @ p2)
    torch.testing.assert_close(logits64(module, ids), want, rtol=1e-10, atol=1e-10)
