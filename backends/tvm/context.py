"""The TVM backend's bottom module: the state the lowering rules (rules.py) and the driver
(lower.py) share. `Lowering` holds what is fixed for a module (cache slots, the parameters and the
layouts the kernels read them in, the rule table it was given), `_Function` what is built for one
Relax function (prefill or decode): its arguments and the Relax value of every IR value so far.

The rules and the driver import this module; it imports neither, so imports run one way and the
driver receives the table the rules make.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np
import torch
from tvm import relax, tirx
from tvm.relax import BlockBuilder, ShapeType, TensorType, TupleType

from splice.backends.common import (LoweringError, decoder_io, describe, hadamard_factors,
                                    hadamard_signs)
from splice.ir.core import Module, Node, Value
from . import kernels as K
from .quant import TILE, TILED, qlinear_param_layouts

__all__ = ["FLOAT_IR", "ROW_TILE", "Lowered", "Lowering", "LoweringError", "Param", "cache_shape",
           "describe", "hadamard_stages"]

FLOAT_IR = ("f32", "f64", "f16", "bf16")
HADAMARD_MAX_FACTOR = 64  # larger power-of-two factors are split (Sylvester is a Kronecker power)
ROW_TILE = 4  # prefill rows per register tile of the CPU GEMM (schedule.py)


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
            return hadamard_signs(int(self.layout.split(":")[1]))
        t = module.weights[self.source]
        if self.layout in TILED.values():
            return _tiled(t.to(torch.uint8 if self.dtype == "uint8" else torch.float32).numpy(),
                          self.shape)
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


def _tiled(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """[out, blocks, ...] -> [tiles, blocks, TILE, ...]: TILE consecutive outputs interleaved
    per block, the last tile padded with zeros (codes 0 and scale 0: a padded output is 0)."""
    padded = np.zeros((shape[0] * TILE, *a.shape[1:]), a.dtype)
    padded[:a.shape[0]] = a
    out = padded.reshape(shape[0], TILE, *a.shape[1:]).swapaxes(1, 2)
    return np.ascontiguousarray(out).reshape(shape)


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
        self.last = name == "prefill_last"
        # the CPU's decode is one sequence's step: a static batch leaves the VM no shapes to
        # build at run time (1,256 make_shape calls a SmolLM2 step with a symbolic batch); a
        # batched step runs prefill's kernels. The GPU's decode keeps its symbolic batch
        # (cuda_schedule.py: batched decode in low-batch GEMVs).
        self.batch = tirx.IntImm("int64", 1) if name == "decode" and low.packed \
            else tirx.Var("batch", "int64")
        self.seq = seq
        self.past, self.capacity = tirx.Var("past", "int64"), tirx.Var("capacity", "int64")
        b, s = self.batch, self.seq
        self.ids = relax.Var("input_ids", TensorType([b, s], "int64"))
        self.pos = relax.Var("position_ids", TensorType([b, s], "int64"))
        self.past_var = relax.Var("past", ShapeType([self.past]))
        self.cache_var = relax.Var("cache", TupleType(
            [TensorType(cache_shape(b, slot["kv_heads"], slot["head_dim"], self.capacity, j),
                        low.kv_cache) for slot in low.cache for j in (0, 1)]))
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
    """The state of lowering one ir.Module to Relax that the rules read: the module, the cache
    slots, the parameters in argument order and `rules`, the table the driver (lower.py) runs.
    `packed` selects the CPU weight layout (kernels.py) over the plain one that dlight's GPU
    rules expect. `activations`: "float", or "int8" for int4/int8 products over int8 activations
    in prefill and decode (qdot.py). `kv_cache`: the cache's dtype, "float32" or "float16"
    (written rounded to nearest, read back to float32 by the attention). `isa`: the int8
    products' dot products, one of qdot.ISAS."""

    def __init__(self, module: Module, *, packed: bool, rules: Mapping[str, Callable],
                 activations: str = "float", kv_cache: str = "float32", isa: str = "avx2"):
        self.module, self.packed, self.rules = module, packed, rules
        self.activations, self.kv_cache, self.isa = activations, kv_cache, isa
        self.io = decoder_io(module.graph)
        graph = module.graph
        self.cache = self.io["past"]
        names = {v.name: v for v in graph.inputs}
        self.cache_inputs = {id(names[slot[kv]]): 2 * i + j for i, slot in enumerate(self.cache)
                             for j, kv in enumerate(("key", "value"))}
        self._params: dict[tuple[str | None, str], Param] = {}
        self.logits_product = _logits_product(module)
        for v in graph.values():
            if not v.is_const and v.dtype not in FLOAT_IR + ("i64", "i32"):
                raise LoweringError(f"value %{v.name} has dtype {v.dtype}; the TVM backend "
                                    "computes in float32 with int64 ids")
        for node in graph.nodes:
            if node.op not in rules:
                raise LoweringError(f"the TVM backend has no lowering for {describe(node)}; "
                                    f"supported ops: {', '.join(sorted(rules))}")
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
                         for f in hadamard_stages(n.attrs["block"] or n.attrs["size"])}):
            self._add_param(None, f"hadamard_signs:{f}")

    def _layouts(self, node: Node, i: int, v: Value) -> list[str]:
        if node.op in ("qlinear", "qembedding"):
            layout = qlinear_param_layouts(node, i)
            if self.packed and layout in TILED and all(u.op == "qlinear" for u in v.users()):
                return [TILED[layout]]  # read by products only: tiles of a task's outputs
            return [layout]
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
            if layout in ("q_weight", "q_weight_tiled") or (
                    layout in ("q_zeros", "q_zeros_tiled") and not t.is_floating_point()):
                if t.dtype != torch.uint8:
                    raise LoweringError(f"quantized weight {weight!r} has dtype {t.dtype}; "
                                        "expected uint8 codes (MatMulNBits layout)")
                dtype = "uint8"
            elif shape == ():
                shape = (1,)  # a per-tensor scalar (static activation scale) as a vector
            elif layout in ("packed", "packed_t"):
                n, k = shape if layout == "packed" else shape[::-1]
                shape = (K.pack_rows(n), k, K.LANES)
            if layout in TILED.values():
                shape = (-(-shape[0] // TILE), shape[1], TILE, *shape[2:])
            name = weight if layout in ("plain",) or layout.startswith("q") \
                else f"{weight}.{layout}"
        self._params[(weight, layout)] = Param(name, weight, layout, shape, dtype)

    def params_list(self) -> list[Param]:
        return list(self._params.values())

    def param_index(self, weight: str | None, layout: str) -> int:
        return list(self._params).index((weight, layout))

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

    def residual_writable(self, fn: _Function, node: Node) -> bool:
        """Whether the kernel that fuses this node's residual add may write the sum over the
        residual itself: the add is the residual's last reader (its other readers are lowered
        already) and the residual is the step's own intermediate, neither an input nor an
        output of the graph (a graph input, like a weight, has no producer)."""
        add, i = node.outputs[0].uses[0]
        other = add.inputs[1 - i]
        return other.producer is not None and other not in self.module.graph.outputs and all(
            user is add or all(id(o) in fn.env for o in user.outputs if o is not None)
            for user, _ in other.uses)


ROW_WISE = ("softcap",)  # ops between the lm_head and the logits that work row by row


def _logits_product(module: Module) -> Node | None:
    """The product (the lm_head) whose output reaches the logits through row-wise ops only,
    reading a [batch, seq, hidden] activation; None when the graph ends otherwise."""
    v = module.graph.outputs[0]
    node = v.producer
    while node is not None and node.op in ROW_WISE:
        node = node.inputs[0].producer
    if node is None or node.op not in ("linear", "qlinear", "matmul"):
        return None
    x = node.inputs[0]
    if x.is_const or len(x.shape or ()) != 3 or len(x.uses) != 1:
        return None
    return node


def cache_shape(batch, kv_heads: int, head_dim: int, capacity, which: int) -> list:
    """A cache tensor's shape: keys (which = 0) transposed, [batch, kv_heads, head_dim,
    capacity]; values (1) [batch, kv_heads, capacity, head_dim] (attention.py says why)."""
    if which == 0:
        return [batch, kv_heads, head_dim, capacity]
    return [batch, kv_heads, capacity, head_dim]


def hadamard_stages(width: int) -> list[int]:
    """The Kronecker factors of hadamard_matrix(width) that the transform's stages apply, its
    power of two split greedily into factors of HADAMARD_MAX_FACTOR and the rest (any split is
    the same matrix): the transform costs width * sum(factors) multiply-adds."""
    return hadamard_factors(width, max_factor=HADAMARD_MAX_FACTOR, split="greedy")
