"""Lower an ir.Module to a Relax IRModule with two entry points, `prefill` and `decode`.

Both functions take the same arguments:

    input_ids [batch, seq] i64, position_ids [batch, seq] i64, past: Shape([past]),
    cache: Tuple(past.{i}.key, past.{i}.value as [batch, kv_heads, capacity, head_dim]),
    params: Tuple(every stored weight, in `Lowered.params` order)

and return the logits [batch, seq, vocab]. `prefill_last` (where the logits come from one product
through row-wise ops: every decoder splice makes) returns [batch, 1, vocab], the last position's
only: what a generation needs of its prompt, without the lm_head's product over every row (a
fifth of SmolLM2's 64-token prefill). `decode` is the same graph with seq fixed to 1, so the
kernels it calls are specialised for one row (GEMV schedules) while `prefill` gets GEMM ones.

The KV cache: explicit fixed-capacity tensors, written in place. Each attention node appends its
new keys and values at positions past..past+seq-1 of its layer's cache tensor
(`call_tir_inplace`), then attends over the first past+seq positions. TVM's paged KV cache (the
one MLC-LLM drives) was the alternative: it pays off with many concurrent sequences of unknown
length, but it is an opaque runtime object whose kernels and attention are TVM's, not the IR's
(no softcap, no per-layer sliding windows in our order of operations), and it needs the
runtime's paged-attention builtins on the device. Plain tensors keep the attention semantics the
reference interpreter's, need nothing from the runtime beyond the VM, cross-compile to any llvm
target, and let the runtime grow the cache (reallocate and copy) when a sequence outgrows it.
Nothing is copied per step: the cache is an argument the function mutates, not a value it
returns.

Weights travel as one tuple argument rather than being bound as constants: the .so holds code
only (small, fast to compile, identical for any weights of the same shapes) and the parameters sit
beside it in safetensors, in the layouts the kernels read (`Param.layout`).

This is the driver: one rule per IR op, in a table (rules.RULES) handed to `lower`; the rules and
the state they share (context.py) sit below it and never import it. A graph with an op that has
no rule, or with a cache value used outside attention, raises LoweringError naming the node's op,
role, layer and the pass that made it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from tvm import relax, tirx
from tvm.relax import BlockBuilder

from splice.ir.core import Module
from . import rules as standard
from .context import Lowered, Lowering, LoweringError, _Function, describe

__all__ = ["Lowered", "LoweringError", "describe", "lower"]

log = logging.getLogger(__name__)


def _build(low: Lowering) -> Lowered:
    bb = BlockBuilder()
    names = ["prefill", "decode"] + (["prefill_last"] if low.logits_product is not None else [])
    for name in names:
        seq = tirx.IntImm("int64", 1) if name == "decode" else tirx.Var("seq", "int64")
        fn = _Function(low, bb, seq, name)
        with bb.function(name, fn.args(), attrs={"num_input": 4}):
            with bb.dataflow():
                logits = _body(low, fn)
                out = bb.emit_output(logits)
            bb.emit_func_output(out)
    return Lowered(bb.get(), low.params_list(), low.cache)


def _body(low: Lowering, fn: _Function):
    """Emit every node's rule into `fn`; returns the logits' Relax value."""
    graph = low.module.graph
    for v in graph.inputs:
        if v.name == low.io["input_ids"]:
            fn.env[id(v)] = fn.ids
        elif v.name == low.io["position_ids"]:
            fn.env[id(v)] = fn.pos
    for node in graph.nodes:
        if id(node) in fn.skip:
            continue
        if fn.last and node is low.logits_product:
            # prefill_last: only each sequence's last position reaches the lm_head (the ops after
            # it work row by row, so the logits of that row are the full prefill's)
            x = node.inputs[0]
            fn.env[id(x)] = fn.bb.emit(relax.op.strided_slice(
                fn.env[id(x)], axes=[1], begin=[fn.seq - 1], end=[fn.seq]))
        outs = low.rules[node.op](low, fn, node)
        for v, r in zip(node.outputs, outs):
            if r is not None:
                fn.env[id(v)] = r
    return fn.env[id(graph.outputs[0])]


def lower(module: Module, *, packed: bool = True, rules: Mapping[str, Callable] | None = None,
          activations: str = "float", kv_cache: str = "float32", isa: str = "avx2") -> Lowered:
    """ir.Module -> Lowered (Relax module with prefill/decode, parameter list, cache slots).
    `rules` replaces the op table (default `rules.RULES`, read at the call); `activations`
    "int8" makes the int4/int8 products quantize their input per block (qdot.py); `kv_cache`
    the dtype the KV cache stores ("float16": half the bytes a decode step reads from it); `isa`
    the integer dot products of the int8 products (one of qdot.ISAS)."""
    table = standard.RULES if rules is None else rules
    return _build(Lowering(module, packed=packed, rules=table, activations=activations,
                           kv_cache=kv_cache, isa=isa))
