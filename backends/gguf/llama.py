"""The IR of a decoder -> llama.cpp's "llama" architecture: tensor names, row layout, metadata.

llama.cpp's llama graph is exactly splice's canonical decoder with nothing added: token embedding,
per layer RMSNorm -> q/k/v (no bias) -> RoPE -> causal GQA attention (scale 1/sqrt(head_dim), no
softcap, no sliding window) -> o_proj -> residual, RMSNorm -> SwiGLU MLP (silu(gate) * up ->
down) -> residual, a final RMSNorm and the lm_head (omitted when it is the embedding's own tensor,
which llama.cpp then reuses). `llama_layout` walks the graph, checks that every node is one of
those, wired as llama.cpp computes them, and refuses anything else naming the node and the pass
that made it (an online Hadamard, a patch left in the graph, a quantize node, a bias, ...).

Row layout: llama.cpp applies RoPE to interleaved pairs (2i, 2i + 1) of each head ("normal"
rope); splice's decoder, like transformers, rotates halves (i, i + hd/2). The q and k rows are
therefore permuted per head as llama.cpp's own convert_hf_to_gguf.py does; a quantized weight's
rows move whole (the groups run along the inputs), so its codes stay the optimised ones. A graph
whose rotary is already interleaved (rope_interleaved) is written as it is.

Names follow gguf.constants' MODEL_TENSORS for MODEL_ARCH.LLAMA; the metadata keys are the
gguf package's Keys. The same graph imported from Llama, Mistral (no sliding window), SmolLM2 or
a llama2.c checkpoint maps here; Qwen2 (q/k/v bias), Qwen3 (q/k norms) and Gemma (offset norms,
post norms, GELU, softcaps) are refused, with what differs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from splice.errors import InputError
from splice.ir.core import Module, Node

ARCH = "llama"
LAYER_ROLES = {  # role -> (op, GGUF tensor suffix or None)
    "attn_norm": ("rms_norm", "attn_norm"), "attn.q_proj": ("linear", "attn_q"),
    "attn.k_proj": ("linear", "attn_k"), "attn.v_proj": ("linear", "attn_v"),
    "attn.q_rotary": ("rotary", None), "attn.k_rotary": ("rotary", None),
    "attn.attention": ("attention", None), "attn.o_proj": ("linear", "attn_output"),
    "attn.residual": ("add", None), "mlp_norm": ("rms_norm", "ffn_norm"),
    "mlp.gate_proj": ("linear", "ffn_gate"), "mlp.up_proj": ("linear", "ffn_up"),
    "mlp.act": ("silu", None), "mlp.mul": ("mul", None), "mlp.down_proj": ("linear", "ffn_down"),
    "mlp.residual": ("add", None),
}
TOP_ROLES = {"embed": "embedding", "final_norm": "rms_norm", "lm_head": "linear"}
QUANTIZED = {"linear": "qlinear", "embedding": "qembedding"}


@dataclasses.dataclass
class Entry:
    """One GGUF tensor: its name, the node whose weight it is (or a float tensor for a norm),
    and the row order (None: as stored)."""

    name: str
    node: Node | None
    array: np.ndarray | None = None
    rows: np.ndarray | None = None


@dataclasses.dataclass
class Layout:
    arch: str
    metadata: dict[str, Any]
    tensors: list[Entry]
    tied: bool


def _refuse(node: Node, why: str) -> InputError:
    origin = node.origin or "the frontend"
    return InputError(f"the gguf backend writes llama.cpp's {ARCH!r} graph; node "
                      f"%{node.output.name} ({node.op}, role {node.role!r}, made by {origin}) "
                      f"{why}")


def _op_ok(node: Node, op: str) -> bool:
    return node.op == op or node.op == QUANTIZED.get(op)


def _check_linear(node: Node) -> None:
    bias = node.inputs[4] if node.op == "qlinear" and len(node.inputs) > 4 else \
        node.inputs[2] if node.op == "linear" and len(node.inputs) > 2 else None
    if bias is not None:
        raise _refuse(node, "has a bias, which the llama graph does not")
    if not node.inputs[1].is_const:
        raise _refuse(node, "has a weight that is not a constant")


def _norm(module: Module, node: Node, name: str) -> Entry:
    if node.attrs.get("offset", 0.0) != 0.0 or node.attrs.get("group", 0):
        raise _refuse(node, "is an offset or grouped RMSNorm (Gemma's (1 + w)); llama's is w * x")
    width = node.output.shape[-1]
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        w = module.weight(node.inputs[1]).detach().to("cpu").float().numpy()
    else:  # folded into the following linears: a unit norm
        w = np.ones(width, dtype=np.float32)
    return Entry(name, None, np.ascontiguousarray(w, dtype=np.float32))


def _head_rows(n_heads: int, head_dim: int) -> np.ndarray:
    """Row order taking rotate-half heads to interleaved pairs: GGUF row h*hd + 2i + j is the
    splice row h*hd + j*hd/2 + i (convert_hf_to_gguf.py's permute)."""
    i = np.arange(head_dim // 2)
    per_head = np.stack([i, i + head_dim // 2], axis=1).reshape(-1)
    return (np.arange(n_heads)[:, None] * head_dim + per_head[None, :]).reshape(-1)


def _rope_theta(module: Module, rot: Node, head_dim: int) -> float:
    inv = module.weight(rot.inputs[2]).detach().to("cpu").double().numpy()
    if inv.shape != (head_dim // 2,):
        raise _refuse(rot, f"rotates {2 * inv.shape[0]} of {head_dim} dims; partial rotary is "
                      "not written")
    theta = module.config.extra.get("rope_theta")
    if not theta:
        theta = float(inv[1] ** (-head_dim / 2.0)) if len(inv) > 1 else 10000.0
    expect = float(theta) ** (-np.arange(0, head_dim, 2) / head_dim)
    if not np.allclose(inv, expect, rtol=1e-5, atol=0):
        raise _refuse(rot, f"uses rotary frequencies that are not theta^(-2i/d) for theta "
                      f"{theta:g} (rope scaling); llama.cpp's llama reads only rope.freq_base")
    return float(theta)


def llama_layout(module: Module) -> Layout:
    """The GGUF tensors and metadata of `module`, or an InputError naming the first node that
    llama.cpp's llama graph does not have."""
    g = module.graph
    layers: dict[Any, dict[str, Node]] = {}
    order: list[Any] = []
    top: dict[str, Node] = {}
    for node in g.nodes:
        if node.layer is None:
            want = TOP_ROLES.get(node.role)
            if want is None or not _op_ok(node, want) or node.role in top:
                raise _refuse(node, "is not part of it (outside the layers it has only the "
                              "embedding, the final RMSNorm and the lm_head)")
            top[node.role] = node
            continue
        spec = LAYER_ROLES.get(node.role)
        if spec is None or not _op_ok(node, spec[0]):
            raise _refuse(node, "is not part of it (a llama layer is RMSNorm, q/k/v, RoPE, "
                          "attention, o_proj, RMSNorm, SwiGLU MLP and two residual adds)")
        here = layers.setdefault(node.layer, {})
        if node.layer not in order:
            order.append(node.layer)
        if node.role in here:
            raise _refuse(node, f"is a second {node.role} in layer {node.layer}")
        here[node.role] = node
    missing = [r for r in TOP_ROLES if r not in top]
    if missing:
        raise InputError(f"the gguf backend: the graph has no {', '.join(missing)} node(s); "
                         "llama.cpp's llama graph needs the embedding, final norm and lm_head")
    embed, final, head = top["embed"], top["final_norm"], top["lm_head"]
    if embed.attrs.get("scale", 1.0) != 1.0:
        raise _refuse(embed, "scales the embedding (Gemma's sqrt(d)); llama's does not")
    _check_linear(head)
    entries = [Entry("token_embd.weight", embed)]
    first_attn = None
    stream = embed.output
    for idx, key in enumerate(order):
        nodes = layers[key]
        absent = [r for r in LAYER_ROLES if r not in nodes]
        if absent:
            any_node = next(iter(nodes.values()))
            raise _refuse(any_node, f"sits in layer {key}, which lacks {', '.join(absent)}")
        n = nodes
        att = n["attn.attention"]
        a = att.attrs
        first_attn = first_attn or att
        hd = a["head_dim"]
        if not a.get("causal", True) or a.get("softcap", 0.0) or a.get("sliding_window", 0):
            raise _refuse(att, "is not plain causal attention (softcap or sliding window)")
        if not math.isclose(a["scale"], 1.0 / math.sqrt(hd), rel_tol=1e-6):
            raise _refuse(att, f"scales scores by {a['scale']:g}, not 1/sqrt(head_dim)")
        if (a["num_heads"], a["num_kv_heads"], hd) != tuple(first_attn.attrs[x] for x in (
                "num_heads", "num_kv_heads", "head_dim")):
            raise _refuse(att, "has other head counts than layer 0's; llama.cpp's are global")
        wiring = [
            (n["attn_norm"], 0, stream), (n["attn.q_proj"], 0, n["attn_norm"].output),
            (n["attn.k_proj"], 0, n["attn_norm"].output),
            (n["attn.v_proj"], 0, n["attn_norm"].output),
            (n["attn.q_rotary"], 0, n["attn.q_proj"].output),
            (n["attn.k_rotary"], 0, n["attn.k_proj"].output),
            (att, 0, n["attn.q_rotary"].output), (att, 1, n["attn.k_rotary"].output),
            (att, 2, n["attn.v_proj"].output), (n["attn.o_proj"], 0, att.outputs[0]),
            (n["mlp_norm"], 0, n["attn.residual"].output),
            (n["mlp.gate_proj"], 0, n["mlp_norm"].output),
            (n["mlp.up_proj"], 0, n["mlp_norm"].output),
            (n["mlp.act"], 0, n["mlp.gate_proj"].output),
            (n["mlp.down_proj"], 0, n["mlp.mul"].output)]
        for node, i, value in wiring:
            if node.inputs[i] is not value:
                raise _refuse(node, f"reads %{node.inputs[i].name} where llama.cpp's layer "
                              f"{idx} reads %{value.name}")
        for add, a_in, b_in in ((n["attn.residual"], stream, n["attn.o_proj"].output),
                                (n["mlp.residual"], n["attn.residual"].output,
                                 n["mlp.down_proj"].output)):
            if {id(v) for v in add.inputs} != {id(a_in), id(b_in)}:
                raise _refuse(add, "is not the residual add of llama.cpp's layer")
        mul = n["mlp.mul"]
        if {id(v) for v in mul.inputs} != {id(n["mlp.act"].output), id(n["mlp.up_proj"].output)}:
            raise _refuse(mul, "is not silu(gate) * up")
        for role in ("attn.q_rotary", "attn.k_rotary"):
            r = n[role].attrs
            if r.get("scale", 1.0) != 1.0 or r.get("rotary_dim", 0) not in (0, hd):
                raise _refuse(n[role], "uses scaled or partial rotary embeddings")
        interleaved = n["attn.q_rotary"].attrs.get("interleaved", False)
        if n["attn.k_rotary"].attrs.get("interleaved", False) != interleaved:
            raise _refuse(n["attn.k_rotary"], "rotates keys in another layout than queries")
        p = f"blk.{idx}."
        entries.append(_norm(module, n["attn_norm"], p + "attn_norm.weight"))
        for role in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            _check_linear(n[role])
            rows = None
            if role in ("attn.q_proj", "attn.k_proj") and not interleaved:
                heads = a["num_heads"] if role == "attn.q_proj" else a["num_kv_heads"]
                rows = _head_rows(heads, hd)
            entries.append(Entry(p + LAYER_ROLES[role][1] + ".weight", n[role], rows=rows))
        entries.append(_norm(module, n["mlp_norm"], p + "ffn_norm.weight"))
        stream = n["mlp.residual"].output
    if first_attn is None:
        raise InputError("the gguf backend: the graph has no decoder layers")
    if final.inputs[0] is not stream or head.inputs[0] is not final.output:
        raise _refuse(final, "is not the final norm between the last layer and the lm_head")
    entries.append(_norm(module, final, "output_norm.weight"))
    tied = head.op == "linear" and embed.op == "embedding" and \
        head.inputs[1] is embed.inputs[1]
    tied = tied or (head.op == "qlinear" and embed.op == "qembedding" and all(
        x is y for x, y in zip(head.inputs[1:4], embed.inputs[1:4])))
    if not tied:
        entries.append(Entry("output.weight", head))
    a = first_attn.attrs
    hd = a["head_dim"]
    cfg = module.config
    d = embed.output.shape[-1]
    eps = {layers[k]["attn_norm"].attrs["eps"] for k in order} | {final.attrs["eps"]}
    if len(eps) != 1:
        raise _refuse(final, f"norms use several epsilons {sorted(eps)}; llama.cpp has one")
    ffn = {layers[k]["mlp.gate_proj"].output.shape[-1] for k in order}
    if len(ffn) != 1:
        raise InputError(f"the gguf backend: layers have MLP widths {sorted(ffn)}; llama.cpp's "
                         "llama has one feed_forward_length")
    rot = layers[order[0]]["attn.q_rotary"]
    meta = {
        "context_length": int(cfg.max_position), "embedding_length": int(d),
        "block_count": len(order), "feed_forward_length": int(ffn.pop()),
        "attention.head_count": int(a["num_heads"]),
        "attention.head_count_kv": int(a["num_kv_heads"]),
        "attention.layer_norm_rms_epsilon": float(eps.pop()),
        "rope.freq_base": _rope_theta(module, rot, hd), "rope.dimension_count": int(hd),
        "vocab_size": int(cfg.vocab_size),
    }
    if hd * a["num_heads"] != d:
        meta["attention.key_length"] = meta["attention.value_length"] = int(hd)
    return Layout(ARCH, meta, entries, tied)
