"""quantize_activations and the `quantize` op: structural, numeric, negative and idempotent tests,
the fake-quant round trip, and ONNX Runtime reproducing the op bit for bit."""

from __future__ import annotations

import itertools

import numpy as np
import onnxruntime as ort
import pytest
import torch
from splice.backends.onnx import lower, save
from splice.ir import Graph, Module, emit, run_logits
from splice.ir import quant
from splice.ir.interpreter import Interpreter
from splice.passes.infra.base import PassContext, PassError
from splice.passes.quantize_activations import QuantizeActivationsPass

from tests.passes.models import VOCAB, config, hand_built, tiny_model, token_batch


def calibration() -> torch.Tensor:
    """Sequences like the test batch's (seq 7), from other seeds."""
    return torch.cat([token_batch(seed) for seed in range(1, 9)])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# -- structural --------------------------------------------------------------------------------

def test_structural_one_quantize_per_shared_input():
    module = hand_built(norm_feeds_add=True)
    result = QuantizeActivationsPass()(module)
    assert result.modified
    g = module.graph
    (q,) = g.find(op="quantize")
    norm = g.find(role="attn_norm")[0].output
    assert q.inputs == [norm] and q.origin == "quantize_activations" and q.layer == 0
    assert q.attrs == {"mode": "dynamic_per_token", "bits": 8, "symmetric": True, "group": 0,
                       "clip_ratio": 1.0}
    for role in ("attn.q_proj", "attn.k_proj"):
        assert g.find(role=role)[0].inputs[0] is q.output
    # the residual keeps the float value; the lm_head is not a selected role
    assert any(n.op == "add" and norm in n.inputs for n in g.nodes)
    assert g.find(role="lm_head")[0].inputs[0].producer.op == "rms_norm"
    assert g.nodes.index(q) < g.nodes.index(g.find(role="attn.q_proj")[0])


def test_structural_static_per_channel_stores_scales_and_zero_points():
    module = tiny_model("llama")
    QuantizeActivationsPass(mode="static_per_channel", symmetric=False)(
        module, PassContext(calibration=calibration()))
    qs = module.graph.find(op="quantize")
    assert len(qs) == 4 * 2  # attn in, o_proj in, mlp in, down_proj in; 2 layers
    down = next(q for q in qs if q.role == "mlp.down_proj.act_quant" and q.layer == 1)
    s, z = down.inputs[1], down.inputs[2]
    assert s.name == "layers.1.mlp.down_proj.act.scale" and s.dtype == "f32" and s.shape == (48,)
    assert z.dtype == "u8" and z.shape == (48,)
    assert bool((module.weights[s.name] > 0).all())


# -- numeric -----------------------------------------------------------------------------------

@pytest.mark.parametrize("symmetric,group", [(True, 0), (False, 0), (True, 8), (False, 8)])
def test_numeric_dynamic_round_trip_within_half_a_step(symmetric, group):
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    x[0, 0] = 0.0  # an all-zero token stays zero
    y = quant.fake_quantize(x, mode="dynamic_per_token", bits=8, symmetric=symmetric, group=group)
    xg = x.reshape(3, 5, -1, group or 32)
    if symmetric:
        step = xg.abs().amax(-1, keepdim=True) / 127
    else:
        hi, lo = xg.amax(-1, keepdim=True).clamp(min=0), xg.amin(-1, keepdim=True).clamp(max=0)
        step = (hi - lo) / 255
    err = (y - x).reshape(xg.shape).abs()
    assert bool((err <= step / 2 * (1 + 1e-12)).all())
    assert err.max() > 0 and torch.equal(y[0, 0], torch.zeros(32, dtype=torch.float64))


def test_numeric_static_round_trip_and_clipping():
    x = torch.linspace(-2, 2, 101, dtype=torch.float64)
    s, z = quant.static_params(torch.tensor(-1.0), torch.tensor(1.0), 8, True)
    y = quant.fake_quantize(x, mode="static_per_tensor", bits=8, symmetric=True, scale=s)
    inside = x.abs() <= 1
    assert z is None and s.item() == pytest.approx(1 / 127)
    assert bool(((y - x)[inside].abs() <= s.double() / 2 + 1e-12).all())
    assert y.max().item() == pytest.approx(1.0, abs=1e-6)  # clipped at the calibrated range
    assert y.min().item() == pytest.approx(-128 / 127, abs=1e-6)


def test_numeric_dynamic_int8_logits_close_and_static_calibrated():
    module = tiny_model("llama")
    before = run_logits(module, token_batch(), torch.float64)["logits"]
    QuantizeActivationsPass()(module)
    assert 0 < rel(run_logits(module, token_batch(), torch.float64)["logits"], before) < 0.05
    static = tiny_model("llama")
    QuantizeActivationsPass(mode="static_per_tensor")(
        static, PassContext(calibration=token_batch()))
    # calibrated on the very batch it runs: no clipping, only rounding
    assert 0 < rel(run_logits(static, token_batch(), torch.float64)["logits"], before) < 0.05


MODES = [("dynamic_per_token", 0), ("dynamic_per_token", 8), ("static_per_tensor", 0),
         ("static_per_channel", 0)]


@pytest.mark.parametrize("mode,group", MODES)
def test_numeric_onnx_runtime_reproduces_the_op_bit_for_bit(mode, group, tmp_path):
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(1)) * 2
    for i, (bits, symmetric) in enumerate(itertools.product((8, 4), (True, False))):
        g = Graph()
        xv = g.add_input("x", "f32", ("batch", "seq", 32))
        weights, inputs = {}, [xv]
        if mode != "dynamic_per_token":
            per = mode == "static_per_channel"
            lo, hi = (x.reshape(-1, 32).amin(0), x.reshape(-1, 32).amax(0)) if per else \
                (x.min() * 0.8, x.max() * 0.8)  # some values fall outside: clipping too
            s, z = quant.static_params(lo, hi, bits, symmetric)
            weights["s"] = s
            inputs.append(g.const("s", "f32", tuple(s.shape)))
            if z is not None:
                weights["z"] = z
                inputs.append(g.const("z", "u8", tuple(z.shape)))
        y = emit(g, "quantize", inputs, {"mode": mode, "bits": bits, "symmetric": symmetric,
                                         "group": group, "clip_ratio": 0.9 if group else 1.0},
                 name="y")
        g.outputs = [y.output]
        module = Module(g, weights, config())
        ref = Interpreter(module, torch.float32).run({"x": x})["y"].numpy()
        path = save(lower(module), tmp_path / str(i))
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        got = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(
            None, {"x": x.numpy()})[0]
        assert np.array_equal(got, ref), (bits, symmetric, np.abs(got - ref).max())


# -- negative ----------------------------------------------------------------------------------

def test_negative_bad_settings_and_missing_calibration():
    with pytest.raises(PassError, match="int3 is not supported; bits must be 4 or 8"):
        QuantizeActivationsPass(bits=3)
    with pytest.raises(PassError, match="mode 'per_token'; accepted: dynamic_per_token"):
        QuantizeActivationsPass(mode="per_token")
    with pytest.raises(PassError, match=r"clip_ratio 1.5 must lie in \(0, 1\]"):
        QuantizeActivationsPass(clip_ratio=1.5)
    module = tiny_model("llama")
    text = str(module.graph)
    with pytest.raises(PassError, match="quantize_activations needs at least 1 calibration"):
        QuantizeActivationsPass(mode="static_per_tensor")(module)
    assert str(module.graph) == text


def test_negative_roles_matching_no_linear_are_refused_and_nothing_changes():
    """Roles that name no linear of the model are a recipe mistake (issue 26): refused, naming
    the roles the model has, rather than a silent run that quantizes nothing."""
    module = tiny_model("llama")
    text = str(module.graph)
    with pytest.raises(PassError, match=r"roles \['lm_head_only'\] match no linear.*mlp\.down_proj"):
        QuantizeActivationsPass(roles=("lm_head_only",))(module)
    assert str(module.graph) == text


# -- idempotent --------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["dynamic_per_token", "static_per_channel"])
def test_idempotent_second_run_changes_nothing(mode):
    module = tiny_model("gqa")
    ctx = PassContext(calibration=calibration())
    assert QuantizeActivationsPass(mode=mode)(module, ctx).modified
    text, weights = str(module.graph), dict(module.weights)
    again = QuantizeActivationsPass(mode=mode)(module, ctx)
    assert not again.modified and str(module.graph) == text
    assert module.weights.keys() == weights.keys() and VOCAB == module.config.vocab_size
