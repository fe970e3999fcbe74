"""ONNX Runtime contrib-op lowering rules (com.microsoft), layered over the standard `RULES`.

`rule_table("contrib")` is the table the CPU target lowers with by default; `rule_table("standard")`
is today's standard-ONNX lowering, for runtimes without the contrib ops (its `qlinear` becomes the
standard-op dequantize + MatMul, so nothing outside the ONNX domain is emitted). What the contrib
table changes, and why each pays on CPU decode (one token: the cost is op count and memory reads):

- `attention` -> GroupQueryAttention with past/present KV in the same [batch, kv_heads, len,
  head_dim] layout as the standard rule. Its `seqlens_k` and `total_sequence_length` come from an
  extra graph input, attention_mask [batch, past + seq] (int64 ones, what onnxruntime-genai
  feeds), not from the cache's shape: so the cache may be one max-length buffer that past and
  present share, which the runtime and onnxruntime-genai then update in place. Softcap maps to
  GQA's `softcap`, a sliding window of w keys (the IR's: query i sees keys j with i - j < w) to
  `local_window_size` w (checked against the reference in the tests). A node GQA cannot express
  (non-causal attention, a head_dim that is not a multiple of 16, as stories260K's 8) falls back
  to the standard rule, and the fallback is logged.
- `rotary` -> inside GroupQueryAttention (`do_rotary`, with the IR's position ids) when q and k
  of one attention are rotated alike over the whole head, else RotaryEmbedding (com.microsoft)
  (fuse.py); both with cos/sin caches [max_position, rotary_dim / 2] computed in float64 at
  lowering and rounded once, as the reference computes them.
- `qlinear` -> MatMulNBits at `accuracy_level` (quant.py; 4 = int8 compute by default), with the
  projections that share an input and a quantization (q/k/v, gate/up) packed into one (fuse.py);
  a packed q/k/v feeding a GQA directly is read by it packed.
- `add` (a residual) + the `rms_norm` reading it -> one SkipSimplifiedLayerNormalization whose
  fourth output is the sum. This is done in the lowering, not as an onnxscript rewrite of the ONNX
  graph: at the IR level the pattern is two nodes with their attributes (eps, offset, group) in
  plain sight, while in ONNX the norm is already six nodes whose match would have to re-derive
  them. The `add` rule looks at its output's users; when one is an rms_norm it can fuse (no
  per-head group, constant or absent weight, operands of the same shape) it emits the fused node
  and leaves the normalised value for that norm's rule to pick up.
- A standalone rms_norm (layer 0's first norm, per-head q/k norms) keeps the standard pattern:
  ONNX Runtime fuses it into SimplifiedLayerNormalization itself at "extended" and above (when a
  scale Mul ends it, so a weightless one gets a Mul by ones), and writing that op ourselves would
  put a non-standard op into the ONNX domain, which onnx.checker rejects.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from splice.ir.core import Node
from .context import LoweringContext, LoweringError, Rule, describe
from .fuse import (absorbed_rotaries, gqa_refusal, lower_qlinear_packed, packed_qkv,
                   rotary_is_absorbed, rotary_refusal)
from .quant import ACCURACY_LEVEL, ACCURACY_LEVELS, MS_DOMAIN, _consts, _dequant_matmul
from .rules import RULES, lower_add, lower_attention, lower_rms_norm, lower_rotary

log = logging.getLogger(__name__)

OPS_MODES = ("contrib", "standard")
ATTENTION_MASK = "attention_mask"  # the graph input GroupQueryAttention's lengths come from


def _gqa_lengths(ctx: LoweringContext, node: Node, q: ir.Value) -> tuple[ir.Value, ir.Value]:
    """seqlens_k (int32 [batch]: ones in the row of attention_mask, less one) and
    total_sequence_length (int32 scalar: its width), shared by every attention. From a mask input
    rather than from the cache's shape, so the cache may be one max-length buffer that past and
    present share (the runtime's and onnxruntime-genai's past_present_share_buffer)."""
    key = "gqa_lengths"
    if key in ctx.cache:
        return ctx.cache[key]
    mask = ctx.graph_input(ATTENTION_MASK, ir.DataType.INT64, ["batch", "past+seq"])
    ones = ctx.op("ReduceSum", [mask, ctx.ints(1)], {"keepdims": 0})
    seqlens = ctx.op("Cast", [ctx.op("Sub", [ones, ctx.const(1, np.int64)])],
                     {"to": ir.DataType.INT32})
    total = ctx.op("Squeeze", [ctx.op("Shape", [mask], {"start": 1, "end": 2})])
    total32 = ctx.op("Cast", [total], {"to": ir.DataType.INT32})
    ctx.cache[key] = (seqlens, total32)
    return seqlens, total32


def lower_attention_gqa(ctx: LoweringContext, node: Node) -> Sequence[ir.Value]:
    why = gqa_refusal(node)
    if why:
        log.info("%s: standard attention (%s)", describe(node), why)
        return lower_attention(ctx, node)
    a = node.attrs
    rot = absorbed_rotaries(ctx, node)
    q_src = rot[0].inputs[0] if rot else node.inputs[0]
    k_src = rot[1].inputs[0] if rot else node.inputs[1]
    packed = packed_qkv(ctx, q_src, k_src, node.inputs[2])
    if packed is not None:  # GQA splits the packed projection itself
        q, k, v = packed, None, None
    else:
        q, k, v = ctx.values[id(q_src)], ctx.values[id(k_src)], ctx.input(node, 2)
    past_k, past_v = ctx.input(node, 3), ctx.input(node, 4)
    seqlens, total = _gqa_lengths(ctx, node, q)
    attrs = {"num_heads": a["num_heads"], "kv_num_heads": a["num_kv_heads"],
             "scale": float(a["scale"])}
    inputs = [q, k, v, past_k, past_v, seqlens, total]
    if rot:
        cos, sin = _rotary_caches(ctx, rot[0], a["head_dim"])
        inputs += [cos, sin, ctx.values[id(rot[0].inputs[1])]]
        attrs.update(do_rotary=1, rotary_interleaved=int(bool(rot[0].attrs["interleaved"])))
    if a["softcap"]:
        attrs["softcap"] = float(a["softcap"])
    if a["sliding_window"]:
        attrs["local_window_size"] = int(a["sliding_window"])
    y, pk, pv = ctx.op("GroupQueryAttention", inputs, attrs, domain=MS_DOMAIN, outputs=3)
    return [y, pk, pv]


def _rotary_caches(ctx: LoweringContext, node: Node, rd: int) -> tuple[ir.Value, ir.Value]:
    """cos and sin [max_position, rd / 2] (times the rope scale), float64 then rounded once."""
    inv, scale = node.inputs[2], node.attrs["scale"]
    key = ("rotary_cache", inv.const, scale)
    if key not in ctx.cache:
        n = int(ctx.module.config.max_position)
        inv64 = ctx.module.weight(inv).detach().cpu().double().numpy()
        ang = np.arange(n, dtype=np.float64)[:, None] * inv64[None, :]
        ctx.cache[key] = tuple(ctx.const((fn(ang) * scale).astype(np.float32))
                               for fn in (np.cos, np.sin))
    return ctx.cache[key]


def lower_rotary_contrib(ctx: LoweringContext, node: Node) -> Sequence[ir.Value]:
    if rotary_is_absorbed(ctx, node):  # GroupQueryAttention rotates; this Identity is dead code
        return [ctx.input(node, 0)]
    why = rotary_refusal(ctx, node)
    if why:
        log.info("%s: standard rotary (%s)", describe(node), why)
        return lower_rotary(ctx, node)
    a = node.attrs
    hd = a["head_dim"]
    rd = a["rotary_dim"] or hd
    cos, sin = _rotary_caches(ctx, node, rd)
    attrs = {"interleaved": int(bool(a["interleaved"])),
             "num_heads": node.inputs[0].shape[-1] // hd}
    if rd != hd:
        attrs["rotary_embedding_dim"] = rd
    return [ctx.op("RotaryEmbedding", [ctx.input(node, 0), ctx.input(node, 1), cos, sin], attrs,
                   domain=MS_DOMAIN)]


def _fusable_norm(node: Node) -> Node | None:
    """The rms_norm reading this add's output that SkipSimplifiedLayerNormalization can absorb."""
    a, b = node.inputs[0], node.inputs[1]
    if a.shape != b.shape or len(a.shape) != 3 or not isinstance(a.shape[-1], int):
        return None
    for user, i in node.outputs[0].uses:
        if user.op != "rms_norm" or i != 0 or user.attrs["group"]:
            continue
        w = user.inputs[1] if len(user.inputs) > 1 else None
        if w is None or w.is_const:
            return user
    return None


def _gamma(ctx: LoweringContext, norm: Node) -> ir.Value:
    """The norm's scale as a constant (ones for a weightless norm, the offset added)."""
    w = norm.inputs[1] if len(norm.inputs) > 1 else None
    offset = norm.attrs["offset"]
    if w is None:
        return ctx.const(np.ones(norm.inputs[0].shape[-1], np.float32))
    if offset:
        return ctx.weight(w, f"plus{offset:g}", lambda arr: arr + np.float32(offset))
    return ctx.weight(w)


def lower_add_skip_norm(ctx: LoweringContext, node: Node) -> Sequence[ir.Value]:
    norm = _fusable_norm(node)
    if norm is None:
        return lower_add(ctx, node)
    y, mean, inv_std, total = ctx.op("SkipSimplifiedLayerNormalization",
                                     [ctx.input(node, 0), ctx.input(node, 1), _gamma(ctx, norm)],
                                     {"epsilon": float(norm.attrs["eps"])}, domain=MS_DOMAIN,
                                     outputs=4)
    mean.name = inv_std.name = ""  # optional outputs left out: not computed
    ctx.cache[("skip_norm", id(norm))] = y
    return [total]


def lower_rms_norm_contrib(ctx: LoweringContext, node: Node) -> Sequence[ir.Value]:
    """An rms_norm an add absorbed (lower_add_skip_norm) is its output; others keep the standard
    pattern, which ONNX Runtime's optimiser fuses into SimplifiedLayerNormalization, but only
    when a scale Mul ends it: a weightless norm (after fold_norms) gets a Mul by ones so that
    it is one node at run time rather than five."""
    fused = ctx.cache.pop(("skip_norm", id(node)), None)
    if fused is not None:
        return [fused]
    y = lower_rms_norm(ctx, node)
    if len(node.inputs) > 1 or node.attrs["group"] or not isinstance(node.inputs[0].shape[-1],
                                                                     int):
        return y
    return [ctx.op("Mul", [y[0], _gamma(ctx, node)])]


def lower_qlinear_standard(ctx: LoweringContext, node: Node) -> Sequence[ir.Value]:
    """qlinear in standard ops only: dequantize (folded at session start) and MatMul."""
    _consts(ctx, node)
    return [_dequant_matmul(ctx, node)]


CONTRIB_RULES: dict[str, Rule] = {
    "attention": lower_attention_gqa,
    "rotary": lower_rotary_contrib,
    "add": lower_add_skip_norm,
    "rms_norm": lower_rms_norm_contrib,
}


def rule_table(ops: str = "contrib", *, accuracy_level: int = ACCURACY_LEVEL
               ) -> Mapping[str, Rule]:
    """The lowering table for `ops`: "contrib" (ONNX Runtime's com.microsoft ops where they are
    faster; qlinear at `accuracy_level`) or "standard" (ONNX-domain ops only)."""
    if ops == "standard":
        return {**RULES, "qlinear": lower_qlinear_standard}
    if ops == "contrib":
        if accuracy_level not in ACCURACY_LEVELS:
            raise LoweringError(f"accuracy_level {accuracy_level!r}; MatMulNBits accepts "
                                f"{', '.join(map(str, ACCURACY_LEVELS))} (0: float32, 4: int8 "
                                "compute)")

        def qlinear(ctx: LoweringContext, node: Node) -> Sequence[ir.Value]:
            return lower_qlinear_packed(ctx, node, accuracy_level=accuracy_level)
        return {**RULES, **CONTRIB_RULES, "qlinear": qlinear}
    raise LoweringError(f"ops={ops!r}; accepted: {', '.join(OPS_MODES)}")
