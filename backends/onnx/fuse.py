"""Multi-node fusions of the contrib lowering: packed MatMulNBits and rotary inside GroupQueryAttention.

A decode step runs every op once for one token, so on CPU its time is the weights it reads plus a
fixed cost per op; these fusions remove ops without changing what is read:

- Packed projections: the `qlinear` nodes that read the same input with the same quantization
  (q/k/v, gate/up) become one MatMulNBits over their weights concatenated along N (the packed
  layout is row-major in N, so concatenation is exact), followed by a Split. Only where each
  group is a whole MatMulNBits block (power-of-two groups >= 16); other groups stay per node.
- Rotary inside attention: when q and k of an attention are each the output of a `rotary` that
  only that attention reads, with the same positions, frequencies and scale, GroupQueryAttention
  applies them itself (`do_rotary`, cos/sin caches and the IR's position ids), and the rotary
  nodes lower to nothing. If q, k and v then come straight from one packed projection, GQA reads
  the packed [batch, seq, (heads + 2 kv_heads) * head_dim] tensor and the Split goes too.

Why in the lowering and not as an ONNX rewrite: the decisions need the IR's facts (which values
are the q/k/v of which attention, the rotary attributes, the quantization layout), which the
lowered graph has spread over initializers and attribute encodings. Each rule still emits a valid
value for every IR output (a Split part, an Identity for an absorbed rotary), so a rule that does
not fuse never depends on another that did; what the fused consumer does not read is removed by
dead-node elimination at the end of `lower`.

What GroupQueryAttention and RotaryEmbedding refuse (`gqa_refusal`, `rotary_refusal`) is decided
here too: both the fusions and contrib.py's rules ask, and contrib.py imports this module, never
the other way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
import torch

from splice.ir.core import Node, Value
from .context import LoweringContext, describe, weight_array
from .quant import MS_DOMAIN, lower_qlinear, nbits_block

log = logging.getLogger(__name__)

# cos/sin caches above this many elements each (max_position * rotary_dim / 2) are not written:
# the rotary falls back to the standard rule, which computes the angles from the positions
MAX_ROTARY_CACHE = 1 << 24


def gqa_refusal(node: Node) -> str:
    """Why GroupQueryAttention cannot compute this attention node ("" when it can)."""
    a = node.attrs
    if not a["causal"]:
        return "GroupQueryAttention is always causal"
    if a["num_heads"] % a["num_kv_heads"]:
        return "num_heads is not a multiple of num_kv_heads"
    if a["head_dim"] % 16:  # ONNX Runtime's CPU kernel refuses others when it runs
        return f"head_dim {a['head_dim']} is not a multiple of 16"
    return ""


def rotary_refusal(ctx: LoweringContext, node: Node) -> str:
    """Why RotaryEmbedding cannot compute this rotary node ("" when it can)."""
    x, inv = node.inputs[0], node.inputs[2]
    if not inv.is_const:
        return "inv_freq is computed, not a constant"
    if len(x.shape) != 3 or not isinstance(x.shape[-1], int):
        return f"input shape {list(x.shape)} is not [batch, seq, heads * head_dim]"
    n = ctx.module.config.max_position
    if not isinstance(n, int) or n < 1 or n * inv.shape[0] > MAX_ROTARY_CACHE:
        return f"max_position {n!r} gives no cos/sin cache of a sensible size"
    return ""


def _order(ctx: LoweringContext) -> dict[int, int]:
    if "node_order" not in ctx.cache:
        ctx.cache["node_order"] = {id(n): i for i, n in enumerate(ctx.module.graph.nodes)}
    return ctx.cache["node_order"]


def _signature(node: Node) -> tuple | None:
    """What must agree for qlinears to share one MatMulNBits; None when this one cannot."""
    a = node.attrs
    if a["group_size"] < 16 or nbits_block(a["group_size"]) != a["group_size"]:
        return None
    ins = [node.inputs[i] if i < len(node.inputs) else None for i in range(5)]
    if any(v is not None and not v.is_const for v in ins[1:]):
        return None
    zp = ins[3]
    return (a["bits"], a["group_size"], a["in_features"], zp is None,
            None if zp is None else zp.dtype, ins[4] is None)


def qlinear_group(ctx: LoweringContext, node: Node) -> list[Node]:
    """The qlinears packed with `node` (itself included), in graph order."""
    key = ("qlinear_group", id(node))
    if key in ctx.cache:
        return ctx.cache[key]
    sig = _signature(node)
    group = [node]
    if sig is not None:
        group = [u for u, i in node.inputs[0].uses
                 if u.op == "qlinear" and i == 0 and _signature(u) == sig]
        order = _order(ctx)
        group.sort(key=lambda n: order[id(n)])
    for n in group:
        ctx.cache[("qlinear_group", id(n))] = group
    return group


def _packed(ctx: LoweringContext, group: list[Node], i: int, name: str) -> ir.Value | None:
    """Input `i` of the group's qlinears concatenated along N (their first axis). Weights a lazy
    store keeps on disk (layer-by-layer compiles) stay there: the concatenation is a LazyTensor
    that ir.save runs when it writes the external data."""
    vals = [m.inputs[i] if i < len(m.inputs) else None for m in group]
    if vals[0] is None:
        return None
    lazy = getattr(ctx.module.weights, "ref", None)
    refs = [lazy(v.const) for v in vals] if callable(lazy) else [None]
    name = ctx.unique(f"{name}.packed{i}")
    if any(r is None for r in refs):
        arr = np.concatenate([weight_array(ctx.module.weight(v)) for v in vals], axis=0)
        return ctx.tape.initializer(ir.tensor(arr), name=name)
    dtype = weight_array(torch.zeros((), dtype=refs[0].out_dtype)).dtype
    shape = (sum(r.out_shape[0] for r in refs), *refs[0].out_shape[1:])
    tensor = ir.LazyTensor(lambda: ir.tensor(np.concatenate(
        [weight_array(r.load()) for r in refs], axis=0)), dtype=ir.DataType.from_numpy(dtype),
        shape=ir.Shape(shape), name=name)
    return ctx.tape.initializer(tensor, name=name)


def lower_qlinear_packed(ctx: LoweringContext, node: Node, *,
                         accuracy_level: int) -> Sequence[ir.Value]:
    group = qlinear_group(ctx, node)
    if len(group) == 1:
        return lower_qlinear(ctx, node, accuracy_level=accuracy_level)
    if node is not group[0]:
        return [ctx.cache[("packed_part", id(node))]]
    a = node.attrs
    ns = [m.attrs["out_features"] for m in group]
    base = group[0].inputs[1].const or group[0].outputs[0].name
    inputs = [ctx.input(node, 0)] + [_packed(ctx, group, i, base) for i in (1, 2, 3)] + [None]
    inputs.append(_packed(ctx, group, 4, base))
    while inputs[-1] is None:
        inputs.pop()
    y = ctx.op("MatMulNBits", inputs, {"K": a["in_features"], "N": sum(ns), "bits": a["bits"],
                                       "block_size": a["group_size"],
                                       "accuracy_level": accuracy_level}, domain=MS_DOMAIN)
    parts = ctx.op("Split", [y, ctx.ints(*ns)], {"axis": -1}, outputs=len(ns))
    for m, part in zip(group, parts):
        ctx.cache[("packed_part", id(m))] = part
    ctx.cache[("packed_whole", tuple(id(m.outputs[0]) for m in group))] = y
    log.debug("%s: packed with %d qlinears into one MatMulNBits", describe(node), len(group) - 1)
    return [parts[0]]


def absorbed_rotaries(ctx: LoweringContext, attn: Node) -> tuple[Node, Node] | None:
    """The rotary nodes producing q and k of `attn` that GroupQueryAttention can apply itself."""
    key = ("absorbed_rotaries", id(attn))
    if key in ctx.cache:
        return ctx.cache[key]
    found = None
    rq, rk = attn.inputs[0].producer, attn.inputs[1].producer
    if (not gqa_refusal(attn) and rq is not None and rk is not None and rq.op == "rotary"
            and rk.op == "rotary" and rq is not rk
            and all(len(r.outputs[0].uses) == 1 and not rotary_refusal(ctx, r) for r in (rq, rk))
            and rq.inputs[1] is rk.inputs[1] and rq.inputs[2] is rk.inputs[2]
            and rq.attrs == rk.attrs and rq.attrs["head_dim"] == attn.attrs["head_dim"]
            and (rq.attrs["rotary_dim"] or rq.attrs["head_dim"]) == rq.attrs["head_dim"]):
        found = (rq, rk)
    ctx.cache[key] = found
    return found


def rotary_is_absorbed(ctx: LoweringContext, node: Node) -> bool:
    uses = node.outputs[0].uses
    if len(uses) != 1 or uses[0][0].op != "attention" or uses[0][1] not in (0, 1):
        return False
    found = absorbed_rotaries(ctx, uses[0][0])
    return found is not None and node in found


def packed_qkv(ctx: LoweringContext, q: Value, k: Value, v: Value) -> ir.Value | None:
    """The packed projection output holding exactly q, k and v in that order, if one was made."""
    return ctx.cache.get(("packed_whole", (id(q), id(k), id(v))))
