"""quantize_weights' end-to-end scale tuning (tune_steps, passes/numerics/tune_scales.py): structural,
numeric, negative and idempotent tests (STYLE rule 12), the coarse KL, and ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from splice.ir import Module, run_logits
from splice.passes.infra.base import PassContext, PassError
from splice.passes.infra.layerwise import LayerwiseError, check_recipe
from splice.passes.quantize_weights import QuantizeWeightsPass
from splice.passes.numerics.tune_scales import coarse_kl

from tests.passes.models import tiny_model, token_batch
from tests.passes.test_quantize_weights import calibration, correlated_model, onnx_logits

GPTQ = {"method": "gptq", "bits": 4, "group_size": 16}
TUNE = {"tune_steps": 60, "tune_lr": 3e-3, "tune_samples": 16, "tune_seq_len": 32}


def quantized(tune: dict | None, seed: int = 0, **more) -> tuple[Module, dict]:
    module = correlated_model()
    result = QuantizeWeightsPass(**GPTQ, **(tune or {}), **more)(
        module, PassContext(calibration=calibration(batch=8, seq=64), seed=seed))
    return module, result.report


def full_kl(teacher: torch.Tensor, student: torch.Tensor) -> float:
    p = torch.log_softmax(teacher, -1)
    return float((p.exp() * (p - torch.log_softmax(student, -1))).sum(-1).mean())


# -- structural --------------------------------------------------------------------------------

def test_structural_only_the_scales_change():
    plain, _ = quantized(None)
    tuned, report = quantized(TUNE)
    assert str(plain.graph) == str(tuned.graph)
    changed = {k for k in plain.weights if not torch.equal(plain.weights[k], tuned.weights[k])}
    assert changed and all(k.endswith(".scales") for k in changed)
    qlinears = tuned.graph.find(op="qlinear")
    assert {n.inputs[2].name for n in qlinears} == changed
    for n in qlinears:  # still positive float32 scales of the packed layout
        s = tuned.weight(n.inputs[2])
        assert s.dtype == torch.float32 and bool((s > 0).all())
    t = report["tune"]
    assert t["linears"] == len(qlinears) and t["steps"] == 60 and t["changed"]
    assert t["train_sequences"] == 14 and t["heldout_sequences"] == 2
    assert t["parameters"] == sum(n.inputs[2].shape[0] * n.inputs[2].shape[1] for n in qlinears)


def test_structural_a_table_shared_with_the_embedding_is_skipped():
    module = tiny_model("gemma", dtype=torch.float32)  # tied: one packed table for both
    report = QuantizeWeightsPass(**GPTQ, lm_head="int8", embeddings="int8",
                                 **{**TUNE, "tune_steps": 2})(
        module, PassContext(calibration=calibration(batch=8, seq=64))).report
    head = module.graph.find(role="lm_head")[0]
    (emb,) = module.graph.find(op="qembedding")
    assert head.op == "qlinear" and head.inputs[2] is emb.inputs[2]
    assert report["tune"]["skipped"] == [f"{head.output.name}: its scales are shared with "
                                         "another node"]
    assert report["tune"]["linears"] == len(module.graph.find(op="qlinear")) - 1


# -- numeric -----------------------------------------------------------------------------------

def test_numeric_tuning_brings_the_model_closer_to_float():
    """The full-vocabulary KL from the float model on held-out tokens falls (not only the
    report's coarse KL on its own held-out sequence)."""
    ids = token_batch(seed=3, batch=4, seq=24)
    teacher = run_logits(correlated_model(), ids, torch.float32)["logits"]
    plain, _ = quantized(None)
    tuned, report = quantized(TUNE)
    t = report["tune"]
    assert t["heldout_kl_after"] < 0.9 * t["heldout_kl_before"]
    before = full_kl(teacher, run_logits(plain, ids, torch.float32)["logits"])
    after = full_kl(teacher, run_logits(tuned, ids, torch.float32)["logits"])
    assert after < 0.9 * before


def test_numeric_the_original_teacher_gives_back_part_of_what_pruning_lost():
    """tune_teacher = 'original' after pruning a layer: the tuned model is closer to the model the
    pass list started from than the one tuned towards its own float input; the PassManager hands
    the pass a copy of that model, untouched by the passes before."""
    from splice.passes import PassManager
    from splice.passes.prune_layers import PruneLayersPass
    from splice.passes.select_layers import SelectLayersPass

    ids = token_batch(seed=3, batch=4, seq=24)
    original = run_logits(correlated_model(), ids, torch.float32)["logits"]
    kls = {}
    for teacher in ("input", "original"):
        passes = [SelectLayersPass(n=1, allow_first=True), PruneLayersPass(),
                  QuantizeWeightsPass(**GPTQ, **TUNE, tune_teacher=teacher)]
        out, report = PassManager(passes).run(
            correlated_model(), PassContext(calibration=calibration(batch=8, seq=64)))
        assert report[-1]["report"]["tune"]["changed"]
        assert report[-1]["report"]["tune"]["teacher"] == teacher
        kls[teacher] = full_kl(original, run_logits(out, ids, torch.float32)["logits"])
    assert kls["original"] < 0.9 * kls["input"]


def test_numeric_coarse_kl_bounds_and_equals_the_full_kl():
    gen = torch.Generator().manual_seed(0)
    p_logits, q_logits = torch.randn(2, 5, 40, generator=gen), torch.randn(2, 5, 40, generator=gen)
    logp = torch.log_softmax(p_logits, -1)
    full = full_kl(p_logits, q_logits)
    top = logp.topk(40, dim=-1)
    assert coarse_kl(q_logits, top.values, top.indices).item() == pytest.approx(full, rel=1e-5)
    top = logp.topk(8, dim=-1)
    part = coarse_kl(q_logits, top.values, top.indices).item()
    assert 0 < part < full  # coarsening loses information: a lower bound
    assert coarse_kl(p_logits, top.values, top.indices).item() == pytest.approx(0, abs=1e-6)


def test_numeric_seeded_and_onnx_runtime_runs_the_tuned_graph(tmp_path):
    a, _ = quantized(TUNE, seed=5)
    b, _ = quantized(TUNE, seed=5)
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    ids = token_batch()
    ref = run_logits(a, ids)["logits"].numpy()
    assert np.abs(onnx_logits(a, ids, tmp_path) - ref).max() <= 1e-4 * np.abs(ref).max()


def test_numeric_no_gain_keeps_the_scales():
    """A learning rate so large that the held-out KL rises: the GPTQ scales stay."""
    plain, _ = quantized(None)
    tuned, report = quantized({**TUNE, "tune_steps": 3, "tune_lr": 2.0})
    assert not report["tune"]["changed"]
    assert report["tune"]["heldout_kl_after"] > report["tune"]["heldout_kl_before"]
    assert all(torch.equal(plain.weights[k], tuned.weights[k]) for k in plain.weights)


def test_builtin_recipe_w4_gptq_rotate_tuned():
    import dataclasses

    from splice.passes import PassManager
    from splice.recipe import Recipe

    recipe = Recipe.named("w4_gptq_rotate_tuned")
    q = recipe.passes[-1]
    assert [p.name for p in recipe.passes] == ["fold_norms", "rotate_inputs", "rotate",
                                               "quantize_weights"]
    assert (q.method, q.group_size, q.hessian_samples) == ("gptq", 128, 128)
    assert (q.tune_steps, q.tune_samples, q.tune_seq_len) == (600, 256, 512)
    assert (recipe.calibration_samples, recipe.calibration_seq_len) == (256, 512)
    passes = recipe.build()  # the tiny model: groups of 16, a short run
    passes[-1] = dataclasses.replace(passes[-1], group_size=16, tune_steps=5, tune_seq_len=32)
    out, report = PassManager(passes).run(correlated_model(),
                                          PassContext(calibration=calibration(batch=8, seq=64)))
    assert report[-1]["report"]["tune"]["steps"] == 5
    assert out.graph.op_counts()["qlinear"] == 14 and out.graph.op_counts()["hadamard"] > 0


def test_tune_seq_len_0_takes_the_calibration_rows_length():
    """tune_seq_len = 0: sequences as long as the calibration rows (what lets one preset tune a
    toy model's 32-token rows and a 512-token SmolLM2 calibration): the same run as naming it."""
    calib = calibration(batch=4, seq=32)
    a, b = correlated_model(), correlated_model()
    ra = QuantizeWeightsPass(**GPTQ, **{**TUNE, "tune_steps": 3, "tune_seq_len": 0})(
        a, PassContext(calibration=calib)).report["tune"]
    QuantizeWeightsPass(**GPTQ, **{**TUNE, "tune_steps": 3, "tune_seq_len": 32})(
        b, PassContext(calibration=calib))
    assert ra["steps"] == 3 and all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)


def test_builtin_recipe_prune4_mlp_patch_w4a8():
    import dataclasses

    from splice.passes import PassManager
    from splice.recipe import Recipe

    recipe = Recipe.named("prune4_mlp_patch_w4a8")
    assert [p.name for p in recipe.passes] == [
        "select_layers", "estimate_patch", "prune_layers", "fuse_patch", "fold_norms", "rotate",
        "quantize_weights", "quantize_activations"]
    q = recipe.passes[6]
    assert (q.method, q.group_size, q.hessian_samples, q.tune_teacher) == (
        "gptq", 128, 128, "original")
    assert (recipe.calibration_samples, recipe.calibration_seq_len) == (512, 512)
    small = {"select_layers": {"n": 1, "allow_first": True},  # the tiny model: 2 layers
             "estimate_patch": {"mlp_rank": 8, "mlp_steps": 20},
             "quantize_weights": {"group_size": 16, "hessian_samples": 4, "tune_steps": 3,
                                  "tune_samples": 8, "tune_seq_len": 32}}
    passes = [dataclasses.replace(p, **small.get(p.name, {})) for p in recipe.build()]
    out, report = PassManager(passes).run(correlated_model(),
                                          PassContext(calibration=calibration(batch=8, seq=64)))
    rep = {r["name"]: r["report"] for r in report}
    assert out.config.num_layers == 1 and rep["quantize_weights"]["calibration_tokens"] == 256
    assert rep["quantize_weights"]["tune"]["steps"] == 3
    assert out.graph.op_counts()["qlinear"] == 7


# -- negative ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, match", [({"tune_steps": -1}, "tune_steps = -1"),
                                        ({"tune_samples": 1}, "tune_samples = 1"),
                                        ({"tune_seq_len": -1}, "tune_seq_len = -1"),
                                        ({"tune_lr": 0.0}, "tune_lr 0.0"),
                                        ({"tune_lr": float("inf")}, "tune_lr inf"),
                                        ({"tune_teacher": "dense"}, "tune_teacher 'dense'")])
def test_negative_settings(bad, match):
    with pytest.raises(PassError, match=match):
        QuantizeWeightsPass(**GPTQ, **bad)


def test_negative_calibration_too_short_or_missing_changes_nothing():
    module = correlated_model()
    before = {k: v.clone() for k, v in module.weights.items()}
    with pytest.raises(PassError, match="fewer than seq_len = 128"):
        QuantizeWeightsPass(**GPTQ, **{**TUNE, "tune_seq_len": 128})(
            module, PassContext(calibration=calibration(batch=8, seq=64)))
    with pytest.raises(PassError, match="calibration"):
        QuantizeWeightsPass(method="rtn", group_size=16, **TUNE)(module, PassContext())
    assert module.weights.keys() == before.keys()
    assert all(torch.equal(module.weights[k], v) for k, v in before.items())


def test_negative_original_teacher_needs_the_reference_module():
    module = correlated_model()
    q = QuantizeWeightsPass(**GPTQ, **TUNE, tune_teacher="original")
    with pytest.raises(PassError, match="needs the module the pass list started from"):
        q(module, PassContext(calibration=calibration(batch=8, seq=64)))
    other = tiny_model("gemma", dtype=torch.float32)
    if other.config.vocab_size == module.config.vocab_size:
        other.config = other.config.replace(vocab_size=module.config.vocab_size + 1)
    with pytest.raises(PassError, match="the same vocabulary"):
        q(module, PassContext(calibration=calibration(batch=8, seq=64), reference=other))
    assert module.graph.find(op="linear") and not module.graph.find(op="qlinear")


def test_negative_layer_by_layer_mode_refuses_tuning():
    with pytest.raises(LayerwiseError, match="tune_steps"):
        check_recipe([QuantizeWeightsPass(**GPTQ, **TUNE)],
                     PassContext(calibration=calibration()))


# -- idempotent --------------------------------------------------------------------------------

def test_idempotent_second_run_changes_nothing():
    module, _ = quantized(TUNE)
    snap = {k: v.clone() for k, v in module.weights.items()}
    again = QuantizeWeightsPass(**GPTQ, **TUNE)(
        module, PassContext(calibration=calibration(batch=8, seq=64)))
    assert not again.modified and "tune" not in again.report
    assert all(torch.equal(module.weights[k], v) for k, v in snap.items())
