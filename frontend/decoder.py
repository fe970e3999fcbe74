"""The canonical decoder graph that every LLaMA-family frontend produces.

Frontends translate a checkpoint's names and conventions (fused projections, interleaved RoPE rows,
(1 + w) norms) into `DecoderSpec` plus weights under the canonical names below, and this module
builds the graph. One builder means the passes and backends see one shape of graph, whatever the
source, and a new family costs a name map rather than a new graph.

Canonical weight names (role in brackets):
    embed.weight [embed]                        final_norm.weight [final_norm]
    lm_head.weight [lm_head] (absent when tied) rope.inv_freq, rope.inv_freq_local
    layers.{i}.attn_norm.weight [attn_norm]     layers.{i}.attn.{q,k,v,o}_proj.{weight,bias}
    layers.{i}.attn.{q,k}_norm.weight           layers.{i}.attn_post_norm.weight (sandwich norms)
    layers.{i}.mlp_norm.weight [mlp_norm]       layers.{i}.mlp.{gate,up,down}_proj.weight
    layers.{i}.mlp_post_norm.weight (sandwich norms)

Graph inputs: input_ids [batch, seq], position_ids [batch, seq], past.{i}.key / past.{i}.value
[batch, kv_heads, past, head_dim]; outputs: logits [batch, seq, vocab], present.{i}.key / .value.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from splice.ir.core import DTYPE_OF_TORCH, Graph, IRError, Module, ModelConfig, Tokenizer, emit


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    max_position: int
    norm_offset: float = 0.0          # Gemma's (1 + w) norms
    qk_norm: bool = False             # Qwen3, Gemma 3: per-head norms on q and k
    post_norms: bool = False          # Gemma 2/3 sandwich norms after attention and MLP
    qkv_bias: bool = False            # Qwen2
    o_bias: bool = False
    mlp_bias: bool = False
    activation: str = "silu"          # "silu" | "gelu_tanh" | "gelu"
    embed_scale: float = 1.0          # Gemma: sqrt(hidden)
    attn_scale: float | None = None   # default 1/sqrt(head_dim)
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    sliding_window: int = 0
    layer_types: tuple[str, ...] = () # "full" | "sliding" per layer; () = all full
    rotary_dim: int = 0               # 0 = the whole head
    rope_scale: float = 1.0           # attention_scaling of the rope type (cos/sin multiplier)
    rope_interleaved: bool = False
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def check(self) -> None:
        """Impossible sizes raise with the field and the accepted range."""
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim"):
            if getattr(self, f) <= 0:
                raise IRError(f"{self.architecture} config: {f} = {getattr(self, f)}; "
                              "it must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise IRError(f"{self.architecture} config: num_heads {self.num_heads} is not a "
                          f"multiple of num_kv_heads {self.num_kv_heads}")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise IRError(f"{self.architecture} config: {len(self.layer_types)} layer types "
                          f"for {self.num_layers} layers")
        if self.activation not in ("silu", "gelu_tanh", "gelu"):
            raise IRError(f"{self.architecture} config: activation {self.activation!r}; "
                          "supported: silu, gelu_tanh, gelu")

    def model_config(self, source: str, chat_template: str | None = None) -> ModelConfig:
        return ModelConfig(
            architecture=self.architecture, vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, num_layers=self.num_layers, num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            intermediate_size=self.intermediate_size, max_position=self.max_position,
            bos_token_id=self.bos_token_id, eos_token_ids=tuple(self.eos_token_ids),
            pad_token_id=self.pad_token_id, source=source, chat_template=chat_template,
            extra={"rms_eps": self.rms_eps, "activation": self.activation,
                   "tie_embeddings": self.tie_embeddings, "sliding_window": self.sliding_window,
                   "attn_softcap": self.attn_softcap, "final_softcap": self.final_softcap})


def build_decoder(spec: DecoderSpec, weights: dict[str, torch.Tensor], *, origin: str,
                  source: str = "", tokenizer: Tokenizer | None = None,
                  chat_template: str | None = None) -> Module:
    """Build the canonical graph over `weights` (canonical names; float tensors)."""
    spec.check()
    g = Graph()
    weights = dict(weights)
    missing: list[str] = []

    def w(name: str):
        t = weights.get(name)
        if t is None:
            missing.append(name)
            return None
        return g.const(name, DTYPE_OF_TORCH[t.dtype], tuple(t.shape))

    h, kv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
    ids = g.add_input("input_ids", "i64", ("batch", "seq"))
    pos = g.add_input("position_ids", "i64", ("batch", "seq"))
    past = [(g.add_input(f"past.{i}.key", "f32", ("batch", kv, "past", hd)),
             g.add_input(f"past.{i}.value", "f32", ("batch", kv, "past", hd)))
            for i in range(spec.num_layers)]
    embed = w("embed.weight")
    if missing:
        raise IRError(f"{spec.architecture}: checkpoint lacks weights {missing}")
    x = emit(g, "embedding", [ids, embed], {"scale": float(spec.embed_scale)}, name="embed",
             role="embed", origin=origin).output
    norm_attrs = {"eps": spec.rms_eps, "offset": spec.norm_offset}
    scale = spec.attn_scale if spec.attn_scale is not None else 1.0 / math.sqrt(hd)
    presents = []
    for i in range(spec.num_layers):
        p = f"layers.{i}."
        L = dict(layer=i, origin=origin)

        def lin(inp, proj: str, bias: bool):
            ws = [inp, w(p + proj + ".weight")] + ([w(p + proj + ".bias")] if bias else [])
            if missing:
                raise IRError(f"{spec.architecture}: checkpoint lacks weights {missing}")
            return emit(g, "linear", ws, role=proj, **L).output

        def norm(inp, name: str, **extra):
            wt = w(p + name + ".weight")
            if missing:
                raise IRError(f"{spec.architecture}: checkpoint lacks weights {missing}")
            return emit(g, "rms_norm", [inp, wt], {**norm_attrs, **extra}, role=name, **L).output

        sliding = bool(spec.layer_types) and spec.layer_types[i] == "sliding"
        n = norm(x, "attn_norm")
        q = lin(n, "attn.q_proj", spec.qkv_bias)
        k = lin(n, "attn.k_proj", spec.qkv_bias)
        v = lin(n, "attn.v_proj", spec.qkv_bias)
        if spec.qk_norm:
            q = norm(q, "attn.q_norm", group=hd)
            k = norm(k, "attn.k_norm", group=hd)
        inv = w("rope.inv_freq_local" if sliding and "rope.inv_freq_local" in weights else "rope.inv_freq")
        if missing:
            raise IRError(f"{spec.architecture}: checkpoint lacks weights {missing}")
        rot = {"head_dim": hd, "rotary_dim": spec.rotary_dim, "interleaved": spec.rope_interleaved,
               "scale": float(spec.rope_scale)}
        q = emit(g, "rotary", [q, pos, inv], rot, role="attn.q_rotary", **L).output
        k = emit(g, "rotary", [k, pos, inv], rot, role="attn.k_rotary", **L).output
        window = spec.sliding_window if (sliding or not spec.layer_types) else 0
        att = emit(g, "attention", [q, k, v, past[i][0], past[i][1]],
                   {"num_heads": h, "num_kv_heads": kv, "head_dim": hd, "scale": float(scale),
                    "softcap": float(spec.attn_softcap), "sliding_window": int(window)},
                   role="attn.attention", **L)
        g.rename(att.outputs[1], f"present.{i}.key")
        g.rename(att.outputs[2], f"present.{i}.value")
        presents += [att.outputs[1], att.outputs[2]]
        o = lin(att.outputs[0], "attn.o_proj", spec.o_bias)
        if spec.post_norms:
            o = norm(o, "attn_post_norm")
        x = emit(g, "add", [x, o], role="attn.residual", name=f"h.{i}.attn", **L).output
        n = norm(x, "mlp_norm")
        gate = lin(n, "mlp.gate_proj", spec.mlp_bias)
        up = lin(n, "mlp.up_proj", spec.mlp_bias)
        if spec.activation == "silu":
            act = emit(g, "silu", [gate], role="mlp.act", **L).output
        else:
            approx = "tanh" if spec.activation == "gelu_tanh" else "none"
            act = emit(g, "gelu", [gate], {"approximate": approx}, role="mlp.act", **L).output
        m = emit(g, "mul", [act, up], role="mlp.mul", **L).output
        d = lin(m, "mlp.down_proj", spec.mlp_bias)
        if spec.post_norms:
            d = norm(d, "mlp_post_norm")
        x = emit(g, "add", [x, d], role="mlp.residual", name=f"h.{i}", **L).output
    fn = w("final_norm.weight")
    head = w("embed.weight" if spec.tie_embeddings else "lm_head.weight")
    if missing:
        raise IRError(f"{spec.architecture}: checkpoint lacks weights {missing}")
    x = emit(g, "rms_norm", [x, fn], norm_attrs, role="final_norm", origin=origin).output
    logits = emit(g, "linear", [x, head], role="lm_head", name="logits", origin=origin).output
    if spec.final_softcap:
        raw = logits
        g.rename(raw, g.free_name("logits.raw"))
        logits = emit(g, "softcap", [raw], {"cap": float(spec.final_softcap)}, name="logits",
                      role="final_softcap", origin=origin).output
    g.outputs = [logits] + presents
    used = {k: t for k, t in weights.items() if k in g.consts}
    return Module(g, used, spec.model_config(source, chat_template), tokenizer)
