"""Lower an ir.Module to a static-shape float ONNX graph in the op forms Qualcomm's HTP takes.

The ONNX backend's lowerer (`backends.onnx.lower`) does the work; this module only swaps the rules
whose standard forms the HTP cannot run, and fixes every shape:

- Two graphs per model, both with batch 1: a prefill graph over a fixed chunk of `chunk` tokens
  (a longer prompt runs chunk by chunk, the last one padded) and a decode graph over 1 token.
- The KV cache is a fixed-size input past.{i}.key/value [1, kv_heads, context, head_dim] and the
  graph outputs only the new keys and values new.{i}.key/value [1, kv_heads, seq, head_dim]; the
  runtime writes them into its cache at their positions. Chosen over writing in the graph (a
  one-hot matmul or ScatterND at the positions) because the cache is the largest tensor of
  decode: a graph that returns it whole moves context/seq times more bytes through the NPU's
  memory every step, and a one-hot write also costs a context x seq matmul per layer. It is what
  Qualcomm's own LLM exports do (the cache update lives in the host).
- Attention reads [past slots; new keys] and adds `attention_mask` [1, 1, seq, context + seq], an
  input the runtime builds from the positions (0 where allowed, `mask_fill` elsewhere): a slot of
  the cache is visible when it is filled, a new key when it is causal (and inside the sliding
  window). A finite fill, not -inf, because the mask passes through a quantized Add: its range
  sets that Add's scale. One mask per distinct sliding window (attention_mask.w{N}).
- Rotary embedding: cos and sin tables [context, head_dim] (float64 angles, as the reference,
  stored as constants) gathered by position_ids, and the rotate-half (or interleaved) pairing as a
  constant signed-permutation MatMul: y = x * cos + (x @ R) * sin. No float64, no int64 compute,
  no rank-5 tensor; partial rotary is the identity in cos (1) and sin (0) past rotary_dim.
- The embedding lookup runs on the host: the graphs take the gathered rows as input_embeds
  [1, seq, hidden] (the runtime reads them from the artefact's int8 table), not input_ids, so no
  graph stores the table for a Gather; a tied table's one copy on the NPU is the lm_head's.
- position_ids are int32 (the HTP has no int64 arithmetic; Gather indices only).
- RMSNorm is SimplifiedLayerNormalization, which QNN maps to its RmsNorm op (one quantized op
  instead of five with a squared intermediate to quantize).
- Grouped-query attention stays rank 4: q is viewed as [1, kv_heads, group * seq, head_dim] so
  each KV head multiplies its query group without repeating the cache.
- qlinear weights become DequantizeLinear over int8/int4 initializers (per output channel, or
  blocked along K for groups) feeding MatMul: the integer codes of quantize_weights unchanged.

Each ONNX node carries the IR node's op, role, layer and origin (metadata_props, from the ONNX
lowerer), which the pre-flight report quotes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
import torch

from splice.errors import InputError
from splice.ir import quant
from splice.ir.core import Module, Node
from ..common import LoweringError, decoder_io, describe
from ..onnx.context import LoweringContext
from ..onnx.lower import lower
from ..onnx.rules import RULES

log = logging.getLogger(__name__)

MASK = "attention_mask"
EMBEDS = "input_embeds"


@dataclasses.dataclass(frozen=True)
class StaticShapes:
    """The fixed sizes of one graph: `seq` tokens in, a cache of `context` slots."""

    seq: int
    context: int
    mask_fill: float = -64.0

    def __post_init__(self) -> None:
        if not (isinstance(self.seq, int) and self.seq >= 1):
            raise InputError(f"NPU lowering: seq={self.seq!r}; expected an integer >= 1")
        if not (isinstance(self.context, int) and self.context >= self.seq):
            raise InputError(f"NPU lowering: context={self.context!r}; expected an integer >= "
                             f"the chunk ({self.seq})")
        if not self.mask_fill < 0:
            raise InputError(f"NPU lowering: mask_fill={self.mask_fill!r}; expected a negative "
                             "number")


def mask_name(window: int) -> str:
    return MASK if not window else f"{MASK}.w{window}"


def _mask_input(ctx: LoweringContext, shapes: StaticShapes, window: int) -> ir.Value:
    key = ("npu_mask", window)
    if key not in ctx.cache:
        name = mask_name(window)
        ctx._reserved.add(name)
        ctx.cache[key] = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT),
                                  shape=ir.Shape([1, 1, shapes.seq, shapes.context + shapes.seq]))
    return ctx.cache[key]


def _attention(shapes: StaticShapes):
    s = shapes.seq

    def rule(ctx: LoweringContext, node: Node) -> Sequence[ir.Value]:
        a = node.attrs
        h, kv, hd = a["num_heads"], a["num_kv_heads"], a["head_dim"]
        rep = h // kv
        q, k, v, past_k, past_v = (ctx.input(node, i) for i in range(5))
        new = []
        for t in (k, v):
            new.append(ctx.op("Transpose", [ctx.op("Reshape", [t, ctx.ints(1, s, kv, hd)])],
                              {"perm": [0, 2, 1, 3]}))
        keys = ctx.op("Concat", [past_k, new[0]], {"axis": 2})
        values = ctx.op("Concat", [past_v, new[1]], {"axis": 2})
        # query head g * rep + r reads KV head g: [s, kv, rep, hd] -> [1, kv, rep * s, hd]
        q4 = ctx.op("Transpose", [ctx.op("Reshape", [q, ctx.ints(s, kv, rep, hd)])],
                    {"perm": [1, 2, 0, 3]})
        q4 = ctx.op("Reshape", [q4, ctx.ints(1, kv, rep * s, hd)])
        kt = ctx.op("Transpose", [keys], {"perm": [0, 1, 3, 2]})
        scores = ctx.op("Mul", [ctx.op("MatMul", [q4, kt]), ctx.const(a["scale"])])
        if a["softcap"]:
            c = ctx.const(a["softcap"])
            scores = ctx.op("Mul", [ctx.op("Tanh", [ctx.op("Div", [scores, c])]), c])
        total = shapes.context + s
        scores = ctx.op("Reshape", [scores, ctx.ints(kv, rep, s, total)])
        scores = ctx.op("Add", [scores, _mask_input(ctx, shapes, a["sliding_window"])])
        probs = ctx.op("Softmax", [scores], {"axis": -1})
        probs = ctx.op("Reshape", [probs, ctx.ints(1, kv, rep * s, total)])
        y = ctx.op("Reshape", [ctx.op("MatMul", [probs, values]), ctx.ints(kv, rep, s, hd)])
        y = ctx.op("Reshape", [ctx.op("Transpose", [y], {"perm": [2, 0, 1, 3]}),
                               ctx.ints(1, s, h * hd)])
        return [y, new[0], new[1]]
    return rule


def rotary_tables(inv_freq: np.ndarray, head_dim: int, rotary_dim: int, interleaved: bool,
                  scale: float, positions: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cos and sin [positions, head_dim] and R [head_dim, head_dim] with
    rotary(x) = x * cos + (x @ R) * sin per head, for positions 0..positions-1."""
    rd = rotary_dim or head_dim
    half = rd // 2
    ang = np.arange(positions, dtype=np.float64)[:, None] * inv_freq.astype(np.float64)[None]
    c, sn = np.cos(ang) * scale, np.sin(ang) * scale
    cos = np.ones((positions, head_dim), np.float64)
    sin = np.zeros((positions, head_dim), np.float64)
    r = np.zeros((head_dim, head_dim), np.float32)
    if interleaved:
        cos[:, 0:rd:2], cos[:, 1:rd:2] = c, c
        sin[:, 0:rd:2], sin[:, 1:rd:2] = sn, sn
        for i in range(half):
            r[2 * i + 1, 2 * i], r[2 * i, 2 * i + 1] = -1.0, 1.0
    else:
        cos[:, :half], cos[:, half:rd] = c, c
        sin[:, :half], sin[:, half:rd] = sn, sn
        for i in range(half):
            r[half + i, i], r[i, half + i] = -1.0, 1.0
    return cos.astype(np.float32), sin.astype(np.float32), r


def _rotary(shapes: StaticShapes):
    s = shapes.seq

    def rule(ctx: LoweringContext, node: Node) -> Sequence[ir.Value]:
        a = node.attrs
        hd = a["head_dim"]
        inv = node.inputs[2]
        if not inv.is_const:
            raise LoweringError(f"{describe(node)}: inv_freq %{inv.name} must be a constant")
        key = ("npu_rotary", inv.const, hd, a["rotary_dim"], a["interleaved"], a["scale"])
        if key not in ctx.cache:
            inv_np = ctx.module.weight(inv).detach().to(torch.float64).numpy()
            cos, sin, r = rotary_tables(inv_np, hd, a["rotary_dim"], a["interleaved"],
                                        a["scale"], shapes.context + s)
            pos = ctx.input(node, 1)
            tabs = []
            for t in (cos, sin):
                g = ctx.op("Gather", [ctx.const(t), pos], {"axis": 0})  # [1, s, hd]
                tabs.append(ctx.op("Unsqueeze", [g, ctx.ints(2)]))
            ctx.cache[key] = (tabs[0], tabs[1], ctx.const(r))
        cos, sin, r = ctx.cache[key]
        width = node.inputs[0].shape[-1]
        x = ctx.op("Reshape", [ctx.input(node, 0), ctx.ints(1, s, width // hd, hd)])
        y = ctx.op("Add", [ctx.op("Mul", [x, cos]),
                           ctx.op("Mul", [ctx.op("MatMul", [x, r]), sin])])
        return [ctx.op("Reshape", [y, ctx.ints(1, s, width)])]
    return rule


def _rms_norm(ctx: LoweringContext, node: Node) -> Sequence[ir.Value]:
    a = node.attrs
    x = ctx.input(node, 0)
    width = node.inputs[0].shape[-1]
    n = a["group"] or width
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if w is None:
        scale = ctx.const(np.ones(n, np.float32))
    elif not w.is_const:
        raise LoweringError(f"{describe(node)}: the NPU lowering needs a constant norm weight")
    elif a["offset"]:
        off = a["offset"]
        scale = ctx.weight(w, f"plus{off:g}", lambda arr: arr + np.float32(off))
    else:
        scale = ctx.weight(w)
    lead = len(node.inputs[0].shape) - 1
    if a["group"]:
        x = ctx.op("Reshape", [x, ctx.ints(*[0] * lead, -1, n)])
    y = ctx.op("SimplifiedLayerNormalization", [x, scale], {"axis": -1, "epsilon": a["eps"]})
    if a["group"]:
        y = ctx.op("Reshape", [y, ctx.ints(*[0] * lead, width)])
    return [y]


def _embedding(shapes: StaticShapes):
    """The table lookup runs on the host: the graph takes the gathered rows as EMBEDS [1, seq,
    hidden] (the runtime reads them from the artefact's int8 table), so no graph holds a copy of
    the table for a Gather; a tied table's only copy on the NPU is the lm_head's. The embedding's
    scale (Gemma's sqrt(hidden)) stays in the graph."""

    def rule(ctx: LoweringContext, node: Node) -> Sequence[ir.Value]:
        y = ctx.graph_input(EMBEDS, ir.DataType.FLOAT,
                            [1, shapes.seq, int(node.inputs[1].shape[1])])
        if node.attrs["scale"] != 1.0:
            y = ctx.op("Mul", [y, ctx.const(node.attrs["scale"])])
        return [y]
    return rule


def _qlinear(ctx: LoweringContext, node: Node) -> Sequence[ir.Value]:
    """DequantizeLinear(int codes [K, N], scales, axis/block) -> MatMul. The codes are the
    qlinear's own: per output channel when one group spans K, else blocks of group_size along K
    (ONNX 21's blocked DequantizeLinear). Asymmetric weights keep their zero points here; the
    pre-flight names them, since the HTP wants symmetric weights."""
    a = node.attrs
    bits, group, k, n = a["bits"], a["group_size"], a["in_features"], a["out_features"]
    for i in (1, 2, 3):
        v = node.inputs[i] if i < len(node.inputs) else None
        if v is not None and not v.is_const:
            raise LoweringError(f"{describe(node)}: quantized operand %{v.name} must be a constant")
    blocks = -(-k // group)
    packed = ctx.module.weight(node.inputs[1]).detach().cpu()
    codes = quant.unpack_weight(packed, bits, group).to(torch.int32)  # [N, blocks * group]
    scales = ctx.module.weight(node.inputs[2]).detach().to(torch.float32).reshape(n, blocks)
    zp_v = node.inputs[3] if len(node.inputs) > 3 else None
    if zp_v is None:
        zeros = torch.full((n, blocks), quant.zero_point_default(bits), dtype=torch.int32)
        signed = True
    else:
        z = ctx.module.weight(zp_v).detach().cpu()
        if z.dtype != torch.uint8:
            raise LoweringError(f"{describe(node)}: float zero points have no integer "
                                "DequantizeLinear form; quantize with integer zero points")
        zeros = quant.unpack_zero_points(z, bits, blocks).to(torch.int32)
        signed = False
    if signed:  # codes - 2^(b-1): the same grid as a signed integer with zero point 0
        off = quant.zero_point_default(bits)
        wq = (codes - off).numpy()
        zq = np.zeros((n, blocks), np.int32)
    else:
        wq, zq = codes.numpy(), zeros.numpy()
    wq = np.ascontiguousarray(wq[:, :blocks * group].T)  # [K_padded, N]
    if blocks * group != k:
        wq = wq[:k]
    if bits == 8:
        dt = ir.DataType.INT8 if signed else ir.DataType.UINT8
        npdt = np.int8 if signed else np.uint8
        wt, zt = ir.tensor(wq.astype(npdt)), ir.tensor(zq.T.astype(npdt))
    else:
        dt = ir.DataType.INT4 if signed else ir.DataType.UINT4
        npdt = np.int8 if signed else np.uint8
        wt, zt = ir.tensor(wq.astype(npdt), dtype=dt), ir.tensor(zq.T.astype(npdt), dtype=dt)
    name = ctx.unique(f"{node.inputs[1].const}.q{bits}")
    w_init = ctx.tape.initializer(wt, name=name)
    s_arr = scales.numpy().T.copy()  # [blocks, N]
    if blocks == 1:
        s_init = ctx.tape.initializer(ir.tensor(s_arr[0]), name=ctx.unique(f"{name}.scale"))
        z_init = ctx.tape.initializer(ir.tensor(zt.numpy()[0], dtype=dt),
                                      name=ctx.unique(f"{name}.zero"))
        attrs = {"axis": 1}
    else:
        s_init = ctx.tape.initializer(ir.tensor(s_arr), name=ctx.unique(f"{name}.scale"))
        z_init = ctx.tape.initializer(zt, name=ctx.unique(f"{name}.zero"))
        attrs = {"axis": 0, "block_size": group}
    w = ctx.op("DequantizeLinear", [w_init, s_init, z_init], attrs)
    y = ctx.op("MatMul", [ctx.input(node, 0), w])
    if len(node.inputs) > 4 and node.inputs[4] is not None:
        y = ctx.op("Add", [y, ctx.input(node, 4)])
    return [y]


def npu_rules(shapes: StaticShapes) -> dict:
    """The ONNX rule table with the NPU's forms for the ops whose standard lowering the HTP
    cannot run or runs poorly."""
    return {**RULES, "attention": _attention(shapes), "rotary": _rotary(shapes),
            "rms_norm": _rms_norm, "embedding": _embedding(shapes), "qlinear": _qlinear}


def lower_static(module: Module, shapes: StaticShapes) -> ir.Model:
    """The static float ONNX graph of `module` over `shapes.seq` tokens and a cache of
    `shapes.context` slots (see the module docstring for its I/O)."""
    io = decoder_io(module.graph)
    if shapes.context > module.config.max_position:
        raise InputError(f"NPU context {shapes.context} exceeds the model's "
                         f"{module.config.max_position} positions")
    model = lower(module, rules=npu_rules(shapes))
    g = model.graph
    s, c = shapes.seq, shapes.context
    for v in g.inputs:
        if v.name in ("input_ids", "position_ids"):
            v.dtype = ir.DataType.INT32
            v.shape = ir.Shape([1, s])
    by_name = {v.name: v for v in g.inputs}
    for layer in io["past"]:
        for kv in ("key", "value"):
            by_name[layer[kv]].shape = ir.Shape([1, layer["kv_heads"], c, layer["head_dim"]])
    for v in g.outputs:
        if v.name.startswith("present."):
            v.name = "new." + v.name[len("present."):]
            v.shape = ir.Shape([1, v.shape[1], s, v.shape[3]])
        elif v.name == "logits":
            v.shape = ir.Shape([1, s, v.shape[2]])
    masks = sorted((k[1], val) for k, val in _mask_values(model))
    for _, m in masks:
        g.inputs.append(m)
    embeds = [v for v in g.inputs if v.name == EMBEDS]
    if embeds:  # the host gathers the rows: ids are no longer an input of the graph
        ids = next(v for v in g.inputs if v.name == "input_ids")
        if not ids.uses():
            g.inputs.remove(ids)
        g.inputs.remove(embeds[0])
        g.inputs.insert(0, embeds[0])
    return model


def _mask_values(model: ir.Model):
    """The attention_mask inputs the rules created (consumed by some node of the graph)."""
    seen = {}
    for node in model.graph:
        for v in node.inputs:
            if v is not None and v.name and v.name.startswith(MASK) and v.producer() is None \
                    and not v.is_initializer():
                window = int(v.name.split(".w")[1]) if ".w" in v.name else 0
                seen[v.name] = (("npu_mask", window), v)
    return list(seen.values())
