"""center_inputs: structural, numeric, negative and idempotent tests (STYLE rule 12), and the
failure it exists for: a massive, nearly constant stream channel that the pre-norm scale silences
(Gemma 3's), which breaks W4 after fold_norms unless the linears' inputs are centered."""

from __future__ import annotations

import math

import pytest
import torch

from splice.ir import Interpreter, Module, default_feeds, run_logits
from splice.passes import NumericCheckInstrument, PassContext, PassError, PassManager
from splice.passes.center_inputs import CenterInputsPass, centerable
from splice.passes.fold_norms import FoldNormsPass
from splice.passes.quantize_weights import QuantizeWeightsPass
from splice.passes.rotate import RotatePass
from tests.passes.models import SPECS, tiny_model, token_batch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def calibration(seed: int = 3) -> torch.Tensor:
    return token_batch(seed, batch=4, seq=16)


def snapshot(module: Module) -> tuple[str, dict[str, torch.Tensor]]:
    return str(module.graph), {k: v.clone() for k, v in module.weights.items()}


def unchanged(module: Module, snap) -> bool:
    text, weights = snap
    return (str(module.graph) == text and weights.keys() == module.weights.keys()
            and all(torch.equal(module.weights[k], v) for k, v in weights.items()))


def folded(kind: str, seed: int = 0) -> Module:
    module = tiny_model(kind, seed=seed)
    FoldNormsPass()(module)
    return module


def test_structural_shift_and_biases():
    module = folded("gqa")
    calib = calibration()
    norms = centerable(module)
    out = Interpreter(module, torch.float64).run(default_feeds(module, calib, None, torch.float64),
                                                 capture=[n.output.name for n in norms])
    mus = {n.output.name: out[n.output.name].reshape(-1, SPECS["gqa"].hidden_size).mean(0)
           for n in norms}
    readers = {n.output.name: [(u.role, u.layer, u.inputs[1].const,
                                u.inputs[2].const if len(u.inputs) > 2 and u.inputs[2] else None)
                                for u in n.output.users()] for n in norms}
    w0 = {k: v.clone() for k, v in module.weights.items()}
    counts = module.graph.op_counts()
    result = CenterInputsPass(chunk_tokens=16)(module, PassContext(calibration=calib))
    assert result.modified and len(result.report["centered"]) == 2 * 2 + 1  # 2 layers + final
    assert module.graph.op_counts() == {**counts, "add": counts["add"] + len(norms)}
    for norm in norms:
        (add,) = norm.output.users()
        assert (add.op, add.role, add.origin) == ("add", norm.role + ".center", "center_inputs")
        mu = mus[norm.output.name]
        torch.testing.assert_close(module.weights[add.inputs[1].const], -mu, rtol=1e-12, atol=1e-14)
        for role, layer, w, b in readers[norm.output.name]:
            lin = module.graph.find(role=role, layer=layer)[0]
            assert lin.inputs[0] is add.output and lin.inputs[1].const == w
            expect = w0[w] @ mu + (w0[b] if b else 0.0)  # q/k/v carry a bias already
            torch.testing.assert_close(module.weights[lin.inputs[2].const], expect, rtol=1e-12,
                                       atol=1e-14)
    assert module.graph.outputs[0].name == "logits"


def test_structural_directions_project_out_of_what_linears_read():
    module = folded("llama")
    counts = module.graph.op_counts()
    result = CenterInputsPass(directions=2)(module, PassContext(calibration=calibration()))
    norms, readers = 2 * 2, 2 * (3 + 2)  # the final norm's lm_head writes the graph output
    assert result.modified and len(result.report["centered"]) == norms
    assert module.graph.op_counts() == {**counts, "linear": counts["linear"] + 2 * norms + readers,
                                        "add": counts["add"] + norms + readers}
    for label, entry in result.report["norms"].items():
        assert 0 < entry["removed_energy_share"] < 1
        u = module.weights[label + ".project_in"]
        torch.testing.assert_close(u @ u.T, torch.eye(2, dtype=u.dtype), atol=1e-12, rtol=0)
    for lin in module.graph.find(op="linear"):
        if lin.role in ("attn.q_proj", "mlp.up_proj"):
            assert lin.inputs[0].producer.role.endswith(".center")
            (y,) = lin.output.users()
            assert (y.op, y.role) == ("add", lin.role + ".project")


@pytest.mark.parametrize("directions", [0, 2])
def test_numeric_exact_after_rotation_float64(directions):
    module = folded("gemma", seed=1)
    check = NumericCheckInstrument(token_batch(2))
    out, report = PassManager([RotatePass(), CenterInputsPass(directions=directions)],
                              [check]).run(module, PassContext(calibration=calibration()))
    assert report[1]["modified"] and report[1]["numeric"]["max_rel_diff"] <= 1e-12


def massive_channel_model() -> Module:
    """A tiny decoder whose stream channel 0 is massive and constant (every embedding row holds
    30 there) and nearly silenced by every norm (gamma_0 = 0.02 against ~1 elsewhere), as Gemma
    3's attention norms do (0.3-1.7 against a median of 10-25)."""
    module = tiny_model("llama", seed=4)
    w = module.weights
    w["embed.weight"][:, 0] = 30.0
    for name in list(w):
        if name.endswith("norm.weight"):
            w[name][0] = 0.02
    return module


def test_numeric_centering_rescues_w4_on_a_massive_channel():
    """fold_norms + RTN W4 on the massive-channel model moves the logits far (the silenced
    channel's folded column is quantized at its group's step and multiplied by the whole norm);
    with the inputs centered first the W4 error drops several-fold, to that of a model without
    the massive channel."""
    ids = token_batch(5, batch=2, seq=16)
    rtn = QuantizeWeightsPass(method="rtn", bits=4, group_size=16)
    # every norm folded (max_gain 0), as before fold_norms left the costly ones in place

    def w4_kl(passes) -> float:
        module = massive_channel_model()
        ref = run_logits(module, ids, torch.float64)["logits"].log_softmax(-1)
        out, _ = PassManager(passes).run(module, PassContext(calibration=calibration()))
        got = run_logits(out, ids, torch.float64)["logits"].log_softmax(-1)
        return (ref.exp() * (ref - got)).sum(-1).mean().item()
    plain = w4_kl([FoldNormsPass(max_gain=0), rtn])
    centered = w4_kl([FoldNormsPass(max_gain=0), CenterInputsPass(), rtn])
    rotated = w4_kl([FoldNormsPass(max_gain=0), RotatePass(), CenterInputsPass(), rtn])
    projected = w4_kl([FoldNormsPass(max_gain=0), RotatePass(), CenterInputsPass(directions=1),
                       rtn])
    assert max(centered, rotated, projected) * 4 < plain, (plain, centered, rotated, projected)
    assert math.isfinite(plain)


def test_negative_unfolded_norms_change_nothing():
    module = tiny_model("gemma")
    snap = snapshot(module)
    result = CenterInputsPass()(module)  # nothing to do: no calibration needed
    assert not result.modified and "run fold_norms first" in result.report["note"]
    assert unchanged(module, snap)


def test_negative_needs_calibration():
    module = folded("llama")
    snap = snapshot(module)
    with pytest.raises(PassError, match=r"center_inputs needs at least 16 calibration tokens"):
        CenterInputsPass()(module)
    with pytest.raises(PassError, match=r"directions >= 0, got 16, 2048 and -1"):
        CenterInputsPass(directions=-1)(module, PassContext(calibration=calibration()))
    with pytest.raises(PassError, match=r"chunk_tokens must be >= 1"):
        CenterInputsPass(chunk_tokens=0)(module, PassContext(calibration=calibration()))
    assert unchanged(module, snap)


@pytest.mark.parametrize("directions", [0, 1])
def test_idempotent_second_run_changes_nothing(directions):
    module = folded("tied")
    ctx = PassContext(calibration=calibration())
    assert CenterInputsPass(directions=directions)(module, ctx).modified
    snap = snapshot(module)
    again = CenterInputsPass(directions=directions)(module, ctx)
    assert not again.modified and again.report["centered"] == []
    assert unchanged(module, snap)
