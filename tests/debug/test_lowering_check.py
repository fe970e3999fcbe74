"""The lowering check names the first IR value ONNX Runtime computes differently, and its node."""

from __future__ import annotations

import pytest
import torch
from splice.backends.onnx import RULES
from splice.backends.onnx.lowering_check import check_lowering
from splice.errors import InputError

from tests.passes.models import token_batch, tiny_model


def sigmoid_only_silu(ctx, node):
    """A wrong lowering of silu: sigmoid(x) instead of x * sigmoid(x)."""
    return [ctx.op("Sigmoid", [ctx.input(node, 0)])]


def test_standard_rules_agree_on_every_value():
    module = tiny_model("gqa", dtype=torch.float32)
    result = check_lowering(module, token_batch())
    assert result.ok and result.first is None
    assert len(result.values) == sum(len(n.outputs) for n in module.graph.nodes)
    assert {v.name for v in result.values} >= {"logits", "present.1.value", "mlp.act.0"}


def test_a_wrong_rule_is_named_at_its_first_node():
    module = tiny_model("llama")
    result = check_lowering(module, token_batch(), rules={**RULES, "silu": sigmoid_only_silu})
    assert not result.ok
    first = result.first
    assert (first.op, first.role, first.layer, first.name) == ("silu", "mlp.act", 0, "mlp.act.0")
    assert first.origin == "tests.models"
    names = [v.name for v in result.values]
    assert all(v.ok for v in result.values[:names.index("mlp.act.0")])
    assert "first divergence at %mlp.act.0 = silu (role mlp.act, layer 0" in result.summary()
    assert result.to_json()["first"]["name"] == "mlp.act.0"


def test_bad_ids_are_input_errors():
    with pytest.raises(InputError, match="token ids must lie in"):
        check_lowering(tiny_model("llama"), [[0, 1, 999]])
