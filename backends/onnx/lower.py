"""Lower an ir.Module to an ONNX model (built with onnx-ir), and save it with external weights.

This is the driver. One lowering rule per IR op, in a table (`rules.RULES`, op name -> function)
handed to `lower`; the rule families and the state they share (`context.LoweringContext`) sit
below it and never import it. A rule receives the context and the IR node and returns one ONNX
value per IR output; the context names those values after the IR values, so the ONNX graph reads
like the IR's text form and the decoder's I/O names (input_ids, position_ids, past.{i}.key,
logits, present.{i}.value) carry over unchanged.
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
from collections.abc import Mapping
from pathlib import Path

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from splice.backends.common import LoweringError, describe, splice_version
from splice.ir.core import Module, Value
from . import rules as standard
from .context import ONNX_DTYPES, LoweringContext, Rule

log = logging.getLogger(__name__)

OPSET = 21
IR_VERSION = 10
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"

__all__ = ["DATA_FILE", "MODEL_FILE", "OPSET", "LoweringContext", "LoweringError", "describe",
           "lower", "save", "splice_version"]


def _io_value(v: Value) -> ir.Value:
    return ir.Value(name=v.name, shape=_shape(v), type=ir.TensorType(ONNX_DTYPES[v.dtype]))


def _shape(v: Value) -> ir.Shape:
    """The IR shape with its symbolic dims ("batch", "past+seq") as ONNX dim_params."""
    return ir.Shape([d if isinstance(d, int) else str(d) for d in v.shape])


def lower(module: Module, *, rules: Mapping[str, Rule] | None = None) -> ir.Model:
    """The ONNX model computing `module`'s graph. `rules` replaces the op table (default
    `rules.RULES`, read at the call); an op without a rule raises a LoweringError naming the node
    it came from."""
    table = standard.RULES if rules is None else rules
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

