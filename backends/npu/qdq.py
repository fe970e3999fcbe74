"""Calibrate a static float ONNX graph and make it a full QDQ graph for the HTP.

The HTP computes in integers: every tensor between two ops must carry static quantization
parameters, expressed in ONNX as QuantizeLinear -> DequantizeLinear around the float op (the QDQ
form that ONNX Runtime's QNN EP turns into quantized QNN ops). This module

1. calibrates: runs the float graph on ONNX Runtime's CPU over calibration tokens, through the
   same chunked prefill/decode driver the runtime uses (runtime.npu_runtime.StaticDecoder), with
   every float intermediate exposed as an output, and keeps each tensor's running min and max
   (the prefill and decode graphs share tensor names, so one range serves both: the cache that
   prefill writes is read by decode on the same grid);
2. ties ranges that must share one grid: the input and output of data movement (Reshape,
   Transpose, Unsqueeze, Gather's data, Concat's inputs and output), so these ops move integers
   without requantizing. At 8 bits each layer's cache input is tied to the new keys/values written
   into it. At 16 bits keys and values, the MatMuls' computed second operands, are signed int16
   symmetric (a uint16 one QNN converts to uint8 before the HTP's MatMul: attention scores 2.6%
   RMS off the CPU on stories260K, 0.07% with int16), and so is the cache they are concatenated
   with; this step's keys and values leave their projection on its uint16 grid and are requantized
   onto the cache's (a DQ -> Q pair, a Convert on the HTP), so every op keeps one activation type;
3. inserts QDQ: activations asymmetric per tensor at `act_bits` (uint16, or uint8), Softmax's
   output on the fixed [0, 1] grid, MatMul weights symmetric per output channel at `weight_bits`
   (int8, or int4), other float constants (norm scales, rotary tables, scalars) per tensor like
   activations; Clip's bounds stay float (settings QNN reads). A tensor already quantized
   upstream (a qlinear's DequantizeLinear weights, or a static `quantize` node the IR's
   quantize_activations pass made) keeps its grid; at 8 bits a signed int8 one becomes the same
   grid in uint8, the type of the other activations.

Ranges are min/max (always including 0, as asymmetric integer grids must represent 0 exactly).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from splice.errors import InputError

log = logging.getLogger(__name__)

# float operands that are settings, not data: they stay float constants (QNN reads them)
SETTING_INPUTS = {("Clip", 1), ("Clip", 2)}
TIED_OPS = {"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Gather", "Concat", "Flatten"}
ACT_TYPES = {16: (TensorProto.UINT16, np.uint16, 65535), 8: (TensorProto.UINT8, np.uint8, 255)}
QDQ_ORIGIN = "npu.qdq"
DECODE_STEPS = 4


class Ranges:
    """Running min/max per tensor name."""

    def __init__(self) -> None:
        self.lo: dict[str, float] = {}
        self.hi: dict[str, float] = {}

    def update(self, name: str, arr: np.ndarray) -> None:
        if arr.size == 0:
            return
        lo, hi = float(np.min(arr)), float(np.max(arr))
        self.lo[name] = min(lo, self.lo.get(name, lo))
        self.hi[name] = max(hi, self.hi.get(name, hi))

    def __contains__(self, name: str) -> bool:
        return name in self.lo


def float_tensors(model: onnx.ModelProto) -> list[str]:
    """Names of the float tensors computed by nodes (the ones calibration observes)."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in
             [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]}
    out = []
    for node in model.graph.node:
        for o in node.output:
            if o and types.get(o, TensorProto.FLOAT) == TensorProto.FLOAT:
                out.append(o)
    return out


def _constant_tensors(model: onnx.ModelProto) -> set[str]:
    """Node outputs that depend on initializers only (no graph input)."""
    const = {t.name for t in model.graph.initializer} | {""}
    for n in model.graph.node:  # topological order
        if all(i in const for i in n.input):
            const.update(n.output)
    return const


def observing(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs `names`."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, None))
    return m


def calibrate(models: Mapping[int, onnx.ModelProto], io: Mapping,
              token_rows: Sequence[Sequence[int]], *, threads: int = 2,
              embed: Callable[[np.ndarray], np.ndarray] | None = None) -> Ranges:
    """Ranges of every float tensor of `models` (seq -> float graph) over `token_rows`: each row
    runs as a prompt from an empty cache (prefill chunks), and its last `DECODE_STEPS` tokens one
    by one through the decode graph (the same tensors at seq 1: a few steps per row cover them)."""
    import onnxruntime as ort

    from splice.runtime.npu_runtime import StaticDecoder

    ranges = Ranges()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    runs = {}
    graph_inputs = {}
    seen: set[int] = set()
    wanted = StaticDecoder(io, {}, embed).outputs
    for seq, model in models.items():
        names = float_tensors(model)
        sess = ort.InferenceSession(observing(model, names).SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        outs = [o.name for o in sess.get_outputs()]
        graph_inputs[seq] = [i.name for i in model.graph.input]
        # tensors computed from weights alone (dequantized tables) are the same every run: they
        # are observed on the first run only, not copied out of every one
        fixed = _constant_tensors(model)
        later = [o for o in outs if o not in fixed]

        def run(feeds, sess=sess, outs=outs, later=later, seq=seq):
            outs = outs if seq not in seen else later
            seen.add(seq)
            res = sess.run(outs, feeds)
            for name, arr in zip(outs, res):
                ranges.update(name, arr)
            for name in graph_inputs[seq]:
                if feeds[name].dtype == np.float32:
                    ranges.update(name, feeds[name])
            return [res[outs.index(n)] for n in wanted]
        runs[seq] = run
    dec = StaticDecoder(io, runs, embed)
    for row in token_rows:
        row = list(row)[: dec.context]
        cache = dec.empty()
        split = max(1, len(row) - DECODE_STEPS) if 1 in runs and len(row) > 1 else len(row)
        dec.forward(row[:split], cache)
        for t in row[split:]:
            dec.step([t], cache)
    return ranges


class _Tie:
    """Union-find over tensor names that must share quantization parameters."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, a: str) -> str:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def act_params(lo: float, hi: float, bits: int, symmetric: bool = False) -> tuple[float, int]:
    """(scale, zero point) of the unsigned grid covering [min(lo, 0), max(hi, 0)]: asymmetric, or
    symmetric about the middle code (zero point 2^(bits-1)) when `symmetric`."""
    qmax = ACT_TYPES[bits][2]
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        amax = max(-lo, hi)
        return (amax / (qmax // 2) if amax else 1.0), (qmax + 1) // 2
    scale = (hi - lo) / qmax
    if scale == 0.0:
        return 1.0, 0
    zp = int(np.clip(np.round(-lo / scale), 0, qmax))
    return float(scale), zp


def quantize_graph(model: onnx.ModelProto, ranges: Ranges, *, act_bits: int = 16,
                   weight_bits: int = 8, tied_inputs: Mapping[str, str] | None = None
                   ) -> onnx.ModelProto:
    """The QDQ form of the float static `model` with parameters from `ranges`. tied_inputs maps a
    graph input to the tensor whose grid it must share at 8 bits (a cache input -> its new
    keys)."""
    if act_bits not in ACT_TYPES:
        raise InputError(f"NPU activation bits {act_bits}; accepted: 16, 8")
    if weight_bits not in (8, 4):
        raise InputError(f"NPU weight bits {weight_bits}; accepted: 8, 4")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    float_inputs = {i.name for i in g.input if i.type.tensor_type.elem_type == TensorProto.FLOAT}
    # a tensor produced by DequantizeLinear is already on a grid; its input stays as it is
    done = {o for n in g.node if n.op_type == "DequantizeLinear" for o in n.output}
    if act_bits == 8:
        _unsigned_activations(g, inits)

    tie = _Tie()
    requant: list[tuple[onnx.NodeProto, int]] = []  # (Concat, input) moved onto its grid
    graph_inputs = {i.name for i in g.input}
    for n in g.node:
        if n.op_type in TIED_OPS:
            data = [n.input[0]] if n.op_type != "Concat" else list(n.input)
            for i, d in enumerate(data):
                if d in inits and inits[d].data_type != TensorProto.FLOAT:
                    continue
                if n.op_type == "Concat" and act_bits == 16 and d not in graph_inputs:
                    # the cache's grid (the graph input's) is the Concat's; a computed part
                    # (this step's keys, on its producer's grid) is requantized onto it, so the
                    # projection that made it keeps one activation type
                    requant.append((n, i))
                    continue
                tie.union(d, n.output[0])
    if act_bits != 16:  # at 16 bits the cache is int16 and this step's keys are requantized onto it
        for a, b in (tied_inputs or {}).items():
            tie.union(a, b)

    def value_range(name: str) -> tuple[float, float]:
        if name in inits:
            arr = numpy_helper.to_array(inits[name])
            return float(arr.min()), float(arr.max())
        if name in ranges:
            return ranges.lo[name], ranges.hi[name]
        raise InputError(f"NPU quantization: tensor {name!r} was never observed in calibration")

    # a computed second MatMul operand (keys, values) is signed symmetric int16 at 16 bits: with a
    # uint16 one (symmetric or not) the HTP's MatMul was 0.7% RMS off ONNX Runtime CPU on random
    # data and the attention scores 2.6%; with int16 it agrees to a step (measured, QNN 2.7, v75)
    rhs = {n.input[1] for n in g.node if n.op_type == "MatMul" and n.input[1] not in inits}
    groups: dict[str, list[str]] = {}
    wanted = _float_tensors_to_quantize(g, inits, float_inputs, done, producer)
    for name in wanted:
        groups.setdefault(tie.find(name), []).append(name)
    params: dict[str, tuple[float, int]] = {}
    int16: set[str] = set()  # tensors on a signed int16 grid (zero point 0)
    for members in groups.values():
        observed = [value_range(x) for x in members if x in inits or x in ranges]
        if not observed:
            raise InputError(f"NPU quantization: tensors {members[:3]} were never observed in "
                             "calibration")
        lo, hi = min(r[0] for r in observed), max(r[1] for r in observed)
        if any(producer.get(x) is not None and producer[x].op_type == "Softmax" for x in members):
            lo, hi = 0.0, 1.0
        signed = act_bits == 16 and any(x in rhs for x in members)
        p = act_params(lo, hi, act_bits, symmetric=signed)
        if signed:
            p = (p[0], 0)
        for x in members:
            params[x] = p
            if signed:
                int16.add(x)

    _, act_np, _ = ACT_TYPES[act_bits]
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    renamed: dict[str, str] = {}
    outputs = {o.name for o in g.output}
    weight_of = _matmul_weights(g, inits)

    def qdq(name: str, src: str, dst: str) -> None:
        s, z = params[name]
        npdt = np.int16 if name in int16 else act_np
        sn, zn = f"{name}/scale", f"{name}/zero"
        new_inits.append(numpy_helper.from_array(np.array(s, np.float32), sn))
        new_inits.append(numpy_helper.from_array(np.array(z, npdt), zn))
        q = helper.make_node("QuantizeLinear", [src, sn, zn], [f"{name}/q"], name=f"{name}/Q")
        d = helper.make_node("DequantizeLinear", [f"{name}/q", sn, zn], [dst], name=f"{name}/DQ")
        for node in (q, d):
            node.metadata_props.add(key="splice.origin", value=QDQ_ORIGIN)
        new_nodes.extend([q, d])

    for name in float_inputs & set(params):
        qdq(name, name, f"{name}/dq")
        renamed[name] = f"{name}/dq"
    order = []
    for n in g.node:
        order.append(n)
        for o in n.output:
            if o not in params:
                continue
            if o in outputs:  # the graph output keeps its name: the producer's result moves
                raw = f"{o}/f"
                n.output[list(n.output).index(o)] = raw
                tmp_nodes = len(new_nodes)
                qdq(o, raw, o)
                order.extend(new_nodes[tmp_nodes:])
                del new_nodes[tmp_nodes:]
            else:
                tmp_nodes = len(new_nodes)
                qdq(o, o, f"{o}/dq")
                order.extend(new_nodes[tmp_nodes:])
                del new_nodes[tmp_nodes:]
                renamed[o] = f"{o}/dq"
    for name, tensor in list(inits.items()):
        if tensor.data_type != TensorProto.FLOAT or not consumers.get(name):
            continue
        if all((c.op_type, list(c.input).index(name)) in SETTING_INPUTS for c in consumers[name]):
            continue
        if name in weight_of:
            dq = _weight_dq(name, numpy_helper.to_array(tensor), weight_bits, new_inits)
            new_nodes.append(dq)
            renamed[name] = dq.output[0]
        elif name in params:  # a float constant: stored as its codes on the grid
            sc, zp = params[name]
            npdt = np.int16 if name in int16 else act_np
            info = np.iinfo(npdt)
            arr = numpy_helper.to_array(tensor)
            codes = np.clip(np.round(arr / sc) + zp, info.min, info.max).astype(npdt)
            new_inits.append(numpy_helper.from_array(codes, f"{name}/c"))
            new_inits.append(numpy_helper.from_array(np.array(sc, np.float32), f"{name}/scale"))
            new_inits.append(numpy_helper.from_array(np.array(zp, npdt), f"{name}/zero"))
            d = helper.make_node("DequantizeLinear", [f"{name}/c", f"{name}/scale",
                                                      f"{name}/zero"], [f"{name}/dq"],
                                 name=f"{name}/DQ")
            d.metadata_props.add(key="splice.origin", value=QDQ_ORIGIN)
            new_nodes.append(d)
            renamed[name] = f"{name}/dq"
    skip = {id(x) for x in new_nodes} | {id(x) for x in order if x.name.endswith(("/Q", "/DQ"))
                                         and any(p.key == "splice.origin" and p.value == QDQ_ORIGIN
                                                 for p in x.metadata_props)}
    for n in order:
        if id(n) in skip:
            continue
        for i, x in enumerate(n.input):
            if (n.op_type, i) in SETTING_INPUTS:
                continue
            if x in renamed:
                n.input[i] = renamed[x]
    for n, i in requant:  # DQ(own grid) -> Q(Concat's grid) -> DQ: a Convert on the HTP
        target = n.output[0]
        x = n.input[i]
        s, z = params[target]
        npdt = np.int16 if target in int16 else act_np
        name = f"{x}/rq"
        new_inits.append(numpy_helper.from_array(np.array(s, np.float32), f"{name}/scale"))
        new_inits.append(numpy_helper.from_array(np.array(z, npdt), f"{name}/zero"))
        q = helper.make_node("QuantizeLinear", [x, f"{name}/scale", f"{name}/zero"], [f"{name}/q"],
                             name=f"{name}/Q")
        d = helper.make_node("DequantizeLinear", [f"{name}/q", f"{name}/scale", f"{name}/zero"],
                             [f"{name}/dq"], name=f"{name}/DQ")
        for node in (q, d):
            node.metadata_props.add(key="splice.origin", value=QDQ_ORIGIN)
        order.insert(next(k for k, m in enumerate(order) if m is n), q)
        order.insert(next(k for k, m in enumerate(order) if m is n), d)
        n.input[i] = f"{name}/dq"
    del g.node[:]
    g.node.extend(new_nodes + order)  # initializer DQs first: they read only constants
    used = {x for n in g.node for x in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)
    del g.value_info[:]  # types changed (int8 -> uint8 grids, new tensors): inferred afresh
    return m


def _unsigned_activations(g, inits) -> None:
    """Signed int8 activation QDQ (a symmetric static `quantize` node) as uint8 with zero point
    z + 128: the same grid and clipping range, in the type the other activations have (the HTP
    wants one activation type per op)."""
    pairs = {}
    for n in g.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 \
                and n.input[0] not in inits and n.input[2] in inits \
                and inits[n.input[2]].data_type == TensorProto.INT8:
            pairs.setdefault(n.input[2], []).append(n)
    for zname in pairs:
        z = numpy_helper.to_array(inits[zname]).astype(np.int16) + 128
        inits[zname].CopyFrom(numpy_helper.from_array(z.astype(np.uint8), zname))


def _float_tensors_to_quantize(g, inits, float_inputs, done, producer) -> list[str]:
    names = list(float_inputs)
    for n in g.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for o in n.output:
            if o and o not in done:
                names.append(o)
        for i, x in enumerate(n.input):
            if x in inits and inits[x].data_type == TensorProto.FLOAT \
                    and (n.op_type, i) not in SETTING_INPUTS:
                names.append(x)
    out, seen = [], set()
    for x in names:
        if x not in seen:
            seen.add(x)
            out.append(x)
    int_outputs = _int_tensors(g, inits)
    return [x for x in out if x not in int_outputs]


def _int_tensors(g, inits) -> set[str]:
    """Node outputs that are not float (shape arithmetic, casts to int): left unquantized."""
    m = helper.make_model(g)
    try:
        inferred = onnx.shape_inference.infer_shapes(m, strict_mode=False)
    except Exception:  # noqa: BLE001 - without inference every output is assumed float
        return set()
    return {vi.name for vi in [*inferred.graph.value_info, *inferred.graph.output]
            if vi.type.tensor_type.elem_type not in (TensorProto.FLOAT, 0)}


def _matmul_weights(g, inits) -> set[str]:
    """Float initializers read as a MatMul's second operand: the weights quantized per channel."""
    return {n.input[1] for n in g.node if n.op_type == "MatMul" and n.input[1] in inits
            and inits[n.input[1]].data_type == TensorProto.FLOAT
            and len(inits[n.input[1]].dims) == 2}


def symmetric_codes(w: np.ndarray, bits: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric integer codes (int8 storage) of w with one float32 scale per slice along the
    other axis: max |w| / qmax, 1 where a slice is all zero. The weights' grid and the host's
    embedding table share it, so a tied table's codes are the lm_head's."""
    qmax = (1 << (bits - 1)) - 1
    amax = np.abs(w).max(axis=axis)
    scale = np.where(amax == 0, 1.0, amax / qmax).astype(np.float32)
    codes = np.clip(np.round(w / np.expand_dims(scale, axis)), -qmax, qmax).astype(np.int8)
    return codes, scale


def _weight_dq(name: str, w: np.ndarray, bits: int, new_inits: list) -> onnx.NodeProto:
    """DequantizeLinear over symmetric per-output-channel integer codes of w [K, N]."""
    codes, scale = symmetric_codes(w, bits, axis=0)
    dtype = TensorProto.INT8 if bits == 8 else TensorProto.INT4
    qn, sn, zn = f"{name}/w{bits}", f"{name}/wscale", f"{name}/wzero"
    if bits == 8:
        new_inits.append(numpy_helper.from_array(codes, qn))
        new_inits.append(numpy_helper.from_array(np.zeros(w.shape[1], np.int8), zn))
    else:
        new_inits.append(helper.make_tensor(qn, dtype, codes.shape, codes.flatten().tolist()))
        new_inits.append(helper.make_tensor(zn, dtype, [w.shape[1]], [0] * w.shape[1]))
    new_inits.append(numpy_helper.from_array(scale, sn))
    node = helper.make_node("DequantizeLinear", [qn, sn, zn], [f"{name}/dq"], name=f"{name}/DQ",
                            axis=1)
    node.metadata_props.add(key="splice.origin", value=QDQ_ORIGIN)
    return node
