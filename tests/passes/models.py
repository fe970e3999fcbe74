"""Tiny models for the pass tests: seeded random decoders of several families (built with the
canonical decoder builder, as every frontend does) and small hand-built graphs.

Weights default to float64, so the exact passes can be checked to 1e-9 without storage rounding.
Norm scales are random (not ones): a fold of all-ones gammas would prove nothing.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from splice.frontend.decoder import DecoderSpec, build_decoder
from splice.ir.core import Graph, Module, ModelConfig, emit

VOCAB, HIDDEN = 64, 32

SPECS = {
    "llama": DecoderSpec(architecture="LlamaForCausalLM", vocab_size=VOCAB, hidden_size=HIDDEN,
                         intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=4,
                         head_dim=8, rms_eps=1e-5, max_position=64),
    "gqa": DecoderSpec(architecture="Qwen2ForCausalLM", vocab_size=VOCAB, hidden_size=HIDDEN,
                       intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=8, rms_eps=1e-6, max_position=64, qkv_bias=True),
    "tied": DecoderSpec(architecture="LlamaForCausalLM", vocab_size=VOCAB, hidden_size=HIDDEN,
                        intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=1,
                        head_dim=8, rms_eps=1e-5, max_position=64, tie_embeddings=True),
    "gemma": DecoderSpec(architecture="Gemma3ForCausalLM", vocab_size=VOCAB, hidden_size=HIDDEN,
                         intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=8, rms_eps=1e-6, max_position=64, norm_offset=1.0,
                         qk_norm=True, post_norms=True, activation="gelu_tanh",
                         embed_scale=math.sqrt(HIDDEN), attn_softcap=50.0, final_softcap=30.0,
                         sliding_window=4, layer_types=("sliding", "full"), tie_embeddings=True),
}


def random_weights(spec: DecoderSpec, seed: int, dtype: torch.dtype = torch.float64,
                   unit_final_norm: bool = False) -> dict[str, torch.Tensor]:
    """Canonical weights for `spec`. Norm weights w give an effective scale offset + w near 1 but
    not 1; `unit_final_norm` makes the final norm's effective scale exactly one."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float = 0.2) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype)

    def norm(width: int) -> torch.Tensor:
        w = torch.randn(width, generator=gen, dtype=torch.float64) * 0.3
        return (w if spec.norm_offset else 1.0 + w).to(dtype)

    d, hd, f = spec.hidden_size, spec.head_dim, spec.intermediate_size
    q, kv = spec.num_heads * hd, spec.num_kv_heads * hd
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    w = {"embed.weight": randn(spec.vocab_size, d, std=1.0), "rope.inv_freq": inv.to(dtype),
         "rope.inv_freq_local": (inv * 2).to(dtype), "final_norm.weight": norm(d)}
    if unit_final_norm:
        w["final_norm.weight"] = torch.full((d,), 1.0 - spec.norm_offset, dtype=dtype)
    if not spec.tie_embeddings:
        w["lm_head.weight"] = randn(spec.vocab_size, d)
    for i in range(spec.num_layers):
        p = f"layers.{i}."
        w[p + "attn_norm.weight"] = norm(d)
        w[p + "mlp_norm.weight"] = norm(d)
        for name, (out, inp) in {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d),
                                 "o_proj": (d, q)}.items():
            w[p + f"attn.{name}.weight"] = randn(out, inp)
            if spec.qkv_bias and name != "o_proj":
                w[p + f"attn.{name}.bias"] = randn(out)
        for name, (out, inp) in {"gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}.items():
            w[p + f"mlp.{name}.weight"] = randn(out, inp)
        if spec.qk_norm:
            w[p + "attn.q_norm.weight"] = norm(hd)
            w[p + "attn.k_norm.weight"] = norm(hd)
        if spec.post_norms:
            w[p + "attn_post_norm.weight"] = norm(d)
            w[p + "mlp_post_norm.weight"] = norm(d)
    return w


def tiny_model(kind: str, seed: int = 0, dtype: torch.dtype = torch.float64,
               unit_final_norm: bool = False) -> Module:
    """A seeded random decoder of family `kind` (one of SPECS)."""
    spec = SPECS[kind]
    return build_decoder(spec, random_weights(spec, seed, dtype, unit_final_norm),
                         origin="tests.models", source=f"random {kind} seed {seed}")


def token_batch(seed: int = 0, batch: int = 2, seq: int = 7) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1000)
    return torch.randint(0, VOCAB, (batch, seq), generator=gen)


def config(name: str = "hand-built") -> ModelConfig:
    return ModelConfig(architecture=name, vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=0,
                       num_heads=1, num_kv_heads=1, head_dim=HIDDEN, intermediate_size=HIDDEN,
                       max_position=64)


def hand_built(*, norm_weights: bool = True, norm_feeds_add: bool = False, seed: int = 0,
               dtype: torch.dtype = torch.float64) -> Module:
    """ids -> embed -> rms_norm(w1) -> {linear a, linear b} -> add -> rms_norm(w2) -> lm_head.

    `norm_weights=False` leaves both norms without a weight (already folded); `norm_feeds_add`
    also sends the first norm's output into the add (a residual), so it must not be folded.
    """
    gen = torch.Generator().manual_seed(seed)

    def t(*shape: int, base: float = 0.0) -> torch.Tensor:
        return (base + torch.randn(*shape, generator=gen, dtype=torch.float64) * 0.3).to(dtype)

    weights = {"embed.weight": t(VOCAB, HIDDEN), "a.weight": t(HIDDEN, HIDDEN),
               "b.weight": t(HIDDEN, HIDDEN), "b.bias": t(HIDDEN), "head.weight": t(VOCAB, HIDDEN)}
    if norm_weights:
        weights["n1.weight"] = t(HIDDEN, base=1.0)
        weights["n2.weight"] = t(HIDDEN, base=1.0)
    g = Graph()
    dt = {torch.float64: "f64", torch.float32: "f32"}[dtype]

    def c(name: str):
        return g.const(name, dt, tuple(weights[name].shape))

    ids = g.add_input("input_ids", "i64", ("batch", "seq"))
    x = emit(g, "embedding", [ids, c("embed.weight")], role="embed").output
    n1_in = [x, c("n1.weight")] if norm_weights else [x]
    n1 = emit(g, "rms_norm", n1_in, {"eps": 1e-6}, role="attn_norm", layer=0).output
    a = emit(g, "linear", [n1, c("a.weight")], role="attn.q_proj", layer=0).output
    b = emit(g, "linear", [n1, c("b.weight"), c("b.bias")], role="attn.k_proj", layer=0).output
    h = emit(g, "add", [a, b], role="attn.residual", layer=0).output
    if norm_feeds_add:
        h = emit(g, "add", [h, n1], role="mlp.residual", layer=0).output
    n2_in = [h, c("n2.weight")] if norm_weights else [h]
    n2 = emit(g, "rms_norm", n2_in, {"eps": 1e-6}, role="final_norm").output
    logits = emit(g, "linear", [n2, c("head.weight")], role="lm_head", name="logits").output
    g.outputs = [logits]
    return Module(g, weights, config())


def with_settings(module: Module, **extra) -> Module:
    """`module` with its config's `extra` updated (tests of config bookkeeping)."""
    module.config = dataclasses.replace(module.config, extra={**module.config.extra, **extra})
    return module
