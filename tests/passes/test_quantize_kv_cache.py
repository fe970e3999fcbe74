"""quantize_kv_cache: structural, numeric, negative and idempotent tests."""

from __future__ import annotations

import pytest
import torch
from splice.ir import run_logits
from splice.ir import quant
from splice.ir.interpreter import Interpreter, default_feeds
from splice.passes.infra.base import PassContext, PassError
from splice.passes.quantize_kv_cache import QuantizeKVCachePass

from tests.passes.models import SPECS, tiny_model, token_batch, with_settings


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# -- structural --------------------------------------------------------------------------------

def test_structural_k_after_rotary_and_v_are_quantized_per_head():
    module = tiny_model("gqa")
    assert QuantizeKVCachePass()(module).modified
    g = module.graph
    for att in g.find(op="attention"):
        qk, qv = att.inputs[1].producer, att.inputs[2].producer
        assert qk.op == qv.op == "quantize" and qk.origin == "quantize_kv_cache"
        assert qk.inputs[0].producer.role == "attn.k_rotary"
        assert qv.inputs[0].producer.role == "attn.v_proj"
        assert qk.attrs == {"mode": "dynamic_per_token", "group": 8, "bits": 8,
                            "symmetric": False, "clip_ratio": 1.0}
        assert (qk.role, qv.role, qk.layer) == ("attn.key_quant", "attn.value_quant", att.layer)
    assert len(g.find(op="quantize")) == 2 * SPECS["gqa"].num_layers
    assert module.config.extra["quantization"]["kv_cache"]["bits"] == 8


def test_structural_the_cache_holds_quantized_values():
    """present.{i}.key is the quantize node's output: each head's row of head_dim values of each
    token lies on its own 8-bit grid."""
    module = tiny_model("llama")
    QuantizeKVCachePass(symmetric=True)(module)
    att = module.graph.find(op="attention", layer=0)[0]
    k_in = att.inputs[1].producer.inputs[0].name
    out = Interpreter(module, torch.float64).run(
        default_feeds(module, token_batch(), None, torch.float64), capture=[k_in])
    k = out[k_in]
    b, s, _ = k.shape
    present = out["present.0.key"]  # [batch, kv_heads, seq, head_dim]
    expect = quant.fake_quantize(k, mode="dynamic_per_token", bits=8, symmetric=True, group=8)
    assert torch.equal(present, expect.reshape(b, s, 4, 8).transpose(1, 2))
    step = present.abs().amax(-1, keepdim=True) / 127
    codes = present / step
    assert torch.allclose(codes, codes.round(), atol=1e-6)


# -- numeric -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["dynamic_per_head", "static_per_head"])
def test_numeric_int8_kv_error_is_small(mode):
    module = tiny_model("gqa")
    before = run_logits(module, token_batch(), torch.float64)["logits"]
    calib = torch.cat([token_batch(seed) for seed in range(1, 9)])
    result = QuantizeKVCachePass(mode=mode)(module, PassContext(calibration=calib))
    err = rel(run_logits(module, token_batch(), torch.float64)["logits"], before)
    assert 0 < err < 0.03
    if mode == "static_per_head":
        q = module.graph.find(op="quantize")[0]
        scale = module.weight(q.inputs[1])
        assert q.attrs["mode"] == "static_per_channel" and scale.shape == (16,)
        assert torch.equal(scale.reshape(2, 8), scale.reshape(2, 8)[:, :1].expand(2, 8))
        assert len(result.report["quantized"]) == 4


def test_numeric_int4_after_r3_rotation():
    module = with_settings(tiny_model("llama"), rotation={"r3": {"head_dim": 8}})
    before = run_logits(module, token_batch(), torch.float64)["logits"]
    assert QuantizeKVCachePass(bits=4)(module).modified
    assert 0 < rel(run_logits(module, token_batch(), torch.float64)["logits"], before) < 0.3


# -- negative ----------------------------------------------------------------------------------

def test_negative_int4_without_r3_is_refused():
    module = tiny_model("llama")
    text = str(module.graph)
    with pytest.raises(PassError, match="int4 KV cache needs QuaRot's R3 rotation"):
        QuantizeKVCachePass(bits=4)(module)
    assert str(module.graph) == text
    with pytest.raises(PassError, match="int3 KV cache is not supported; bits must be 8 or 4"):
        QuantizeKVCachePass(bits=3)
    with pytest.raises(PassError, match="needs at least 1 calibration tokens"):
        QuantizeKVCachePass(mode="static_per_head")(module)
    assert str(module.graph) == text


# -- idempotent --------------------------------------------------------------------------------

def test_idempotent_second_run_changes_nothing():
    module = tiny_model("gemma")
    assert QuantizeKVCachePass()(module).modified
    text = str(module.graph)
    again = QuantizeKVCachePass()(module)
    assert not again.modified and str(module.graph) == text and again.report["quantized"] == []
