"""Standard-ONNX lowering rules, one per IR op (the `RULES` table).

Each rule reproduces the op's reference implementation in ir/ops.py, in the same order of float
operations where that order is visible in float32 (scores scaled after the q.k product, cos and sin
scaled in float64 before the cast, norm weights multiplied after normalising), so that ONNX Runtime
with its optimisations off agrees with the reference interpreter to float32 rounding. Patterns are
the ones ONNX Runtime's optimiser recognises where it has a fused kernel: Pow/ReduceMean/Add/Sqrt/
Div/Mul becomes SimplifiedLayerNormalization, MatMul + Add becomes a fused matmul.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from splice.ir.core import Node
from .context import LoweringContext, LoweringError, Rule, describe
from .hadamard import lower_hadamard as lower_hadamard_by_width
from .quant import lower_qembedding, lower_qlinear, lower_quantize


def _keep(rank: int) -> list[int]:
    """Reshape dims that copy the input's leading dims (ONNX Reshape's 0)."""
    return [0] * rank


def lower_embedding(ctx: LoweringContext, node: Node) -> Sequence[ir.Value]:
    ids, table = node.inputs[0], node.inputs[1]
    tied = table.is_const and any(u.op == "linear" and i == 1 for u, i in table.uses)
    if tied:
        # the lm_head multiplies by the transposed table; gathering its columns shares that one
        # initializer instead of storing the vocab x hidden matrix twice
        g = ctx.op("Gather", [ctx.weight(table, "T"), ctx.input(node, 0)], {"axis": 1})
        r = len(ids.shape)
        y = ctx.op("Transpose", [g], {"perm": [*range(1, r + 1), 0]})
    else:
        y = ctx.op("Gather", [ctx.input(node, 1), ctx.input(node, 0)], {"axis": 0})
    if node.attrs["scale"] != 1.0:
        y = ctx.op("Mul", [y, ctx.const(node.attrs["scale"])])
    return [y]


def lower_rms_norm(ctx: LoweringContext, node: Node) -> Sequence[ir.Value]:
    a = node.attrs
    rank = len(node.inputs[0].shape)
    x = ctx.input(node, 0)
    if a["group"]:
        x = ctx.op("Reshape", [x, ctx.ints(*_keep(rank - 1), -1, a["group"])])
    ms = ctx.op("ReduceMean", [ctx.op("Pow", [x, ctx.const(2.0)]), ctx.ints(-1)], {"keepdims": 1})
    y = ctx.op("Div", [x, ctx.op("Sqrt", [ctx.op("Add", [ms, ctx.const(a["eps"])])])])
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if w is not None:
        offset = a["offset"]
        if not offset:
            wv = ctx.input(node, 1)
        elif w.is_const:
            wv = ctx.weight(w, f"plus{offset:g}", lambda arr: arr + np.float32(offset))
        else:
            wv = ctx.op("Add", [ctx.input(node, 1), ctx.const(offset)])
        y = ctx.op("Mul", [y, wv])
    if a["group"]:
        y = ctx.op("Reshape", [y, ctx.ints(*_keep(rank - 1), -1)])
    return [y]


def lower_linear(ctx: LoweringContext, node: Node) -> Sequence[ir.Value]:
    w = node.inputs[1]
    wt = ctx.weight(w, "T") if w.is_const else ctx.op("Transpose", [ctx.input(node, 1)],
                                                       {"perm": [1, 0]})
    y = ctx.op("MatMul", [ctx.input(node, 0), wt])
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        y = ctx.op("Add", [y, ctx.input(node, 2)])
    return [y]


def lower_matmul(ctx: LoweringContext, node: Node) -> Sequence[ir.Value]:
    return [ctx.op("MatMul", [ctx.input(node, 0), ctx.input(node, 1)])]


def lower_add(ctx: LoweringContext, node: Node) -> Sequence[ir.Value]:
    return [ctx.op("Add", [ctx.input(node, 0), ctx.input(node, 1)])]


def lower_mul(ctx: LoweringContext, node: Node) -> Sequence[ir.Value]:
    return [ctx.op("Mul", [ctx.input(node, 0), ctx.input(node, 1)])]


def lower_silu(ctx: LoweringContext, node: Node) -> Sequence[ir.Value]:
    x = ctx.input(node, 0)
    return [ctx.op("Mul", [x, ctx.op("Sigmoid", [x])])]


def lower_gelu(ctx: LoweringContext, node: Node) -> Sequence[ir.Value]:
    approx = node.attrs["approximate"]
    if approx not in ("none", "tanh"):
        raise LoweringError(f"{describe(node)}: approximate={approx!r}; accepted: 'none', 'tanh'")
    return [ctx.op("Gelu", [ctx.input(node, 0)], {"approximate": approx})]


def _softcap(ctx: LoweringContext, x: ir.Value, cap: float) -> ir.Value:
    c = ctx.const(cap)
    return ctx.op("Mul", [ctx.op("Tanh", [ctx.op("Div", [x, c])]), c])


def lower_softcap(ctx: LoweringContext, node: Node) -> Sequence[ir.Value]:
    return [_softcap(ctx, ctx.input(node, 0), node.attrs["cap"])]


def _rotary_angles(ctx: LoweringContext, node: Node) -> tuple[ir.Value, ir.Value]:
    """cos and sin [..positions.., 1, rotary_dim/2] in float32, computed in float64 from the
    positions like the reference; shared by every rotary with the same positions, frequencies
    and scale (q and k of all layers, usually)."""
    pos, inv = node.inputs[1], node.inputs[2]
    scale = node.attrs["scale"]
    key = ("rotary", id(pos), id(inv), scale)
    if key in ctx.cache:
        return ctx.cache[key]
    if not inv.is_const:
        raise LoweringError(f"{describe(node)}: inv_freq %{inv.name} must be a constant")
    inv64 = ctx.weight(inv, "f64", lambda arr: arr.astype(np.float64))
    p = ctx.op("Unsqueeze", [ctx.op("Cast", [ctx.input(node, 1)], {"to": ir.DataType.DOUBLE}),
                             ctx.ints(-1)])
    ang = ctx.op("Mul", [p, inv64])
    out = []
    for fn in ("Cos", "Sin"):
        t = ctx.op(fn, [ang])
        if scale != 1.0:
            t = ctx.op("Mul", [t, ctx.const(scale, np.float64)])
        t = ctx.op("Cast", [t], {"to": ir.DataType.FLOAT})
        out.append(ctx.op("Unsqueeze", [t, ctx.ints(-2)]))
    ctx.cache[key] = (out[0], out[1])
    return out[0], out[1]


def lower_rotary(ctx: LoweringContext, node: Node) -> Sequence[ir.Value]:
    a = node.attrs
    hd = a["head_dim"]
    rd = a["rotary_dim"] or hd
    rank = len(node.inputs[0].shape)
    cos, sin = _rotary_angles(ctx, node)
    xh = ctx.op("Reshape", [ctx.input(node, 0), ctx.ints(*_keep(rank - 1), -1, hd)])
    rot, rest = xh, None
    if rd < hd:
        rot = ctx.op("Slice", [xh, ctx.ints(0), ctx.ints(rd), ctx.ints(-1)])
        rest = ctx.op("Slice", [xh, ctx.ints(rd), ctx.ints(hd), ctx.ints(-1)])
    if a["interleaved"]:
        # pairs (2i, 2i+1) become the last axis of size 2, so each half is one column of it
        pairs = ctx.op("Reshape", [rot, ctx.ints(*_keep(rank), -1, 2)])
        x1, x2 = ctx.op("Split", [pairs, ctx.ints(1, 1)], {"axis": -1}, outputs=2)
        cos = ctx.op("Unsqueeze", [cos, ctx.ints(-1)])
        sin = ctx.op("Unsqueeze", [sin, ctx.ints(-1)])
    else:
        x1, x2 = ctx.op("Split", [rot, ctx.ints(rd // 2, rd // 2)], {"axis": -1}, outputs=2)
    o1 = ctx.op("Sub", [ctx.op("Mul", [x1, cos]), ctx.op("Mul", [x2, sin])])
    o2 = ctx.op("Add", [ctx.op("Mul", [x2, cos]), ctx.op("Mul", [x1, sin])])
    out = ctx.op("Concat", [o1, o2], {"axis": -1})
    if a["interleaved"]:
        out = ctx.op("Reshape", [out, ctx.ints(*_keep(rank), -1)])
    if rest is not None:
        out = ctx.op("Concat", [out, rest], {"axis": -1})
    return [ctx.op("Reshape", [out, ctx.ints(*_keep(rank - 1), -1)])]


def _attention_mask(ctx: LoweringContext, node: Node, q: ir.Value, past_k: ir.Value) -> ir.Value:
    """The additive mask [seq, past+seq]: 0 where query i (at position past+i) may see key j,
    -inf elsewhere. Built from the runtime lengths, so one graph serves prefill and decode; shared
    by every attention with the same lengths and masking."""
    a = node.attrs
    key = ("mask", node.inputs[0].shape[1], node.inputs[3].shape[2], a["causal"],
           a["sliding_window"])
    if key in ctx.cache:
        return ctx.cache[key]
    seq = ctx.op("Shape", [q], {"start": 1, "end": 2})
    past = ctx.op("Shape", [past_k], {"start": 2, "end": 3})
    total = ctx.op("Squeeze", [ctx.op("Add", [past, seq])])
    one = ctx.const(1, np.int64)
    i = ctx.op("Unsqueeze", [ctx.op("Range", [ctx.op("Squeeze", [past]), total, one]),
                             ctx.ints(1)])
    j = ctx.op("Range", [ctx.const(0, np.int64), total, one])
    allowed = None
    if a["causal"]:
        allowed = ctx.op("LessOrEqual", [j, i])
    if a["sliding_window"]:
        near = ctx.op("Less", [ctx.op("Sub", [i, j]), ctx.const(a["sliding_window"], np.int64)])
        allowed = near if allowed is None else ctx.op("And", [allowed, near])
    mask = ctx.op("Where", [allowed, ctx.const(0.0), ctx.const(-np.inf)])
    ctx.cache[key] = mask
    return mask


def lower_attention(ctx: LoweringContext, node: Node) -> Sequence[ir.Value]:
    """Grouped-query attention without repeating the cache: q is viewed as
    [batch, kv_heads, group, seq, head_dim] (query head h = g * group + r, as repeat_interleave
    pairs them) and multiplied against the cache broadcast over the group axis."""
    a = node.attrs
    h, kv, hd = a["num_heads"], a["num_kv_heads"], a["head_dim"]
    rep = h // kv
    q, k, v, past_k, past_v = (ctx.input(node, i) for i in range(5))
    q5 = ctx.op("Transpose", [ctx.op("Reshape", [q, ctx.ints(0, 0, kv, rep, hd)])],
                {"perm": [0, 2, 3, 1, 4]})
    heads = []
    for t in (k, v):
        heads.append(ctx.op("Transpose", [ctx.op("Reshape", [t, ctx.ints(0, 0, kv, hd)])],
                            {"perm": [0, 2, 1, 3]}))
    present_k = ctx.op("Concat", [past_k, heads[0]], {"axis": 2})
    present_v = ctx.op("Concat", [past_v, heads[1]], {"axis": 2})
    kt = ctx.op("Unsqueeze", [ctx.op("Transpose", [present_k], {"perm": [0, 1, 3, 2]}),
                              ctx.ints(2)])
    scores = ctx.op("Mul", [ctx.op("MatMul", [q5, kt]), ctx.const(a["scale"])])
    if a["softcap"]:
        scores = _softcap(ctx, scores, a["softcap"])
    if a["causal"] or a["sliding_window"]:
        scores = ctx.op("Add", [scores, _attention_mask(ctx, node, q, past_k)])
    probs = ctx.op("Softmax", [scores], {"axis": -1})
    y5 = ctx.op("MatMul", [probs, ctx.op("Unsqueeze", [present_v, ctx.ints(2)])])
    y = ctx.op("Reshape", [ctx.op("Transpose", [y5], {"perm": [0, 3, 1, 2, 4]}),
                           ctx.ints(0, 0, h * hd)])
    return [y, present_k, present_v]


def lower_channel_scale(ctx: LoweringContext, node: Node) -> Sequence[ir.Value]:
    return [ctx.op("Mul", [ctx.input(node, 0), ctx.input(node, 1)])]


RULES: dict[str, Rule] = {
    # by width: a dense MatMul up to 128, two-sided or Kronecker-factored MatMuls above
    # (hadamard.py)
    "hadamard": lower_hadamard_by_width,
    "embedding": lower_embedding,
    "rms_norm": lower_rms_norm,
    "linear": lower_linear,
    "matmul": lower_matmul,
    "add": lower_add,
    "mul": lower_mul,
    "channel_scale": lower_channel_scale,
    "silu": lower_silu,
    "gelu": lower_gelu,
    "softcap": lower_softcap,
    "rotary": lower_rotary,
    "attention": lower_attention,
    "qlinear": lower_qlinear,  # com.microsoft MatMulNBits (quant.py)
    "quantize": lower_quantize,  # fake quantization: QDQ or its arithmetic (quant.py)
    "qembedding": lower_qembedding,  # gather + dequantize of a packed table (quant.py)
}
