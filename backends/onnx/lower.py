"""Lower an ir.Module to an ONNX model (built with onnx-ir), and save it with external weights.

One lowering rule per IR op, in a table (`rules.RULES`, op name -> function). A rule receives the
`LoweringContext` and the IR node and returns one ONNX value per IR output; the context names those
values after the IR values, so the ONNX graph reads like the IR's text form and the decoder's I/O
names (input_ids, position_ids, past.{i}.key, logits, present.{i}.value) carry over unchanged.
Faster variants of a rule (ONNX Runtime's contrib ops) are a different table passed as `rules`:
a rule may emit nodes in any domain and the opset imports are collected from what was emitted.

Numbers: every float tensor is lowered as float32 (the weights are cast at lowering time), the
standard-op opset is 21, which ONNX Runtime 1.17+ runs on every execution provider we target.
The opset-23 Attention and RotaryEmbedding ops are not used: an explicit additive mask built in the
graph from the cache and query lengths is what makes prefill and decode share one graph, and its
semantics are the reference's by construction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass
import torch

from splice.errors import InputError
from splice.ir.core import Module, Node, Value

log = logging.getLogger(__name__)

OPSET = 21
IR_VERSION = 10
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"

# float dtypes all become FLOAT: the backend computes in float32 for now
ONNX_DTYPES = {
    "f64": ir.DataType.FLOAT, "f32": ir.DataType.FLOAT, "f16": ir.DataType.FLOAT,
    "bf16": ir.DataType.FLOAT, "i64": ir.DataType.INT64, "i32": ir.DataType.INT32,
    "i8": ir.DataType.INT8, "u8": ir.DataType.UINT8, "bool": ir.DataType.BOOL,
}

Rule = Callable[["LoweringContext", Node], Sequence[ir.Value]]


class LoweringError(InputError):
    """The graph holds something this backend cannot express (an op without a rule, a
    non-constant operand where a constant is required)."""


def describe(node: Node) -> str:
    """How an error names an IR node: op, role, layer and the pass that made it."""
    where = f"role {node.role!r}" if node.role else "no role"
    layer = f", layer {node.layer}" if node.layer is not None else ""
    origin = f", made by {node.origin!r}" if node.origin else ""
    out = node.outputs[0].name if node.outputs else "?"
    return f"{node.op} node ({where}{layer}{origin}) -> %{out}"


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


def _io_value(v: Value) -> ir.Value:
    return ir.Value(name=v.name, shape=_shape(v), type=ir.TensorType(ONNX_DTYPES[v.dtype]))


def _shape(v: Value) -> ir.Shape:
    """The IR shape with its symbolic dims ("batch", "past+seq") as ONNX dim_params."""
    return ir.Shape([d if isinstance(d, int) else str(d) for d in v.shape])


def lower(module: Module, *, rules: Mapping[str, Rule] | None = None) -> ir.Model:
    """The ONNX model computing `module`'s graph. `rules` replaces the op table (default
    `rules.RULES`); an op without a rule raises a LoweringError naming the node it came from."""
    from .rules import RULES

    table = RULES if rules is None else rules
    g = module.graph
    ctx = LoweringContext(module)
    inputs = []
    for v in g.inputs:
        ov = _io_value(v)
        ctx.values[id(v)] = ov
        ctx._bound.add(id(ov))
        inputs.append(ov)
    missing = sorted({n.op for n in g.nodes if n.op not in table})
    if missing:
        first = next(n for n in g.nodes if n.op in missing)
        raise LoweringError(f"the ONNX backend cannot lower op(s) {missing}: first at "
                            f"{describe(first)}; ops it lowers: {', '.join(sorted(table))}")
    for node in g.nodes:
        ctx.node = node
        try:
            outs = table[node.op](ctx, node)
        except Exception as e:  # a bug in a rule stays a bug, but says where it happened
            if not isinstance(e, LoweringError):
                e.add_note(f"while lowering {describe(node)}")
            raise
        if len(outs) != len(node.outputs):
            raise LoweringError(f"rule for {node.op} returned {len(outs)} values for "
                                f"{len(node.outputs)} outputs at {describe(node)}")
        for v, out in zip(node.outputs, outs):
            ctx.bind(v, out)
    ctx.node = None
    outputs = []
    for v in g.outputs:
        if id(v) not in ctx.values:
            raise LoweringError(f"graph output %{v.name} is not computed by any node")
        out = ctx.values[id(v)]
        out.shape = _shape(v)
        out.dtype = ONNX_DTYPES[v.dtype]
        outputs.append(out)
    opsets = {"": OPSET}
    for domain, version in ctx.tape.used_opsets:
        if domain:
            opsets[domain] = version or 1
    inputs += ctx.extra_inputs.values()
    graph = ir.Graph(inputs, outputs, nodes=ctx.tape.nodes, initializers=ctx.tape.initializers,
                     opset_imports=opsets, name=module.config.architecture or "splice")
    model = ir.Model(graph, ir_version=IR_VERSION, producer_name="splice",
                     producer_version=splice_version())
    # rules that fuse leave the values their consumer no longer reads (fuse.py): drop them
    RemoveUnusedNodesPass()(model)
    model.metadata_props["splice.architecture"] = module.config.architecture
    model.metadata_props["splice.source"] = module.config.source
    log.info("lowered %d IR nodes to %d ONNX nodes, %d initializers", len(g.nodes),
             len(ctx.tape.nodes), len(ctx.tape.initializers))
    return model


def save(model: ir.Model, directory: str | Path, *, check: bool = True) -> Path:
    """Write `model` as directory/model.onnx with every weight in directory/model.onnx.data (one
    file, so models over protobuf's 2 GB limit work) and run onnx.checker on it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / MODEL_FILE
    ir.save(model, path, external_data=DATA_FILE)
    if check:
        onnx.checker.check_model(str(path))
    return path


def splice_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("splice")
    except PackageNotFoundError:
        return "0"
