"""Pre-flight: every node of a QDQ ONNX graph that Qualcomm's HTP will not take, before it runs.

ONNX Runtime's QNN EP takes what the HTP can run and, unless CPU fallback is disabled, quietly
leaves the rest to the CPU: a model "runs on the NPU" while half of it does not. This check walks
the graph and names each node the HTP refuses, with the reason and the IR node it came from
(metadata_props splice.op / role / layer / origin, which the ONNX lowerer writes), so the pass that
introduced it can be fixed. `export` runs it first and fails with the report; then it compiles on
the HTP with fallback disabled and requires one partition, which confirms the check.

What is checked, and where the rule comes from (QNN EP's supported-operator table and Qualcomm's
HTP op definitions; each rule was confirmed on the HTP backend the onnxruntime-qnn 2.7 wheel ships,
by a one-op QDQ graph that compiles or is refused with CPU fallback disabled):
- op: the ONNX op is not in the HTP's set (`HTP_OPS`), e.g. Erf, Range, NonZero, custom domains.
- shape: a dimension that is not a fixed integer (the HTP compiles static graphs only).
- rank: a tensor of rank above 5 (HTP tensors are at most 5-D; rank 6 Add/Transpose are refused).
- scale: per-channel (per-axis) quantization of an activation (only weights may be per channel:
  the graph fails to compose); a weight DequantizeLinear with a nonzero zero point (HTP weights
  are symmetric); block-quantized weights without 16-bit activations, or with a block size the
  HTP does not tile (a multiple of 8 for 4-bit, 4 for 8-bit).
- constant: an operand the HTP needs fixed at compile time is computed (Clip's bounds, Reshape's
  shape, Slice's starts/ends, Split's sizes, Tile's repeats, Expand's shape).
- precision (warnings): a MatMul whose computed second operand is on a uint16 grid (QNN converts
  it to uint8 first; a signed int16 symmetric one runs as it is: attention scores 2.6% RMS off the
  CPU against 0.07% on stories260K).
- dtype: a compute op that reads or writes unquantized float. HTP v73 and later run it in float16
  (a warning: it works, at float16 precision); v68/v69 have no float unit (an error).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from splice.errors import InputError

log = logging.getLogger(__name__)

# ONNX ops (default domain) the QNN EP maps onto the HTP
HTP_OPS = frozenset("""
Abs Add And ArgMax ArgMin Asin Atan AveragePool BatchNormalization Cast Ceil Clip Concat Conv
ConvTranspose Cos CumSum DepthToSpace DequantizeLinear Div Einsum Elu Equal Exp Expand Flatten Floor
Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalMaxPool Greater GreaterOrEqual
GridSample HardSigmoid HardSwish Identity InstanceNormalization LayerNormalization LeakyRelu Less
LessOrEqual Log LogSoftmax LpNormalization LRN MatMul Max MaxPool Mean Min Mod Mul Neg Not OneHot Or
Pad Pow PRelu QuantizeLinear Reciprocal ReduceL2 ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
Relu Reshape Resize Round ScatterElements ScatterND Sigmoid Sign Sin Slice Softmax SpaceToDepth
Split Sqrt Squeeze Sub Sum Tanh Tile TopK Transpose Unsqueeze Where Xor
SimplifiedLayerNormalization
""".split())
HTP_MS_OPS = frozenset({"Gelu", "QuickGelu", "MatMulNBits", "SkipSimplifiedLayerNormalization"})
MAX_RANK = 5
DATA_MOVEMENT = {"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Flatten", "Gather", "Concat",
                 "Split", "Slice", "Identity", "Expand", "Tile"}
# (op, input index) that must be a constant
CONST_OPERANDS = {("Clip", 1), ("Clip", 2), ("Reshape", 1), ("Slice", 1), ("Slice", 2),
                  ("Slice", 3), ("Slice", 4), ("Split", 1), ("Tile", 1), ("Expand", 1),
                  ("Unsqueeze", 1), ("Squeeze", 1), ("ReduceMean", 1), ("ReduceMax", 1),
                  ("ReduceSum", 1), ("ReduceMin", 1)}
BLOCK_MULTIPLE = {4: 8, 8: 4, 2: 16}
FP16_ARCH = 73  # the first HTP generation with a float16 unit


@dataclasses.dataclass(frozen=True)
class Issue:
    """One node the HTP will not take (severity "error") or takes at a cost ("warning")."""

    node: str
    op: str
    kind: str  # op | shape | rank | scale | constant | dtype
    detail: str
    severity: str = "error"
    ir_op: str = ""
    origin: str = ""
    layer: str = ""
    role: str = ""

    def line(self) -> str:
        where = ", ".join(x for x in (
            f"IR {self.ir_op}" if self.ir_op else "",
            f"role {self.role!r}" if self.role else "",
            f"layer {self.layer}" if self.layer else "",
            f"made by {self.origin!r}" if self.origin else "") if x)
        return f"{self.severity}: {self.op} node {self.node!r} [{self.kind}] {self.detail}" + (
            f" ({where})" if where else "")


@dataclasses.dataclass
class Report:
    """The pre-flight verdict on one graph: its issues and op counts."""

    graph: str
    nodes: int
    issues: list[Issue]
    ops: dict[str, int]

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict[str, Any]:
        return {"graph": self.graph, "nodes": self.nodes, "ok": self.ok,
                "errors": len(self.errors), "warnings": len(self.issues) - len(self.errors),
                "issues": [dataclasses.asdict(i) for i in self.issues], "ops": self.ops}

    def text(self) -> str:
        head = (f"pre-flight {self.graph}: {self.nodes} nodes, {len(self.errors)} the HTP will not "
                f"take, {len(self.issues) - len(self.errors)} warnings")
        return "\n".join([head, *("  " + i.line() for i in self.issues)])


class PreflightError(InputError):
    """The graph holds nodes the HTP will not take. The message is one line (the count and the
    first node); `report_text` and `report_json` are the whole report, and `report_path` where
    the JSON was written, if it was."""

    def __init__(self, reports: list[Report], report_path: str | None = None):
        self.reports = reports
        self.report_json, self.report_text = write(reports)
        self.report_path = report_path
        bad = [i for r in reports for i in r.errors]
        first = bad[0].line() if bad else "?"
        where = f"; report: {report_path}" if report_path else ""
        super().__init__(f"the NPU (HTP) will not take {len(bad)} node(s) and CPU fallback is "
                         f"off; first: {first}{where}")


def _meta(node: onnx.NodeProto) -> dict[str, str]:
    return {p.key: p.value for p in node.metadata_props}


def _infer(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Types and shapes of every tensor. SimplifiedLayerNormalization (an ONNX Runtime op in the
    default domain) is read as LayerNormalization for inference: the same shape rule."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in m.graph.node:
        if n.op_type == "SimplifiedLayerNormalization" and n.domain in ("", "ai.onnx"):
            n.op_type = "LayerNormalization"
            del n.output[1:]
    m = onnx.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)
    g = m.graph
    types = {v.name: v.type for v in [*g.input, *g.output, *g.value_info]}
    for t in g.initializer:
        tp = onnx.helper.make_tensor_type_proto(t.data_type, list(t.dims))
        types[t.name] = tp
    return types


def _dims(tp: onnx.TypeProto | None) -> list[Any] | None:
    if tp is None or not tp.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in tp.tensor_type.shape.dim]


def check(model: onnx.ModelProto, *, name: str = "graph", act_bits: int = 16,
          htp_arch: str = "75", quantized: bool = True) -> Report:
    """Every node of `model` (a QDQ graph) the HTP will not take; see the module docstring.
    quantized=False checks a float graph before QDQ is inserted: everything but the dtype and
    mixed-type rules, which only the QDQ form decides (a cheap first pass that fails before
    calibration)."""
    g = model.graph
    types = _infer(model)
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    graph_inputs = {i.name for i in g.input}
    issues: list[Issue] = []

    def add(node: onnx.NodeProto, kind: str, detail: str, severity: str = "error") -> None:
        meta = _meta(node)
        issues.append(Issue(node.name or node.output[0], node.op_type, kind, detail, severity,
                            meta.get("splice.op", ""), meta.get("splice.origin", ""),
                            meta.get("splice.layer", ""), meta.get("splice.role", "")))

    def is_const(x: str) -> bool:
        if x in inits:
            return True
        p = producer.get(x)
        return p is not None and (p.op_type == "Constant" or (
            p.op_type == "DequantizeLinear" and all(i in inits for i in p.input if i)))

    for node in g.node:
        op = node.op_type
        domain = node.domain or ""
        if domain in ("", "ai.onnx"):
            if op not in HTP_OPS:
                add(node, "op", f"{op} is not among the HTP's ops")
                continue
        elif domain == "com.microsoft":
            if op not in HTP_MS_OPS:
                add(node, "op", f"com.microsoft.{op} is not among the HTP's ops")
                continue
        else:
            add(node, "op", f"domain {domain!r} has no HTP implementation")
            continue
        for x in [*node.input, *node.output]:
            if not x:
                continue
            dims = _dims(types.get(x))
            if dims is None or any(not isinstance(d, int) or d <= 0 for d in dims):
                if dims is None and x in inits:
                    continue
                add(node, "shape", f"tensor {x!r} has shape {dims if dims is not None else '?'};"
                    " the HTP compiles static shapes only")
                break
            if len(dims) > MAX_RANK:
                add(node, "rank", f"tensor {x!r} has rank {len(dims)}; the HTP takes at most "
                    f"{MAX_RANK}")
                break
        for i, x in enumerate(node.input):
            if x and (op, i) in CONST_OPERANDS and not is_const(x):
                add(node, "constant", f"input {i} ({x!r}) is computed; the HTP needs it constant")
        if _meta(node).get("splice.op") == "quantize" and op not in ("QuantizeLinear",
                                                                     "DequantizeLinear"):
            add(node, "scale", "fake quantization computed in the graph (dynamic scales, or a "
                "grid QuantizeLinear cannot hold); the HTP takes static per-tensor QDQ only")
        if op in ("QuantizeLinear", "DequantizeLinear"):
            _check_qdq(node, inits, act_bits, add, producer)
        elif op not in DATA_MOVEMENT and quantized:
            _check_float(node, inits, types, producer, consumers, graph_inputs, htp_arch, add)
            _check_mixed(node, inits, producer, consumers, add)
    ops = dict(sorted(Counter(n.op_type for n in g.node).items(), key=lambda kv: -kv[1]))
    return Report(name, len(g.node), issues, ops)


def _check_qdq(node, inits, act_bits, add, producer) -> None:
    x, scale = node.input[0], node.input[1]
    zp = node.input[2] if len(node.input) > 2 else ""
    s = inits.get(scale)
    per_axis = s is not None and len(s.dims) > 0 and int(np.prod(s.dims)) > 1
    if x not in inits:
        if per_axis:
            add(node, "scale", f"per-channel quantization of activation {x!r} "
                f"({int(np.prod(s.dims))} scales); the HTP quantizes activations per tensor")
        return
    if node.op_type != "DequantizeLinear":
        return
    w = inits[x]
    bits = {TensorProto.INT4: 4, TensorProto.UINT4: 4, TensorProto.INT8: 8, TensorProto.UINT8: 8,
            TensorProto.INT16: 16, TensorProto.UINT16: 16}.get(w.data_type)
    if zp and zp in inits and per_axis:
        z = numpy_helper.to_array(inits[zp]).astype(np.int64)
        unsigned = w.data_type in (TensorProto.UINT4, TensorProto.UINT8, TensorProto.UINT16)
        mid = (1 << (bits - 1)) if unsigned and bits else 0
        if np.any(z != mid):
            add(node, "scale", f"weight {x!r} has nonzero zero points; the HTP takes symmetric "
                "per-channel weights")
    block = next((a.i for a in node.attribute if a.name == "block_size"), 0)
    if block:
        if bits in BLOCK_MULTIPLE and block % BLOCK_MULTIPLE[bits]:
            add(node, "scale", f"{bits}-bit weight {x!r} in blocks of {block}; the HTP tiles "
                f"blocks in multiples of {BLOCK_MULTIPLE[bits]}")
        if act_bits != 16:
            add(node, "scale", f"block-quantized weight {x!r} needs 16-bit activations; the graph "
                f"has {act_bits}-bit")


def _bits(tp: int) -> int:
    return {TensorProto.INT4: 4, TensorProto.UINT4: 4, TensorProto.INT8: 8, TensorProto.UINT8: 8,
            TensorProto.INT16: 16, TensorProto.UINT16: 16}.get(tp, 0)


def _check_mixed(node, inits, producer, consumers, add) -> None:
    """A compute op whose quantized activation inputs and outputs differ in type (an int8
    activation into a MatMul with a uint8 or uint16 result): the HTP has no such kernel."""
    def zp_bits(q: onnx.NodeProto) -> str:
        z = q.input[2] if len(q.input) > 2 else ""
        tp = inits[z].data_type if z in inits else TensorProto.UINT8
        return ("u" if tp in (TensorProto.UINT4, TensorProto.UINT8, TensorProto.UINT16) else
                "s") + f"int{_bits(tp)}"
    widths = {}
    for i, x in enumerate(node.input):
        p = producer.get(x)
        if p is not None and p.op_type == "DequantizeLinear" and p.input[0] not in inits:
            # MatMul's second operand may differ in sign (int16 keys against uint16 queries)
            widths[x] = zp_bits(p)[1:] if node.op_type == "MatMul" and i == 1 else zp_bits(p)
    for x in node.output:
        for c in consumers.get(x, []):
            if c.op_type == "QuantizeLinear":
                widths[x] = zp_bits(c)
    rhs = node.input[1] if node.op_type == "MatMul" and len(node.input) > 1 else ""
    if widths.get(rhs) == "int16" and zp_bits(producer[rhs]) == "uint16":
        add(node, "scale", f"computed second operand {rhs!r} on a uint16 grid: QNN requantizes it "
            "to 8 bits for the HTP's MatMul (measured 0.7% RMS on random data); a signed int16 "
            "symmetric grid is taken as it is", "warning")
    if node.op_type == "MatMul" and len(widths) == 3:
        first, second, out = widths.values()
        if first == out and first.endswith(second):
            return
    if len(set(widths.values())) > 1:
        desc = ", ".join(f"{k!r} {v}" for k, v in widths.items())
        add(node, "scale", f"mixed activation types ({desc}); the HTP wants one type per op")


def _check_float(node, inits, types, producer, consumers, graph_inputs, htp_arch, add) -> None:
    """A compute op whose float operands or results are not on a quantization grid."""
    def is_float(x: str) -> bool:
        tp = types.get(x)
        return tp is not None and tp.tensor_type.elem_type in (TensorProto.FLOAT,
                                                              TensorProto.DOUBLE)
    loose = [x for x in node.input if x and is_float(x) and x not in inits
             and (producer.get(x) is None or producer[x].op_type != "DequantizeLinear")]
    loose += [x for x in node.output if x and is_float(x) and not all(
        c.op_type == "QuantizeLinear" for c in consumers.get(x, [None]) if c is not None)]
    loose += [x for i, x in enumerate(node.input) if x in inits and is_float(x)
              and (node.op_type, i) not in CONST_OPERANDS]
    if not loose:
        return
    try:
        arch = int(htp_arch)
    except ValueError:
        arch = FP16_ARCH
    fp16 = arch >= FP16_ARCH
    add(node, "dtype", f"computes in float ({', '.join(repr(x) for x in loose[:3])} not "
        f"quantized); " + (f"HTP v{arch} runs it in float16" if fp16 else
                          f"HTP v{arch} has no float unit"), "warning" if fp16 else "error")


def write(reports: list[Report]) -> tuple[bytes, str]:
    """The reports as JSON bytes (for the artefact) and text (for the log / the error)."""
    data = json.dumps({"reports": [r.to_json() for r in reports]}, indent=2).encode()
    return data, "\n".join(r.text() for r in reports)
