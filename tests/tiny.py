"""Tiny seeded random decoders for backend and runtime tests.

`tiny_module(**changes)` builds the canonical decoder graph (frontend.decoder.build_decoder) over
random weights, with a byte-level BPE tokenizer (256 byte tokens + <s>, </s>) whose vocabulary is
the model's, so text round-trips exactly. VARIANTS names the configurations that exercise every
attribute the ONNX lowering handles.
"""

from __future__ import annotations

import json
import math

import torch
from splice.frontend.decoder import DecoderSpec, build_decoder
from splice.ir.core import Module, Tokenizer, emit

VOCAB = 258
BOS, EOS = 256, 257

BASE = dict(architecture="TinyLlama", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
            num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_eps=1e-5, max_position=64,
            bos_token_id=BOS)

VARIANTS: dict[str, dict] = {
    "llama_gqa": {},
    "mha_window": dict(num_kv_heads=4, sliding_window=6, attn_scale=0.2),
    "qwen3_qknorm_tied": dict(qk_norm=True, tie_embeddings=True),
    "gemma2": dict(norm_offset=1.0, post_norms=True, attn_softcap=20.0, final_softcap=15.0,
                   activation="gelu_tanh", embed_scale=8.0, sliding_window=5,
                   layer_types=("sliding", "full"), tie_embeddings=True),
    "qwen2_bias_gelu": dict(qkv_bias=True, activation="gelu", num_kv_heads=1),
    "partial_interleaved": dict(rotary_dim=8, rope_interleaved=True, rope_scale=0.9, o_bias=True,
                                mlp_bias=True),
}


def byte_tokenizer() -> Tokenizer:
    """A byte-level BPE without merges: every byte is one token, so decode(encode(t)) == t."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    vocab["<s>"], vocab["</s>"] = BOS, EOS
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    return Tokenizer("hf", {"tokenizer.json": tok.to_str().encode(),
                            "tokenizer_config.json": json.dumps({"bos_token": "<s>"}).encode()})


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (what ByteLevel's alphabet holds)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def tiny_spec(**changes) -> DecoderSpec:
    return DecoderSpec(**{**BASE, **changes})


def tiny_weights(spec: DecoderSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the canonical names, scaled so activations stay O(1) through the
    layers (the tests compare logits, which random unscaled weights would blow up)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=None):
        scale = scale if scale is not None else 1.0 / math.sqrt(shape[-1])
        return torch.randn(*shape, generator=g) * scale

    h, q, kv = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    norm = (lambda n: rnd(n, scale=0.1)) if spec.norm_offset else (lambda n: 1 + rnd(n, scale=0.1))
    w = {"embed.weight": rnd(spec.vocab_size, h, scale=1.0 / math.sqrt(spec.embed_scale)),
         "final_norm.weight": norm(h)}
    if not spec.tie_embeddings:
        w["lm_head.weight"] = rnd(spec.vocab_size, h)
    rd = spec.rotary_dim or spec.head_dim
    w["rope.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd)
    if "sliding" in spec.layer_types:
        w["rope.inv_freq_local"] = 1.0 / 100 ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd)
    for i in range(spec.num_layers):
        p = f"layers.{i}."
        w[p + "attn_norm.weight"] = norm(h)
        w[p + "mlp_norm.weight"] = norm(h)
        for name, out in (("q", q), ("k", kv), ("v", kv)):
            w[p + f"attn.{name}_proj.weight"] = rnd(out, h)
            if spec.qkv_bias:
                w[p + f"attn.{name}_proj.bias"] = rnd(out, scale=0.1)
        w[p + "attn.o_proj.weight"] = rnd(h, q)
        if spec.o_bias:
            w[p + "attn.o_proj.bias"] = rnd(h, scale=0.1)
        if spec.qk_norm:
            w[p + "attn.q_norm.weight"] = norm(spec.head_dim)
            w[p + "attn.k_norm.weight"] = norm(spec.head_dim)
        if spec.post_norms:
            w[p + "attn_post_norm.weight"] = norm(h)
            w[p + "mlp_post_norm.weight"] = norm(h)
        w[p + "mlp.gate_proj.weight"] = rnd(spec.intermediate_size, h)
        w[p + "mlp.up_proj.weight"] = rnd(spec.intermediate_size, h)
        w[p + "mlp.down_proj.weight"] = rnd(h, spec.intermediate_size)
        if spec.mlp_bias:
            for name, n in (("gate", spec.intermediate_size), ("up", spec.intermediate_size),
                            ("down", h)):
                w[p + f"mlp.{name}_proj.bias"] = rnd(n, scale=0.1)
    return w


def tiny_module(seed: int = 0, **changes) -> Module:
    spec = tiny_spec(**changes)
    return build_decoder(spec, tiny_weights(spec, seed), origin="tests.tiny", source="random",
                         tokenizer=byte_tokenizer())


def add_extra_ops(module: Module, seed: int = 1) -> Module:
    """Insert the ops the canonical graph does not use, as passes do, keeping the module valid:
    channel_scale after layer 0's attention norm, a Hadamard transform and a square matmul before
    its MLP down projection, a per-head Hadamard on layer 1's v projection and a block-diagonal
    scaled one after layer 1's attention norm."""
    g = torch.Generator().manual_seed(seed)
    graph = module.graph

    def after(node, op, inputs, attrs=None, role=""):
        new = emit(graph, op, inputs, attrs, role=role, layer=node.layer, origin="tests.tiny",
                   after=node)
        for user, i in [u for u in node.output.uses if u[0] is not new]:
            user.replace_input(i, new.output)
        return new

    norm = graph.find(role="attn_norm", layer=0)[0]
    width = norm.output.shape[-1]
    scale = module.add_weight("extra.scale", 1 + 0.1 * torch.randn(width, generator=g))
    after(norm, "channel_scale", [norm.output, scale], role="extra.scale")
    down = graph.find(role="mlp.down_proj", layer=0)[0]
    x = down.inputs[0]
    n = x.shape[-1]
    mat = module.add_weight("extra.mat", torch.eye(n) + 0.05 * torch.randn(n, n, generator=g))
    had = emit(graph, "hadamard", [x], {"size": n}, role="extra.hadamard", layer=0,
               origin="tests.tiny", before=down)
    mm = emit(graph, "matmul", [had.output, mat], role="extra.matmul", layer=0, origin="tests.tiny",
              before=down)
    down.replace_input(0, mm.output)
    v = graph.find(role="attn.v_proj", layer=1)[0]
    cfg = module.config
    after(v, "hadamard", [v.output], {"size": cfg.head_dim, "group": cfg.num_kv_heads},
          role="extra.hadamard_heads")
    norm1 = graph.find(role="attn_norm", layer=1)[0]
    after(norm1, "hadamard", [norm1.output], {"size": cfg.hidden_size, "block": 16, "scale": 0.5},
          role="extra.hadamard_block")
    return module
