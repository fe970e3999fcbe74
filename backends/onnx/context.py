"""The ONNX backend's bottom module: the state the lowering rules share while one module is
lowered (`LoweringContext`), the rule type and the dtype map.

The rule families (rules.py standard ops, quant.py, hadamard.py, contrib.py and fuse.py for ONNX
Runtime's fused ops, npu/lower.py for the HTP's forms) and the driver (lower.py) all import this
module; it imports none of them, so imports run one way: families -> context, driver -> context,
and the driver receives the table the families make (`lower(module, rules=...)`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from splice.backends.common import LoweringError, describe
from splice.ir.core import Module, Node, Value

__all__ = ["ONNX_DTYPES", "LoweringContext", "LoweringError", "Rule", "describe", "weight_array"]

# float dtypes all become FLOAT: the backend computes in float32 for now
ONNX_DTYPES = {
    "f64": ir.DataType.FLOAT, "f32": ir.DataType.FLOAT, "f16": ir.DataType.FLOAT,
    "bf16": ir.DataType.FLOAT, "i64": ir.DataType.INT64, "i32": ir.DataType.INT32,
    "i8": ir.DataType.INT8, "u8": ir.DataType.UINT8, "bool": ir.DataType.BOOL,
}

Rule = Callable[["LoweringContext", Node], Sequence[ir.Value]]


class LoweringContext:
    """What the rules share while one module is lowered: the tape of ONNX nodes, the map from IR
    values to ONNX values, weight initializers (in each layout a rule asked for, made once) and
    subgraphs several nodes reuse (attention masks, rotary angles) keyed by what they depend on."""

    def __init__(self, module: Module):
        self.module = module
        self.tape = ir.tape.Tape()
        self.values: dict[int, ir.Value] = {}
        self.cache: dict[Any, Any] = {}
        self.node: Node | None = None
        self._weights: dict[tuple[str, Any], ir.Value] = {}
        self._consts: dict[tuple[str, tuple[int, ...], bytes], ir.Value] = {}
        # IR names are reserved up front: graph I/O must keep them exactly, and helper values
        # must never take one
        self._reserved = {v.name for v in module.graph.values()}
        self._names: set[str] = set()
        self._bound: set[int] = set()
        self._count = 0
        self.extra_inputs: dict[str, ir.Value] = {}

    # -- names ---------------------------------------------------------------------------------
    def unique(self, base: str) -> str:
        name = base
        while name in self._names or name in self._reserved:
            self._count += 1
            name = f"{base}_{self._count}"
        self._names.add(name)
        return name

    def _prefix(self) -> str:
        if self.node is None or not self.node.outputs:
            return "shared"
        return self.node.outputs[0].name

    # -- building ------------------------------------------------------------------------------
    def op(self, op_type: str, inputs: Sequence[ir.Value | None],
           attrs: Mapping[str, Any] | None = None, *, domain: str = "", outputs: int = 1) -> Any:
        """Emit one ONNX node; returns its value, or a tuple of values when `outputs` > 1. The node
        is named after the IR node being lowered and records its role, layer and origin."""
        node = self.node
        meta = None
        if node is not None:
            meta = {"splice.op": node.op, "splice.role": node.role, "splice.origin": node.origin,
                    "splice.layer": "" if node.layer is None else str(node.layer)}
        name = self.unique(f"{self._prefix()}/{op_type}")
        outs = self.tape.op_multi_out(op_type, inputs, attrs, domain=domain, num_outputs=outputs,
                                      name=name, metadata_props=meta)
        for i, v in enumerate(outs):  # node names are unique and hold a "/": safe value names
            v.name = f"{name}:{i}" if outputs > 1 else name
        return outs[0] if outputs == 1 else tuple(outs)

    def const(self, value: Any, dtype: Any = np.float32) -> ir.Value:
        """A small constant (a scalar, a shape, an axis list) as a shared initializer."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        v = self._consts.get(key)
        if v is None:
            name = self.unique(f"const.{len(self._consts)}")
            v = self.tape.initializer(ir.tensor(arr), name=name)
            self._consts[key] = v
        return v

    def graph_input(self, name: str, dtype: ir.DataType, shape: Sequence[int | str]) -> ir.Value:
        """An input the ONNX graph needs beyond the IR's (GroupQueryAttention's attention_mask),
        made once per name; `name` must not be an IR value's."""
        v = self.extra_inputs.get(name)
        if v is None:
            if name in self._reserved or name in self._names:
                raise LoweringError(f"extra graph input {name!r} clashes with a value's name")
            self._names.add(name)
            v = ir.Value(name=name, shape=ir.Shape(list(shape)), type=ir.TensorType(dtype))
            self.extra_inputs[name] = v
        return v

    def ints(self, *values: int) -> ir.Value:
        return self.const(list(values), np.int64)

    def weight(self, value: Value, layout: str = "", transform: Callable[[np.ndarray], np.ndarray]
               | None = None) -> ir.Value:
        """The initializer for constant `value` in `layout` ("" as stored, "T" transposed, or any
        tag naming `transform`, applied to the float32 array). Made once per (weight, layout)."""
        if not value.is_const:
            raise LoweringError(f"{describe(self.node) if self.node else 'lowering'}: operand "
                                f"%{value.name} must be a constant weight, but it is computed")
        key = (value.const, layout)
        v = self._weights.get(key)
        if v is not None:
            return v
        if layout and layout != "T" and transform is None:
            raise LoweringError(f"weight layout {layout!r} of %{value.name} has no transform")

        def array(t: torch.Tensor) -> np.ndarray:
            arr = weight_array(t)
            if layout == "T":
                return np.ascontiguousarray(arr.T)
            return np.ascontiguousarray(transform(arr)) if layout else arr

        name = value.const if not layout else self.unique(f"{value.const}.{layout}")
        # a lazy weight store (frontend.lazy.LazyWeights) names an entry's on-disk reference
        lazy = getattr(self.module.weights, "ref", None)
        ref = lazy(value.const) if callable(lazy) else None
        if ref is None:
            tensor = ir.tensor(array(self.module.weight(value)))
        else:
            # a weight on disk (layer-by-layer compiles) stays there: ir.save reads it when it
            # writes the external data, so no step holds the whole model. A transformed layout's
            # shape and dtype come from running the transform once on a stand-in of the weight.
            stand_in = torch.zeros((), dtype=ref.out_dtype)
            shape, dtype = ref.out_shape, weight_array(stand_in).dtype
            if layout == "T":
                shape = shape[::-1]
            elif layout:
                probe = array(stand_in.expand(ref.out_shape))
                shape, dtype = probe.shape, probe.dtype
                del probe
            tensor = ir.LazyTensor(lambda: ir.tensor(array(ref.load())),
                                   dtype=ir.DataType.from_numpy(dtype), shape=ir.Shape(shape),
                                   name=name)
        v = self.tape.initializer(tensor, name=name)
        self._weights[key] = v
        return v

    def input(self, node: Node, i: int) -> ir.Value | None:
        """The ONNX value for input `i` of `node`: a constant as stored, or what its producer
        lowered to. Rules that want a weight in another layout call `weight` instead."""
        if i >= len(node.inputs) or node.inputs[i] is None:
            return None
        v = node.inputs[i]
        if v.is_const:
            return self.weight(v)
        return self.values[id(v)]

    def bind(self, value: Value, out: ir.Value) -> None:
        """Record that IR `value` lowered to `out`, which takes the IR value's name."""
        if out.producer() is None or id(out) in self._bound:
            out = self.op("Identity", [out])  # a graph input, a weight or another value's result
        out.name = value.name
        out.dtype = ONNX_DTYPES[value.dtype]
        self.values[id(value)] = out
        self._bound.add(id(out))


def weight_array(t: torch.Tensor) -> np.ndarray:
    """A weight as numpy: floats cast to float32 (the compute type), integers kept."""
    t = t.detach().cpu()
    if t.is_floating_point():
        t = t.to(torch.float32)
    return np.ascontiguousarray(t.numpy())
