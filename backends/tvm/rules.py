"""One lowering rule per IR op: (Lowering, _Function, Node) -> a Relax value per output.

Each rule emits the op's kernel (kernels.py, attention.py, quant.py) through `_Function.te`,
which tags it with its kind for schedule.py. Fusions happen here rather than in a generic pass,
because they are the decoder's and cheap to recognise: a linear whose only use is the residual
`add` computes the add in its epilogue (the int8-activation product in place, over the
residual, where the add is the residual's last reader); the int8 products' activation
quantization computes the norm or the gated MLP's act(gate) * up that only they read; and every
rotary node of a step shares one cos/sin table per (positions, frequencies).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from tvm import relax, tirx
from tvm.relax import TensorType

from splice.ir.core import Node
from . import attention as A
from . import kernels as K
from .context import ROW_TILE, Lowering, LoweringError, _Function, cache_shape, describe, \
    hadamard_stages
from .qdot import act_block, qdot_decode, quantize_activations
from .quant import Q_ROW_TILE, qembedding_kernel, qlinear_kernel, quantize_kernel


def _linear(low: Lowering, fn: _Function, node: Node):
    x = fn.value(node, 0)
    packed = low.packed
    w = fn.value(node, 1, "packed" if packed else "plain")
    bias = fn.value(node, 2) if len(node.inputs) > 2 else None
    out = int(node.inputs[1].shape[0])
    return _emit_linear(low, fn, node, x, w, bias, out, packed)


def _flat(fn: _Function, x):
    """x [..., k] as rows [n, k] (a view, no copy): product kernels see one row axis, so their
    row tiles never straddle batch boundaries (TVM's region analysis over a fused symbolic
    batch x seq axis writes back whole tiles of the wrong rows)."""
    shape = list(x.ty.shape.values)
    if len(shape) == 2:
        return x, shape
    rows = shape[0]
    for d in shape[1:-1]:
        rows = rows * d
    return fn.bb.emit(relax.op.reshape(x, [rows, shape[-1]])), shape


def _unflat(fn: _Function, y, shape: list, out: int):
    if len(shape) == 2:
        return y
    return fn.bb.emit(relax.op.reshape(y, [*shape[:-1], out]))


def _product(low: Lowering, fn: _Function, node: Node, x, out: int, emit: Callable):
    """A product kernel over x's rows, `emit(rows, residual)`, with the residual `add` that alone
    reads its output computed in its epilogue (the add node is then skipped)."""
    fused = low.fusable_residual(fn, node)
    residual = None
    if fused is not None:
        fn.skip.add(id(fused[0]))
        residual = _flat(fn, fused[1])[0]
    x2, shape = _flat(fn, x)
    y = _unflat(fn, emit(x2, residual), shape, out)
    if fused is not None:
        fn.env[id(fused[0].outputs[0])] = y
    return [y]


def _emit_linear(low, fn, node, x, w, bias, out, packed):
    return _product(low, fn, node, x, out, lambda rows, residual: fn.te(
        K.linear, rows, w, bias, residual, out=out, packed=packed,
        row_tile=ROW_TILE if fn.rows == "many" else 0,
        kind="linear_packed" if packed else "linear"))


def _matmul(low: Lowering, fn: _Function, node: Node):
    w = node.inputs[1]
    if w.is_const:
        layout = "packed_t" if low.packed else "plain"
        x, wt = fn.value(node, 0), fn.value(node, 1, layout)
        if not low.packed:
            return [fn.te(K.matmul, x, wt, kind="matmul")]
        return _emit_linear(low, fn, node, x, wt, None, int(w.shape[1]), True)
    return [fn.te(K.matmul, fn.value(node, 0), fn.value(node, 1), kind="matmul")]


def _qparams(low: Lowering, fn: _Function, node: Node) -> list:
    """Codes, scales and zero points (None when symmetric) of a qlinear or qembedding, each in
    the layout the lowering planned for it (all three tiled on the CPU when only products read
    them: quant.TILED)."""
    return [fn.value(node, i, low._layouts(node, i, node.inputs[i])[0])
            if i < len(node.inputs) and node.inputs[i] is not None else None for i in (1, 2, 3)]


def _qlinear(low: Lowering, fn: _Function, node: Node):
    a = node.attrs
    x = fn.value(node, 0)
    w, s, zp = _qparams(low, fn, node)
    bias = fn.value(node, 4) if len(node.inputs) > 4 else None
    if low.activations == "int8" and low.packed \
            and act_block(a["group_size"]) is not None:
        return _product(low, fn, node, x, a["out_features"], lambda rows, residual: _qdot(
            low, fn, node, rows, w, s, zp, bias, residual))
    return _product(low, fn, node, x, a["out_features"], lambda rows, residual: fn.te(
        qlinear_kernel, rows, w, s, zp, bias, residual, bits=a["bits"],
        group_size=a["group_size"], symmetric=a["symmetric"], out_features=a["out_features"],
        row_tile=Q_ROW_TILE if fn.rows == "many" and low.packed else 1,
        streamed=low.packed, kind="qlinear"))


def _qdot(low: Lowering, fn: _Function, node: Node, rows, w, s, zp, bias, residual):
    """The int8-activation product (qdot.py), decode and prefill: the activations quantized per
    block, the integer product (each task's rows loop inside it, its weights read from memory
    once: prefill measured 1.5-1.6x the float tiles on SmolLM2), then bias and residual as a
    small epilogue."""
    a = node.attrs
    bits, gs, n_out = a["bits"], a["group_size"], a["out_features"]
    blocks = int(node.inputs[1].shape[1])
    qkey = ("qact", id(node.inputs[0]), bits, blocks, gs)  # q, k, v (gate, up) share theirs
    if qkey not in fn.memo:
        q = _quantized_input(low, fn, node, rows, bits=bits, blocks=blocks, group_size=gs)
        fn.memo[qkey] = tuple(fn.bb.emit(relax.TupleGetItem(q, i)) for i in range(3))
    xq, d, ds = fn.memo[qkey]
    zshape = tuple(int(v) for v in zp.ty.shape.values) if zp is not None else None
    zeros = "symmetric" if a["symmetric"] else "uint8" if low.module.weights[
        node.inputs[3].const].dtype == torch.uint8 else "float"
    tiled = w.ty.ndim == 4
    # the skip connection's add in place: one kernel, no epilogue's launch nor its tensors
    accumulate = residual is not None and bias is None and low.residual_writable(fn, node)
    key = ("qdot", n_out, blocks, gs, bits, zeros, zshape, tiled, accumulate)
    gv = fn.memo.get(key)
    if gv is None:
        gv = fn.memo[key] = fn.bb.add_func(qdot_decode(
            n_out=n_out, blocks=blocks, group_size=gs, bits=bits, zeros=zeros,
            zp_shape=zshape, tiled=tiled, isa=low.isa, accumulate=accumulate).with_attr(
                "splice.rows", fn.rows), "qlinear_i8")
    n_rows = rows.ty.shape.values[0]
    args = [xq, d, ds, w, s, zp if zp is not None else s]
    out_ty = TensorType([n_rows, n_out], "float32")
    if accumulate:
        return fn.bb.emit(relax.call_tir_inplace(gv, relax.Tuple([*args, residual]), len(args),
                                                 out_ty))
    y = fn.bb.emit(relax.call_tir(gv, args, out_ty))
    if bias is None and residual is None:
        return y
    return fn.te(lambda t, b, r: K.epilogue(lambda m, n: t[m, n], t.shape[0], n_out, b, r),
                 y, bias, residual, kind="qepilogue")


def _quantized_input(low: Lowering, fn: _Function, node: Node, rows, **q):
    """The int8 product's activation quantization (xq, d, d sum xq). Where only such products
    (with the same blocks) read their input and it is a whole-row rms_norm's output (the norm
    before q/k/v or gate/up) or the gated MLP's act(gate) * up, that op is computed inside the
    quantization kernel instead of as a kernel of its own (the same expressions, so the same
    values: the separate kernel, then unused, is dropped by the build's dead-code elimination):
    a decode step has two kernels fewer per layer, and their tensors."""
    v = node.inputs[0]
    p = v.producer
    key = (node.attrs["bits"], node.attrs["group_size"], int(node.inputs[1].shape[1]))
    fusable = p is not None and v not in low.module.graph.outputs \
        and node is not low.logits_product and all(
            user.op == "qlinear" and user.inputs[0] is v and user is not low.logits_product
            and (user.attrs["bits"], user.attrs["group_size"],
                 int(user.inputs[1].shape[1])) == key for user, _ in v.uses)
    if fusable and p.op == "rms_norm" and not p.attrs["group"]:
        a = p.attrs
        return fn.te(lambda x, w: quantize_activations(K.rms_norm(
            x, w, eps=a["eps"], offset=a["offset"], group=0), **q),
            _flat(fn, fn.value(p, 0))[0], fn.value(p, 1) if len(p.inputs) > 1 else None,
            kind="qact")
    gate = _gated(low, p) if fusable and p.op == "mul" else None
    if gate is not None:
        act = p.inputs[gate].producer

        def fused(a, b):
            y = K.unary(a, act.op, **act.attrs)
            return quantize_activations(K.binary(y, b, "mul") if gate == 0
                                        else K.binary(b, y, "mul"), **q)
        return fn.te(fused, _flat(fn, fn.value(act, 0))[0], _flat(fn, fn.value(p, 1 - gate))[0],
                     kind="qact")
    return fn.te(quantize_activations, rows, **q, kind="qact")


def _gated(low: Lowering, mul: Node) -> int | None:
    """Which input of `mul` is silu(x) or gelu(x) read by the mul alone (the gated MLP's
    act(gate) * up), both inputs of one shape; None when none is."""
    if mul.inputs[0] is None or mul.inputs[1] is None or \
            mul.inputs[0].shape != mul.inputs[1].shape:
        return None
    for i, u in enumerate(mul.inputs):
        act = u.producer
        if act is not None and act.op in ("silu", "gelu") and len(u.uses) == 1 \
                and u not in low.module.graph.outputs:
            return i
    return None


def _embedding(low: Lowering, fn: _Function, node: Node):
    table = node.inputs[1]
    if not table.is_const:
        raise LoweringError(f"{describe(node)}: the table must be a constant weight")
    layout = low._layouts(node, 1, table)[0]
    return [fn.te(K.embedding, fn.value(node, 0), fn.value(node, 1, layout),
                  scale=node.attrs["scale"], packed=layout == "packed", kind="embedding")]


def _rms_norm(low: Lowering, fn: _Function, node: Node):
    a = node.attrs
    w = fn.value(node, 1) if len(node.inputs) > 1 else None
    return [fn.te(K.rms_norm, fn.value(node, 0), w, eps=a["eps"], offset=a["offset"],
                  group=a["group"], kind="rms_norm")]


def _binary(op: str):
    def rule(low: Lowering, fn: _Function, node: Node):
        return [fn.te(K.binary, fn.value(node, 0), fn.value(node, 1), op, kind="elementwise")]
    return rule


def _unary(low: Lowering, fn: _Function, node: Node):
    return [fn.te(K.unary, fn.value(node, 0), node.op, kind="elementwise", **node.attrs)]


def _channel_scale(low: Lowering, fn: _Function, node: Node):
    return [fn.te(K.channel_scale, fn.value(node, 0), fn.value(node, 1), kind="elementwise")]


def _rotary(low: Lowering, fn: _Function, node: Node):
    a = node.attrs
    key = ("rope", id(node.inputs[1]), node.inputs[2].name, a["scale"])
    if key not in fn.memo:
        fn.memo[key] = fn.te(K.rope_table, fn.value(node, 1), fn.value(node, 2),
                             scale=a["scale"], dtype="float32", kind="elementwise")
    return [fn.te(K.rotary, fn.value(node, 0), fn.memo[key], head_dim=a["head_dim"],
                  rotary_dim=a["rotary_dim"], interleaved=a["interleaved"], kind="elementwise")]


def _attention(low: Lowering, fn: _Function, node: Node):
    a = node.attrs
    slots = []
    for i in (3, 4):
        v = node.inputs[i]
        if id(v) not in low.cache_inputs:
            raise LoweringError(f"{describe(node)}: past input %{v.name} is not a cache input "
                                "(past.{i}.key / past.{i}.value of the decoder graph)")
        slots.append(low.cache_inputs[id(v)])
    for v, want in zip(node.outputs[1:], slots):
        name = "present_key" if want % 2 == 0 else "present_value"
        expected = low.cache[want // 2][name]
        if v.name != expected or any(u for u in v.uses):
            raise LoweringError(f"{describe(node)}: its present output %{v.name} must be the graph "
                                f"output {expected!r} and nothing else's input")
    caches = []
    kv, hd = a["num_kv_heads"], a["head_dim"]
    for slot, src in zip(slots, (1, 2)):
        keys = slot % 2 == 0
        gv = fn.memo.get(("kv_append", kv, hd, keys))
        if gv is None:
            gv = fn.memo[("kv_append", kv, hd, keys)] = fn.bb.add_func(
                # decode's append (one position) runs serially: a parallel launch for it only
                # adds a wait on the pool's second thread, long when another process holds it
                A.kv_append_func(kv, hd, low.kv_cache, transposed=keys).with_attr(
                    "splice.rows", fn.rows), "kv_append")
        out_ty = TensorType(cache_shape(fn.batch, kv, hd, fn.capacity, slot % 2), low.kv_cache)
        caches.append(fn.bb.emit(relax.call_tir_inplace(
            gv, relax.Tuple([fn.cache(slot), fn.value(node, src), relax.prim_value(fn.past)]),
            0, out_ty)))
    # the CPU's (packed) form shares each key among its kv head's query heads, and splits a
    # decode step's keys (prefill has its rows for parallelism); dlight's GPU schedules take
    # the one-row-per-head form
    if low.packed:
        kernel, form = A.grouped_attention, {"splits": A.DECODE_SPLITS if fn.rows == "few" else 1}
    else:
        kernel, form = A.attention, {}
    y = fn.te(kernel, fn.value(node, 0), caches[0], caches[1], fn.past, **form,
              num_heads=a["num_heads"], num_kv_heads=a["num_kv_heads"], head_dim=a["head_dim"],
              scale=a["scale"], causal=a["causal"], softcap=a["softcap"],
              sliding_window=a["sliding_window"], kind="attention")
    return [y, None, None]


def _hadamard(low: Lowering, fn: _Function, node: Node):
    a = node.attrs
    width = a["block"] or a["size"]
    x = fn.value(node, 0)
    shape = list(x.ty.shape.values)
    factors = hadamard_stages(width)
    runs = [*shape[:-1], tirx.IntImm("int64", int(shape[-1]) // width)]
    y = fn.bb.emit(relax.op.reshape(x, [*runs, *factors]))
    lead = len(runs)
    for j, f in enumerate(factors):
        last = j == len(factors) - 1
        y = fn.te(K.hadamard_stage, y, fn.param(None, f"hadamard_signs:{f}"), lead + j,
                  1.0 / np.sqrt(width) if last else 1.0, a["scale"] if last else 1.0,
                  kind="elementwise")
    return [fn.bb.emit(relax.op.reshape(y, shape))]


def _qembedding(low: Lowering, fn: _Function, node: Node):
    a = node.attrs
    w, s, zp = _qparams(low, fn, node)
    return [fn.te(qembedding_kernel, fn.value(node, 0), w, s, zp, bits=a["bits"],
                  group_size=a["group_size"], symmetric=a["symmetric"],
                  embedding_dim=a["embedding_dim"], scale=a["scale"], kind="embedding")]


def _quantize(low: Lowering, fn: _Function, node: Node):
    a = node.attrs
    s = fn.value(node, 1) if len(node.inputs) > 1 else None
    z = fn.value(node, 2) if len(node.inputs) > 2 else None
    return [fn.te(quantize_kernel, fn.value(node, 0), s, z, mode=a["mode"], bits=a["bits"],
                  symmetric=a["symmetric"], group=a["group"], clip_ratio=a["clip_ratio"],
                  kind="quantize")]


RULES: dict[str, Callable] = {
    "embedding": _embedding, "rms_norm": _rms_norm, "linear": _linear, "matmul": _matmul,
    "qlinear": _qlinear, "add": _binary("add"), "mul": _binary("mul"),
    "channel_scale": _channel_scale, "silu": _unary, "gelu": _unary, "softcap": _unary,
    "rotary": _rotary, "attention": _attention, "hadamard": _hadamard,
    "qembedding": _qembedding, "quantize": _quantize,
}


