"""Activation statistics: an injected outlier channel is found, the numbers are in range."""

from __future__ import annotations

import torch
from splice.ir.stats import activation_stats, format_stats, layer_boundaries

from tests.passes.models import tiny_model

BATCHES = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))


def test_an_outlier_channel_is_found():
    plain = activation_stats(tiny_model("llama"), BATCHES)
    module = tiny_model("llama")
    module.weights["embed.weight"][:, 5] *= 40.0     # one massive residual channel
    spiked = activation_stats(module, BATCHES)
    assert [r["outlier_channels"] for r in plain["layers"]] == [0, 0]
    assert all(r["outlier_channels"] >= 1 for r in spiked["layers"])
    assert spiked["layers"][0]["residual_kurtosis"] > 3 * plain["layers"][0]["residual_kurtosis"]
    for r in plain["layers"]:
        assert 0.0 <= r["block_influence"] <= 2.0 and r["residual_max_abs"] > 0


def test_every_linear_input_is_listed_once():
    module = tiny_model("llama")
    st = activation_stats(module, BATCHES)
    roles = sorted(role for r in st["linears"] for role in r["roles"])
    assert roles == sorted(n.role for n in module.graph.find(op="linear"))
    assert len(st["linears"]) == 2 * 4 + 1     # qkv, o, gate/up, down per layer; lm_head
    assert all(r["max_median_ratio"] >= 1.0 for r in st["linears"])
    text = format_stats(st)
    assert "block infl." in text and "mlp.down_proj" in text


def test_layer_boundaries_follow_the_residual_stream():
    bounds = layer_boundaries(tiny_model("llama"))
    assert {k: (a.name, b.name) for k, (a, b) in bounds.items()} == {
        0: ("embed", "h.0"), 1: ("h.0", "h.1")}
