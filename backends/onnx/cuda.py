"""The cuda target's float16 graph: the lowered float32 model, computed in float16 the way
ONNX Runtime's CUDA kernels are fed by onnxruntime-genai's builder.

What changes (`to_float16`), after lowering, on the ONNX graph itself, so every lowering rule
stays one rule for both targets:
- weights, activations and the KV cache (past/present inputs and outputs) are float16: half the
  bytes a decode step streams, and the CUDA kernels' fast paths (MatMulNBits' int4 GEMV and its
  CUTLASS fpA_intB GEMM take float16 activations; with float32 ones they take the slow
  dequantize + GEMM path). MatMulNBits' scales (and float zero points) follow the activations'
  type, as the op requires (T1); its codes are the same bytes. GroupQueryAttention's and
  RotaryEmbedding's cos/sin caches become float16 (type T of their inputs).
- reductions that the CUDA kernels would accumulate in float32 stay float32: the fused norms
  (SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization) and GroupQueryAttention do so
  inside the kernel (their float16 inputs, float accumulators), and the graph's own reductions,
  the ops in FLOAT32_OPS (a standalone norm's Pow/ReduceMean/Sqrt/Div, a standard attention's
  Softmax), run on float32 values: a Cast up before them and a Cast down after. x**2 of a
  residual-stream value above 256 would otherwise overflow float16 (max 65504).
- the logits output is cast back to float32 (one [batch, seq, vocab] cast), so every consumer
  reads the same dtype from both targets.
- the intermediate values' declared types are dropped (ONNX Runtime infers them): a fused norm's
  mean and inverse-std outputs stay float32 whatever its input type, and a stale declaration
  would contradict them.

The error this adds against the float32 reference is float16 rounding of activations and
weights (unit roundoff 2^-11) compounded over the layers; tests/backends/test_onnx_cuda.py
measures it on the CPU provider, which has float16 kernels for every op used here.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

log = logging.getLogger(__name__)

F32, F16 = ir.DataType.FLOAT, ir.DataType.FLOAT16
FLOAT32_OPS = frozenset({"Pow", "ReduceMean", "Sqrt", "Div", "Reciprocal", "Softmax"})
LOGITS = "logits"
# the fused norms' outputs 1 and 2 (mean, inverse std) are float32 whatever the input type
NORMS = frozenset({"SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization",
                   "SkipLayerNormalization", "LayerNormalization"})
NOT_FLOAT_OPS = frozenset({"Shape", "Size", "ArgMax", "ArgMin", "NonZero", "Equal", "Less",
                           "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or", "Xor",
                           "IsNaN", "IsInf"})
# ops whose output type is their first input's (data) whatever the other inputs are
FIRST_INPUT_TYPED = frozenset({"Gather", "Reshape", "Transpose", "Unsqueeze", "Squeeze", "Slice",
                               "Split", "Expand", "Identity", "Tile", "Range", "MatMulNBits",
                               "RotaryEmbedding", "GatherElements", "Pad"})


def _float_output(node: ir.Node, k: int, is_float: dict[int, bool]) -> bool:
    """Whether output k of `node` is float32 in the lowered graph. Rules leave most values'
    types undeclared, so this follows each op's typing from its inputs."""
    out = node.outputs[k]
    if out.dtype is not None:
        return out.dtype == F32
    op = node.op_type

    def fl(i: int) -> bool:
        return i < len(node.inputs) and node.inputs[i] is not None \
            and is_float.get(id(node.inputs[i]), False)

    if op == "Cast":
        return node.attributes["to"].value == F32
    if op in NOT_FLOAT_OPS:
        return False
    if op in ("Constant", "ConstantOfShape"):
        value = node.attributes.get("value")
        return value.value.dtype == F32 if value is not None else op == "ConstantOfShape"
    if op == "Where":
        return fl(1) or fl(2)
    if op in FIRST_INPUT_TYPED:
        return fl(0)
    return any(fl(i) for i in range(len(node.inputs)))


def _f16_tensor(t: ir.TensorProtocol, name: str | None) -> ir.Tensor:
    return ir.tensor(np.asarray(t.numpy(), np.float32).astype(np.float16), name=name)


def to_float16(model: ir.Model) -> ir.Model:
    """Make `model` (in place; also returned) compute in float16 as the module docstring says.
    A model with no float32 tensor is returned unchanged."""
    g = model.graph
    is_float: dict[int, bool] = {}  # id(value) -> it held float32 before the conversion
    f32_after: set[int] = set()  # values that stay float32
    for v in [*g.inputs, *g.initializers.values()]:
        is_float[id(v)] = v.dtype == F32
    for node in g:
        for k, out in enumerate(node.outputs):
            is_float[id(out)] = _float_output(node, k, is_float)
            if is_float[id(out)] and (node.op_type in FLOAT32_OPS or (
                    node.op_type in NORMS and k in (1, 2))):
                f32_after.add(id(out))
    if not any(is_float.values()):
        return model
    # initializers read only by float32 ops (a norm's exponent and epsilon) stay float32
    for v in list(g.initializers.values()):
        if v.dtype != F32:
            continue
        if v.uses() and all(n.op_type in FLOAT32_OPS for n, _ in v.uses()):
            f32_after.add(id(v))
            continue
        v.const_value = _f16_tensor(v.const_value, v.name)
        v.dtype = F16
    for v in g.inputs:
        if v.dtype == F32:
            v.dtype = F16
    for node in list(g):
        _retype_attributes(node)
        wants_f32 = node.op_type in FLOAT32_OPS
        for i, v in enumerate(node.inputs):
            if v is None or not is_float.get(id(v)):
                continue
            if wants_f32 != (id(v) in f32_after):
                _cast_before(g, node, i, F32 if wants_f32 else F16, is_float)
    for node in g:
        for out in node.outputs:
            if is_float.get(id(out)) and not out.is_graph_output():
                out.type, out.shape = None, None  # inferred by the runtime (docstring)
    _outputs(g, is_float, f32_after)
    log.info("float16 graph: %d initializers, %d nodes", len(g.initializers), g.num_nodes())
    return model


def _retype_attributes(node: ir.Node) -> None:
    """Casts to float32 become casts to float16; float constants become float16."""
    if node.op_type == "Cast" and node.attributes.get("to") is not None \
            and node.attributes["to"].value == F32:
        node.attributes["to"] = ir.AttrInt64("to", F16)
    for name in ("value",):
        attr = node.attributes.get(name)
        if node.op_type in ("Constant", "ConstantOfShape") and attr is not None \
                and attr.type == ir.AttributeType.TENSOR and attr.value.dtype == F32:
            node.attributes[name] = ir.AttrTensor(name, _f16_tensor(attr.value, attr.value.name))


def _cast_before(g: ir.Graph, node: ir.Node, i: int, to: ir.DataType,
                 is_float: dict[int, bool]) -> None:
    v = node.inputs[i]
    cast = ir.node("Cast", [v], {"to": to}, name=f"{node.name or node.op_type}.in{i}.cast")
    cast.outputs[0].name = f"{v.name}.{'f32' if to == F32 else 'f16'}.{node.name or i}"
    is_float[id(cast.outputs[0])] = True
    g.insert_before(node, cast)
    node.replace_input_with(i, cast.outputs[0])


def _outputs(g: ir.Graph, is_float: dict[int, bool], f32_after: set[int]) -> None:
    """Graph outputs: the logits as float32 (a Cast at the end), the rest float16."""
    for k, out in enumerate(list(g.outputs)):
        if not is_float.get(id(out)):
            continue
        if out.name != LOGITS:
            if id(out) in f32_after:
                raise ValueError(f"graph output {out.name!r} is computed by a float32 op")
            out.dtype = F16
            continue
        if id(out) in f32_after:
            continue  # already float32
        shape = out.shape
        out.name = f"{LOGITS}.f16"
        out.dtype = F16
        cast = ir.node("Cast", [out], {"to": F32}, name="logits.cast")
        res = cast.outputs[0]
        res.name, res.dtype, res.shape = LOGITS, F32, shape
        g.append(cast)
        g.outputs[k] = res
