"""Lower an ir.Module to a Relax IRModule with two entry points, `prefill` and `decode`.

Both functions take the same arguments:

    input_ids [batch, seq] i64, position_ids [batch, seq] i64, past: Shape([past]),
    cache: Tuple(past.{i}.key, past.{i}.value as [batch, kv_heads, capacity, head_dim]),
    params: Tuple(every stored weight, in `Lowered.params` order)

and return the logits [batch, seq, vocab]. `decode` is the same graph with seq fixed to 1, so the
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

One rule per IR op (rules.RULES); a graph with an op that has none, or with a cache value used
outside attention, raises LoweringError naming the node's op, role and layer.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import numpy as np
import torch
from tvm import relax, tirx
from tvm.relax import BlockBuilder, ShapeType, TensorType, TupleType

from splice.errors import InputError
from splice.ir.core import Module, Node, Value
from splice.ir.hadamard import factorize, hadamard_matrix
from . import kernels as K
from .quant import qlinear_param_layouts

log = logging.getLogger(__name__)

FLOAT_IR = ("f32", "f64", "f16", "bf16")
HADAMARD_MAX_FACTOR = 64  # larger power-of-two factors are split (Sylvester is a Kronecker power)
ROW_TILE = 4  # prefill rows per register tile of the CPU GEMM (schedule.py)


class LoweringError(InputError):
    """The graph holds something the TVM backend cannot express."""


def describe(node: Node) -> str:
    where = f"role {node.role!r}" if node.role else "no role"
    layer = f", layer {node.layer}" if node.layer is not None else ""
    return f"{node.op} node ({where}{layer}) -> %{node.outputs[0].name if node.outputs else '?'}"


@dataclasses.dataclass(frozen=True)
class Param:
    """One stored parameter: its name in the safetensors file, the IR weight it comes from (None
    for tables the backend makes, such as Hadamard signs) and the layout the kernel reads."""

    name: str
    source: str | None
    layout: str
    shape: tuple[int, ...]
    dtype: str

    def array(self, module: Module) -> np.ndarray:
        """The stored array, made from the IR weight (or built, for backend tables)."""
        if self.layout.startswith("hadamard_signs"):
            f = int(self.layout.split(":")[1])
            return np.rint(hadamard_matrix(f).numpy() * np.sqrt(f)).astype(np.float32)
        t = module.weights[self.source]
        if self.dtype == "uint8":
            return np.ascontiguousarray(t.numpy())
        a = t.to(torch.float32).numpy()
        if self.layout == "packed_t":
            a = a.T
        if self.layout in ("packed", "packed_t"):
            n, k = a.shape
            rows = K.pack_rows(n)
            padded = np.zeros((rows * K.LANES, k), np.float32)
            padded[:n] = a
            a = padded.reshape(rows, K.LANES, k).transpose(0, 2, 1)
        return np.ascontiguousarray(a, dtype=np.float32).reshape(self.shape)


@dataclasses.dataclass
class Lowered:
    """The Relax module, its parameters in argument order, and the cache slots (per layer the
    graph input names of key and value, with kv_heads and head_dim)."""

    mod: object
    params: list[Param]
    cache: list[dict]


class _Function:
    """The state of lowering one function (prefill or decode) of the module."""

    def __init__(self, low: Lowering, bb: BlockBuilder, seq: tirx.PrimExpr, name: str):
        self.low, self.bb, self.rows = low, bb, "few" if name == "decode" else "many"
        self.batch, self.seq = tirx.Var("batch", "int64"), seq
        self.past, self.capacity = tirx.Var("past", "int64"), tirx.Var("capacity", "int64")
        b, s = self.batch, self.seq
        self.ids = relax.Var("input_ids", TensorType([b, s], "int64"))
        self.pos = relax.Var("position_ids", TensorType([b, s], "int64"))
        self.past_var = relax.Var("past", ShapeType([self.past]))
        self.cache_var = relax.Var("cache", TupleType(
            [TensorType(cache_shape(b, slot["kv_heads"], slot["head_dim"], self.capacity, j),
                        "float32") for slot in low.cache for j in (0, 1)]))
        self.params_var = relax.Var("params", TupleType(
            [TensorType(list(p.shape), p.dtype) for p in low.params_list()]))
        self.env: dict[int, object] = {}
        self.memo: dict[object, object] = {}
        self.skip: set[int] = set()

    def args(self) -> list:
        return [self.ids, self.pos, self.past_var, self.cache_var, self.params_var]

    def te(self, fn: Callable, *args, kind: str, **kw):
        attrs = {"splice.kernel": kind, "splice.rows": self.rows}
        return self.bb.emit_te(fn, *args, primfunc_name_hint=kind, primfunc_attrs=attrs, **kw)

    def param(self, weight: str | None, layout: str):
        key = ("param", weight, layout)
        if key not in self.memo:
            index = self.low.param_index(weight, layout)
            self.memo[key] = self.bb.emit(relax.TupleGetItem(self.params_var, index))
        return self.memo[key]

    def cache(self, index: int):
        key = ("cache", index)
        if key not in self.memo:
            self.memo[key] = self.bb.emit(relax.TupleGetItem(self.cache_var, index))
        return self.memo[key]

    def value(self, node: Node, i: int, layout: str = "plain"):
        v = node.inputs[i]
        if v is None:
            return None
        if v.is_const:
            return self.param(v.const, layout)
        if id(v) in self.low.cache_inputs:
            raise LoweringError(f"{describe(node)} reads the cache input %{v.name}; only attention "
                                "may read past keys and values")
        return self.env[id(v)]


class Lowering:
    """ir.Module -> Relax. `packed` selects the CPU weight layout (kernels.py) over the plain one
    that dlight's GPU rules expect."""

    def __init__(self, module: Module, *, packed: bool):
        from ..onnx.export import decoder_io

        self.module, self.packed = module, packed
        self.io = decoder_io(module.graph)
        graph = module.graph
        self.cache = self.io["past"]
        names = {v.name: v for v in graph.inputs}
        self.cache_inputs = {id(names[slot[kv]]): 2 * i + j for i, slot in enumerate(self.cache)
                             for j, kv in enumerate(("key", "value"))}
        self._params: dict[tuple[str | None, str], Param] = {}
        for v in graph.values():
            if not v.is_const and v.dtype not in FLOAT_IR + ("i64", "i32"):
                raise LoweringError(f"value %{v.name} has dtype {v.dtype}; the TVM backend "
                                    "computes in float32 with int64 ids")
        from .rules import RULES

        for node in graph.nodes:
            if node.op not in RULES:
                raise LoweringError(f"the TVM backend has no lowering for {describe(node)}; "
                                    f"supported ops: {', '.join(sorted(RULES))}")
        self._plan_params()

    # -- parameters ----------------------------------------------------------------------------
    def _plan_params(self) -> None:
        """Every (weight, layout) pair the rules will ask for, in graph order."""
        for node in self.module.graph.nodes:
            for i, v in enumerate(node.inputs):
                if v is not None and v.is_const:
                    for layout in self._layouts(node, i, v):
                        self._add_param(v.const, layout)
        for f in sorted({f for n in self.module.graph.find(op="hadamard")
                         for f in hadamard_factors(n.attrs["block"] or n.attrs["size"])}):
            self._add_param(None, f"hadamard_signs:{f}")

    def _layouts(self, node: Node, i: int, v: Value) -> list[str]:
        if node.op in ("qlinear", "qembedding"):
            return [qlinear_param_layouts(node, i)]
        if node.op == "linear" and i == 1 and self.packed:
            return ["packed"]
        if node.op == "matmul" and i == 1 and self.packed:
            return ["packed_t"]
        if node.op == "embedding" and i == 1 and self.packed and any(
                u.op == "linear" and u.inputs[1] is v for u in v.users()):
            return ["packed"]  # tied: the gather reads the lm_head's packed table
        return ["plain"]

    def _add_param(self, weight: str | None, layout: str) -> None:
        if (weight, layout) in self._params:
            return
        if weight is None:
            f = int(layout.split(":")[1])
            shape, dtype, name = (f, f), "float32", f"hadamard.signs.{f}"
        else:
            t = self.module.weights[weight]
            shape, dtype = tuple(t.shape), "float32"
            if layout == "q_weight" or (layout == "q_zeros" and not t.is_floating_point()):
                if t.dtype != torch.uint8:
                    raise LoweringError(f"quantized weight {weight!r} has dtype {t.dtype}; "
                                        "expected uint8 codes (MatMulNBits layout)")
                dtype = "uint8"
            elif shape == ():
                shape = (1,)  # a per-tensor scalar (static activation scale) as a vector
            elif layout in ("packed", "packed_t"):
                n, k = shape if layout == "packed" else shape[::-1]
                shape = (K.pack_rows(n), k, K.LANES)
            name = weight if layout in ("plain",) or layout.startswith("q") \
                else f"{weight}.{layout}"
        self._params[(weight, layout)] = Param(name, weight, layout, shape, dtype)

    def params_list(self) -> list[Param]:
        return list(self._params.values())

    def param_index(self, weight: str | None, layout: str) -> int:
        return list(self._params).index((weight, layout))

    # -- functions -----------------------------------------------------------------------------
    def build(self) -> Lowered:
        bb = BlockBuilder()
        for name, seq in (("prefill", tirx.Var("seq", "int64")), ("decode", tirx.IntImm("int64", 1))):
            fn = _Function(self, bb, seq, name)
            with bb.function(name, fn.args(), attrs={"num_input": 4}):
                with bb.dataflow():
                    logits = self._body(fn)
                    out = bb.emit_output(logits)
                bb.emit_func_output(out)
        return Lowered(bb.get(), self.params_list(), self.cache)

    def _body(self, fn: _Function):
        graph = self.module.graph
        for v in graph.inputs:
            if v.name == self.io["input_ids"]:
                fn.env[id(v)] = fn.ids
            elif v.name == self.io["position_ids"]:
                fn.env[id(v)] = fn.pos
        from .rules import RULES

        for node in graph.nodes:
            if id(node) in fn.skip:
                continue
            outs = RULES[node.op](self, fn, node)
            for v, r in zip(node.outputs, outs):
                if r is not None:
                    fn.env[id(v)] = r
        return fn.env[id(graph.outputs[0])]

    def fusable_residual(self, fn: _Function, node: Node) -> tuple[Node, object] | None:
        """The `add` that only adds this node's output to an already computed value of the same
        shape (the decoder's skip connection), to fuse as the kernel's epilogue."""
        y = node.outputs[0]
        if len(y.uses) != 1 or y in self.module.graph.outputs:
            return None
        add, i = y.uses[0]
        if add.op != "add":
            return None
        other = add.inputs[1 - i]
        if other is None or other.is_const or id(other) not in fn.env \
                or other.shape != y.shape or add.inputs[0] is add.inputs[1]:
            return None
        return add, fn.env[id(other)]


def cache_shape(batch, kv_heads: int, head_dim: int, capacity, which: int) -> list:
    """A cache tensor's shape: keys (which = 0) transposed, [batch, kv_heads, head_dim,
    capacity]; values (1) [batch, kv_heads, capacity, head_dim] (attention.py says why)."""
    if which == 0:
        return [batch, kv_heads, head_dim, capacity]
    return [batch, kv_heads, capacity, head_dim]


def hadamard_factors(width: int) -> list[int]:
    """The Kronecker factors of hadamard_matrix(width), its power of two split into factors of
    at most HADAMARD_MAX_FACTOR (Sylvester's H_2^k is the Kronecker power of H_2, so any split is
    the same matrix): the transform costs width * sum(factors) multiply-adds."""
    factors = factorize(width)
    if factors is None:
        raise LoweringError(f"no Hadamard matrix of order {width}")
    out = []
    for f in factors:
        if f & (f - 1) == 0:
            while f > HADAMARD_MAX_FACTOR:
                out.append(HADAMARD_MAX_FACTOR)
                f //= HADAMARD_MAX_FACTOR
        out.append(f)
    return [f for f in out if f > 1] or [1]


def lower(module: Module, *, packed: bool = True) -> Lowered:
    """ir.Module -> Lowered (Relax module with prefill/decode, parameter list, cache slots)."""
    return Lowering(module, packed=packed).build()
