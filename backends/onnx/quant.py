"""Lowering rules for the quantization ops: `qlinear` to ONNX Runtime's com.microsoft MatMulNBits.

The IR stores a qlinear's weight in MatMulNBits' own layout (splice.ir.quant), so the packed
weight, scales and zero points become initializers as they are: K = in_features, N =
out_features, bits and block_size = group_size (a partial last block is MatMulNBits' own
padding rule). Two cases need a little more:

- MatMulNBits takes only power-of-two block sizes >= 16. A group that is not one (per-channel
  groups of SmolLM2's in_features 576, say) but is a multiple of one, b, is lowered with
  block_size b: the packed weight is the same bytes viewed as [N, K/b, b*bits/8] (codes are
  contiguous along K), each scale and zero point is repeated group/b times. Exact.
- A group with no such divisor (stories260K's 172 = 4 * 43) falls back to standard ops: the
  codes are unpacked with BitwiseAnd/BitShift, dequantized with Sub/Mul and multiplied with
  MatMul. Exact as well; ONNX Runtime folds the constant dequantization at session start, so it
  runs at float speed while the file keeps the packed size.

accuracy_level (MatMulNBits' minimum compute precision): 0 computes in float32; 4 quantizes the
activations to int8 per block on the fly and uses the int8 dot-product kernels, which is what makes
4-bit decode fast on CPUs with VNNI/AVX-512 or NEON dot products. Measured (tests/backends and
benchmarks/quantization.py): on random matrices level 4 is ~0.5% relative output error against
level 0 (~2e-7); on SmolLM2-135M W4 g128 the logits move by about that much and WikiText-2
perplexity by well under 1%, so level 4 is the default (`ACCURACY_LEVEL`); `qlinear_rules(0)`
gives the float32-exact table that the equality tests use. benchmarks/onnx_speed.py measures it on
every run: SmolLM2-135M W4 g32 RTN, a 64-token WikiText-2 prompt, level 4 against level 0 moves
the logits by 3.4% relative RMS (95% top-1 agreement), where W4 itself moves them by 40% against
float32 (70% top-1): small beside the weight error, for the int8 kernels' speed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir
import torch

from splice.ir import quant
from splice.ir.core import Node
from .context import LoweringContext, LoweringError, Rule, describe

ACCURACY_LEVEL = 4
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
MS_DOMAIN = "com.microsoft"


def nbits_block(group_size: int) -> int:
    """The largest power-of-two block size >= 16 that divides `group_size`, or 0 when none."""
    b = group_size & -group_size
    return b if b >= 16 else 0


def _consts(ctx: LoweringContext, node: Node) -> None:
    for i in (1, 2, 3):
        v = node.inputs[i] if i < len(node.inputs) else None
        if v is not None and not v.is_const:
            raise LoweringError(f"{describe(node)}: quantized operand %{v.name} must be a constant")


def lower_qlinear(ctx: LoweringContext, node: Node, *,
                  accuracy_level: int = ACCURACY_LEVEL) -> Sequence[ir.Value]:
    _consts(ctx, node)
    a = node.attrs
    bits, group, k, n = a["bits"], a["group_size"], a["in_features"], a["out_features"]
    block = nbits_block(group)
    blocks = -(-k // group)
    rep = group // block if block else 0
    if not block or (rep > 1 and -(-k // block) != blocks * rep):
        return [_dequant_matmul(ctx, node)]
    w, s, zp = node.inputs[1], node.inputs[2], node.inputs[3] if len(node.inputs) > 3 else None
    if rep == 1:
        wv, sv = ctx.weight(w), ctx.weight(s)
        zv = ctx.weight(zp) if zp is not None else None
    else:
        # the same bytes in blocks of `block`: scales and zero points repeat per sub-block
        wv = ctx.weight(w, f"b{block}", lambda arr: arr.reshape(n, blocks * rep, block * bits // 8))
        sv = ctx.weight(s, f"b{block}", lambda arr: np.repeat(arr.reshape(n, -1), rep, axis=1))
        zv = None
        if zp is not None:
            def repack(arr: np.ndarray) -> np.ndarray:
                if arr.dtype != np.uint8:  # float zero points: one per block, unpacked
                    return np.repeat(arr.reshape(n, -1), rep, axis=1)
                z = quant.unpack_zero_points(torch.from_numpy(arr), bits, blocks)
                return quant.pack_zero_points(z.repeat_interleave(rep, dim=1), bits).numpy()
            zv = ctx.weight(zp, f"b{block}", repack)
    bias = ctx.input(node, 4)
    inputs = [ctx.input(node, 0), wv, sv, zv, None, bias]
    while inputs[-1] is None:
        inputs.pop()
    y = ctx.op("MatMulNBits", inputs, {"K": k, "N": n, "bits": bits, "block_size": block,
                                       "accuracy_level": accuracy_level}, domain=MS_DOMAIN)
    return [y]


def _dequant_blocks(ctx: LoweringContext, b: ir.Value, z: ir.Value, s: ir.Value, bits: int,
                    lead: int, group: int) -> ir.Value:
    """(codes(b) - z) * s for packed blocks b [..lead dims.., blocks, blob] (uint8), with z and s
    broadcasting as [..., blocks, 1]: the codes unpacked with BitwiseAnd/BitShift for 4 bits."""
    if bits == 4:
        lo = ctx.op("BitwiseAnd", [b, ctx.const(0x0F, np.uint8)])
        hi = ctx.op("BitShift", [b, ctx.const(4, np.uint8)], {"direction": "RIGHT"})
        pairs = ctx.op("Concat", [ctx.op("Unsqueeze", [lo, ctx.ints(-1)]),
                                  ctx.op("Unsqueeze", [hi, ctx.ints(-1)])], {"axis": -1})
        b = ctx.op("Reshape", [pairs, ctx.ints(*[0] * (lead + 1), group)])
    q = ctx.op("Cast", [b], {"to": ir.DataType.FLOAT})
    return ctx.op("Mul", [ctx.op("Sub", [q, z]), s])


def _zero_points(ctx: LoweringContext, node: Node, bits: int, blocks: int) -> ir.Value:
    """Zero points as float32 [rows, blocks, 1] (unpacked at lowering: they are tiny), or the
    symmetric default as a scalar."""
    zp = node.inputs[3] if len(node.inputs) > 3 else None
    if zp is None:
        return ctx.const(float(quant.zero_point_default(bits)))

    def unpacked(arr: np.ndarray) -> np.ndarray:
        if arr.dtype != np.uint8:  # already float, one per block
            return arr.reshape(arr.shape[0], blocks, 1)
        z = quant.unpack_zero_points(torch.from_numpy(arr), bits, blocks)
        return z.numpy().astype(np.float32)[..., None]
    return ctx.weight(zp, "unpacked", unpacked)


def _dequant_matmul(ctx: LoweringContext, node: Node) -> ir.Value:
    """Standard-op fallback: W = (unpack(B) - z) * scale, then x @ W^T (+ bias)."""
    a = node.attrs
    bits, group, k, n = a["bits"], a["group_size"], a["in_features"], a["out_features"]
    blocks = -(-k // group)
    z = _zero_points(ctx, node, bits, blocks)
    s = ctx.weight(node.inputs[2], "col", lambda arr: arr.reshape(n, blocks, 1))
    w = _dequant_blocks(ctx, ctx.weight(node.inputs[1]), z, s, bits, 1, group)
    w = ctx.op("Reshape", [w, ctx.ints(n, blocks * group)])
    if blocks * group != k:  # the padded tail of the last block
        w = ctx.op("Slice", [w, ctx.ints(0), ctx.ints(k), ctx.ints(1)])
    wt = ctx.op("Transpose", [w], {"perm": [1, 0]})
    y = ctx.op("MatMul", [ctx.input(node, 0), wt])
    if len(node.inputs) > 4 and node.inputs[4] is not None:
        y = ctx.op("Add", [y, ctx.input(node, 4)])
    return y


def lower_qembedding(ctx: LoweringContext, node: Node) -> Sequence[ir.Value]:
    """Gather the packed rows, their scales and zero points, and dequantize only those rows."""
    _consts(ctx, node)
    a = node.attrs
    bits, group, d, v = a["bits"], a["group_size"], a["embedding_dim"], a["num_embeddings"]
    blocks = -(-d // group)
    ids = ctx.input(node, 0)
    lead = len(node.inputs[0].shape)
    z = _zero_points(ctx, node, bits, blocks)
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        z = ctx.op("Gather", [z, ids], {"axis": 0})
    s = ctx.op("Gather", [ctx.weight(node.inputs[2], "col", lambda arr: arr.reshape(v, blocks, 1)),
                          ids], {"axis": 0})
    b = ctx.op("Gather", [ctx.weight(node.inputs[1]), ids], {"axis": 0})
    y = _dequant_blocks(ctx, b, z, s, bits, lead, group)
    y = ctx.op("Reshape", [y, ctx.ints(*[0] * lead, blocks * group)])
    if blocks * group != d:
        y = ctx.op("Slice", [y, ctx.ints(0), ctx.ints(d), ctx.ints(-1)])
    if a["scale"] != 1.0:
        y = ctx.op("Mul", [y, ctx.const(a["scale"])])
    return [y]


def qlinear_rules(accuracy_level: int = ACCURACY_LEVEL) -> Mapping[str, Rule]:
    """The quantization rules with MatMulNBits at `accuracy_level` (0 = float32 compute, 4 =
    int8 compute), to merge over the default table:
    `lower(m, rules={**RULES, **qlinear_rules(0)})`."""
    if accuracy_level not in ACCURACY_LEVELS:
        raise LoweringError(f"accuracy_level {accuracy_level!r}; MatMulNBits accepts "
                            f"{', '.join(map(str, ACCURACY_LEVELS))} (0: float32, 4: int8 compute)")

    def rule(ctx: LoweringContext, node: Node) -> Sequence[ir.Value]:
        return lower_qlinear(ctx, node, accuracy_level=accuracy_level)
    return {"qlinear": rule}


def lower_quantize(ctx: LoweringContext, node: Node) -> Sequence[ir.Value]:
    """The `quantize` op (fake quantization). Static int8 becomes QuantizeLinear +
    DequantizeLinear (the QDQ pair that ONNX Runtime's quantized kernels and QNN's HTP consume);
    dynamic modes and int4 are the reference's arithmetic, op for op (ReduceMax/Min, Div, Round,
    Clip, Mul), so the values are bit-identical in float32."""
    a = node.attrs
    bits, sym, clip = a["bits"], a["symmetric"], a["clip_ratio"]
    lo_q, hi_q = quant.act_qrange(bits, sym)
    x = ctx.input(node, 0)
    rank = len(node.inputs[0].shape)
    if a["mode"] != "dynamic_per_token":
        for i in (1, 2):
            v = node.inputs[i] if i < len(node.inputs) else None
            if v is not None and not v.is_const:
                raise LoweringError(f"{describe(node)}: static %{v.name} must be a constant")
        s = ctx.input(node, 1)
        if bits == 8:
            zp = ctx.input(node, 2) if not sym else ctx.const(
                np.zeros(node.inputs[1].shape, np.int8), np.int8)
            axis = {"axis": -1} if a["mode"] == "static_per_channel" else {}
            q = ctx.op("QuantizeLinear", [x, s, zp], axis)
            return [ctx.op("DequantizeLinear", [q, s, zp], axis)]
        z = ctx.weight(node.inputs[2], "f32", lambda arr: arr.astype(np.float32)) \
            if not sym else ctx.const(0.0)
        q = ctx.op("Clip", [ctx.op("Add", [ctx.op("Round", [ctx.op("Div", [x, s])]), z]),
                            ctx.const(float(lo_q)), ctx.const(float(hi_q))])
        return [ctx.op("Mul", [ctx.op("Sub", [q, z]), s])]
    group = a["group"]
    xg = ctx.op("Reshape", [x, ctx.ints(*[0] * (rank - 1), -1, group)]) if group else x
    axes = ctx.ints(-1)
    one, zero = ctx.const(1.0), ctx.const(0.0)
    if sym:
        amax = ctx.op("ReduceMax", [ctx.op("Abs", [xg]), axes], {"keepdims": 1})
        s = ctx.op("Mul", [amax, ctx.const(clip / hi_q)])
    else:
        lo = ctx.op("Min", [ctx.op("ReduceMin", [xg, axes], {"keepdims": 1}), zero])
        hi = ctx.op("Max", [ctx.op("ReduceMax", [xg, axes], {"keepdims": 1}), zero])
        s = ctx.op("Mul", [ctx.op("Sub", [hi, lo]), ctx.const(clip / hi_q)])
    s = ctx.op("Where", [ctx.op("Equal", [s, zero]), one, s])
    lo_c, hi_c = ctx.const(float(lo_q)), ctx.const(float(hi_q))
    if sym:
        q = ctx.op("Clip", [ctx.op("Round", [ctx.op("Div", [xg, s])]), lo_c, hi_c])
        y = ctx.op("Mul", [q, s])
    else:
        neg = ctx.op("Neg", [ctx.op("Mul", [lo, ctx.const(clip)])])
        z = ctx.op("Clip", [ctx.op("Round", [ctx.op("Div", [neg, s])]), lo_c, hi_c])
        r = ctx.op("Round", [ctx.op("Div", [xg, s])])
        q = ctx.op("Clip", [ctx.op("Add", [r, z]), lo_c, hi_c])
        y = ctx.op("Mul", [ctx.op("Sub", [q, z]), s])
    if group:
        y = ctx.op("Reshape", [y, ctx.ints(*[0] * (rank - 1), -1)])
    return [y]
