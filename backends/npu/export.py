"""The NPU backend's entry: an ir.Module -> an artefact of static QDQ graphs compiled for the HTP.

Steps: lower to two static float graphs (prefill over `chunk` tokens, decode over 1; lower.py),
calibrate every activation on ONNX Runtime's CPU and insert QDQ (qdq.py), run the pre-flight on
both graphs (preflight.py; any node the HTP will not take fails the export with the report, since
nothing may fall back to the CPU in silence), then compile each graph on the HTP with CPU fallback
disabled and write its EPContext model (the QNN context binary) into the artefact, so the device
loads it without preparing the graph again. Each compiled graph must be one HTP partition.

The artefact holds, per graph, the QDQ source model (<name>.onnx, for inspection and for ONNX
Runtime CPU, which runs the same QDQ graph as a reference) and the EPContext model
(<name>.ctx.onnx plus its <name>.ctx_qnn.bin), the pre-flight report (preflight.json), the
tokenizer and a manifest whose `npu` section carries the figures an NPU user needs: partitions,
ops by type, weight bytes, activation bit-widths.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnx import external_data_helper, numpy_helper

from splice.errors import InputError
from splice.ir.core import Module
from ..artefact import write_artefact
from ..common import decoder_io, manifest_fields, tokenizer_files
from . import preflight
from .lower import EMBEDS, MASK, StaticShapes, lower_static
from .qdq import calibrate, quantize_graph, symmetric_codes

if TYPE_CHECKING:
    from splice.runtime.npu_runtime import HostTable

log = logging.getLogger(__name__)

TARGETS = ("npu",)
HTP_ARCHS = ("68", "69", "73", "75", "79", "81")
GRAPH_NAMES = {1: "decode"}
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
WEIGHTS_FILE = "weights.bin"  # the QDQ source graphs' initializers, each stored once
EXTERNAL_MIN_BYTES = 1024


def _graph_name(seq: int) -> str:
    return GRAPH_NAMES.get(seq, f"prefill{seq}")


def export(module: Module, out_dir: str | Path, *, target: str = "npu",
           calibration: Any = None, recipe: dict | None = None,
           report: list | dict | None = None, chunk: int = 64, context: int = 256,
           act_bits: int | None = None, weight_bits: int = 8, htp_arch: str = "75",
           mask_fill: float = -64.0) -> Path:
    """Lower, quantize, check and compile `module` for the HTP; write the artefact into `out_dir`
    (atomically). `calibration`: token rows ([n, len] tensor/array or a list of id lists) that set
    the static activation scales. `context` is clipped to the model's max_position. act_bits:
    16 or 8; None takes 8 when the module holds static 8-bit `quantize` nodes (a W8A8 recipe:
    their grids are kept, and the HTP wants one activation type), else 16. weight_bits (8 or 4)
    applies to float linears; qlinear weights keep their own codes. Raises
    preflight.PreflightError (an InputError) naming every node the HTP will not take."""
    if target not in TARGETS:
        raise InputError(f"NPU backend: unknown target {target!r}; accepted: {', '.join(TARGETS)}")
    if str(htp_arch) not in HTP_ARCHS:
        raise InputError(f"NPU backend: htp_arch {htp_arch!r}; accepted: {', '.join(HTP_ARCHS)}")
    context = min(int(context), module.config.max_position)
    if not (isinstance(chunk, int) and 1 <= chunk <= context):
        raise InputError(f"NPU backend: chunk={chunk!r}; expected an integer in 1..{context}")
    rows = _rows(calibration, context)
    if act_bits is None:
        act_bits = 8 if any(n.op == "quantize" and n.attrs["mode"] != "dynamic_per_token"
                            and n.attrs["bits"] == 8 for n in module.graph.nodes) else 16
    decoder_io(module.graph)  # the canonical decoder, or a clear error
    seqs = sorted({chunk, 1}, reverse=True)
    floats = {s: ir.serde.serialize_model(lower_static(module, StaticShapes(s, context,
                                                                             mask_fill)))
              for s in seqs}
    io = _io(floats[seqs[0]], chunk, context, mask_fill)
    early = [preflight.check(m, name=_graph_name(s), act_bits=act_bits, htp_arch=str(htp_arch),
                             quantized=False) for s, m in floats.items()]
    if not all(r.ok for r in early):  # what no quantization can fix: fail before calibrating
        raise preflight.PreflightError(early, _save_failed_report(out_dir,
                                                                  preflight.write(early)[0]))
    table = host_table(module) if "embedding" in io else None
    t0 = time.perf_counter()
    ranges = calibrate(floats, io, rows, embed=table)
    t_cal = time.perf_counter() - t0
    tied = {x[kv]: x[f"new_{kv}"] for x in io["layers"] for kv in ("key", "value")}
    qdq = {s: quantize_graph(m, ranges, act_bits=act_bits, weight_bits=weight_bits,
                             tied_inputs=tied) for s, m in floats.items()}
    reports = [preflight.check(m, name=_graph_name(s), act_bits=act_bits, htp_arch=str(htp_arch))
               for s, m in qdq.items()]
    report_json, report_text = preflight.write(reports)
    log.info("%s", report_text)
    if not all(r.ok for r in reports):
        raise preflight.PreflightError(reports, _save_failed_report(out_dir, report_json))
    with tempfile.TemporaryDirectory(prefix="splice-npu-") as tmp:
        tmp = Path(tmp)
        files: dict[str, Any] = {"preflight.json": report_json}
        graphs, figures = {}, {}
        files[WEIGHTS_FILE] = tmp / WEIGHTS_FILE
        extra, names = {}, None
        if table is not None:  # a tied table's codes are the lm_head's: stored once
            names = _shared_lm_head(table, qdq[min(qdq)])
            if names is None:
                names = ("embedding/codes", "embedding/scales")
                extra = dict(zip(names, (table.codes, table.scales)))
        offsets = save_sharing_weights({tmp / f"{_graph_name(s)}.onnx": m for s, m in qdq.items()},
                                       tmp / WEIGHTS_FILE, extra)
        if table is not None:
            io["embedding"].update(file=WEIGHTS_FILE, codes_offset=offsets[names[0]],
                                   scales_offset=offsets[names[1]],
                                   layout="rows" if extra else "columns")
        for s, m in qdq.items():
            name = _graph_name(s)
            src, ctx = tmp / f"{name}.onnx", tmp / f"{name}.ctx.onnx"
            t = time.perf_counter()
            _compile(src, ctx, str(htp_arch))
            compile_s = time.perf_counter() - t
            parts, others, ctx_files = _partitions(ctx)
            if parts != 1 or others:
                raise InputError(f"NPU backend: graph {name} compiled into {parts} HTP partitions "
                                 f"and {others} other nodes; a graph must be one HTP partition "
                                 "(the pre-flight missed a constraint: please report it)")
            files[src.name] = src
            files[ctx.name] = ctx
            for f in ctx_files:
                files[f] = tmp / f
            graphs[str(s)] = {"source": src.name, "context": ctx.name, "seq": s}
            figures[name] = _figures(m, parts, compile_s, [tmp / f for f in ctx_files])
        tokenizer = tokenizer_files(module, files)
        fields = manifest_fields(
            module, backend="npu", target=target, io=io, tokenizer=tokenizer, recipe=recipe,
            report=report,
            npu={"graphs": graphs, "htp_arch": str(htp_arch), "act_bits": act_bits,
                 "weight_bits": weight_bits, "chunk": chunk, "context": context,
                 "calibration_tokens": int(sum(len(r) for r in rows)),
                 "calibration_s": round(t_cal, 3), "figures": figures})
        return write_artefact(out_dir, files, fields)


def host_table(module: Module) -> HostTable:
    """The embedding table the runtime gathers from: int8 codes, symmetric, one scale per row
    (the lm_head's per-output-channel grid, so a tied table's codes are the lm_head's)."""
    from splice.runtime.npu_runtime import HostTable

    node = next(n for n in module.graph.nodes if n.op == "embedding")
    w = module.weight(node.inputs[1]).detach().to(torch.float32).numpy()
    return HostTable(*symmetric_codes(w, 8, axis=1))


def _shared_lm_head(table: HostTable, model: onnx.ModelProto) -> tuple[str, str] | None:
    """The names of the lm_head's int8 codes and scales in `model` when they are exactly the
    table's, transposed (a tied table): the host then reads its rows from them."""
    inits = {t.name: t for t in model.graph.initializer}
    rows, width = table.codes.shape
    for t in model.graph.initializer:
        if t.data_type != onnx.TensorProto.INT8 or list(t.dims) != [width, rows]:
            continue
        scale = inits.get(t.name.removesuffix("/w8") + "/wscale")
        if scale is not None and np.array_equal(numpy_helper.to_array(t).T, table.codes) \
                and np.array_equal(numpy_helper.to_array(scale), table.scales):
            return t.name, scale.name
    return None


def save_sharing_weights(models: Mapping[Path, onnx.ModelProto], weights: Path,
                         extra: Mapping[str, np.ndarray] | None = None) -> dict[str, int]:
    """Save each model at its path with its large initializers in one external file, `weights`
    (beside them): an initializer the graphs share (same name, same bytes: the prefill and
    decode graphs read the same weights) is written once and every graph points at it. The
    models' initializers are changed in place into references to that file. `extra` arrays
    (name -> array) are written first. Returns each name's offset in the file."""
    at: dict[tuple[str, bytes], tuple[int, int]] = {}
    offsets: dict[str, int] = {}
    with open(weights, "wb") as f:
        for name, arr in (extra or {}).items():
            f.seek(-f.tell() % 4096, 1)
            offsets[name] = f.tell()
            f.write(np.ascontiguousarray(arr).tobytes())
        for path, model in models.items():
            for t in model.graph.initializer:
                if not t.HasField("raw_data") or len(t.raw_data) < EXTERNAL_MIN_BYTES:
                    continue
                key = (t.name, hashlib.sha256(t.raw_data).digest())
                if key not in at:
                    f.seek(-f.tell() % 4096, 1)  # page-aligned: ONNX Runtime can map it
                    at[key] = (f.tell(), len(t.raw_data))
                    offsets.setdefault(t.name, f.tell())
                    f.write(t.raw_data)
                offset, length = at[key]
                external_data_helper.set_external_data(t, weights.name, offset, length)
                t.ClearField("raw_data")
                t.data_location = onnx.TensorProto.EXTERNAL
            onnx.save(model, str(path))
    return offsets


def _save_failed_report(out_dir: str | Path, data: bytes) -> str | None:
    """A failed pre-flight leaves no artefact; its JSON report goes beside where it would have
    been (<out>.preflight.json, written to a temporary name and renamed)."""
    out = Path(out_dir).absolute()
    dest = out.parent / f"{out.name}.preflight.json"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(dest)
    except OSError as e:
        log.warning("could not write the pre-flight report %s: %s", dest, e)
        return None
    return str(dest)


def _rows(calibration: Any, context: int) -> list[list[int]]:
    if calibration is None:
        raise InputError("the NPU backend needs calibration tokens for its static activation "
                         "scales: pass calibration= (token rows or text) or --calib FILE")
    arr = calibration.detach().cpu().numpy() if hasattr(calibration, "detach") else calibration
    if isinstance(arr, np.ndarray):
        arr = arr.reshape(1, -1) if arr.ndim == 1 else arr
        rows = [list(map(int, r)) for r in arr]
    else:
        rows = [list(map(int, r)) for r in calibration]
    rows = [r[:context] for r in rows if r]
    if not rows:
        raise InputError("NPU backend: calibration holds no tokens")
    return rows


def _io(model: onnx.ModelProto, chunk: int, context: int, mask_fill: float) -> dict[str, Any]:
    inputs = {i.name: i for i in model.graph.input}
    layers = []
    i = 0
    while f"past.{i}.key" in inputs:
        dims = [d.dim_value for d in inputs[f"past.{i}.key"].type.tensor_type.shape.dim]
        layers.append({"key": f"past.{i}.key", "value": f"past.{i}.value",
                       "new_key": f"new.{i}.key", "new_value": f"new.{i}.value",
                       "kv_heads": dims[1], "head_dim": dims[3]})
        i += 1
    windows = sorted(int(n.split(".w")[1]) if ".w" in n else 0 for n in inputs
                     if n.startswith(MASK))
    io = {"chunk": chunk, "context": context, "mask_fill": mask_fill, "mask_windows": windows,
          "layers": layers}
    if EMBEDS in inputs:  # the host gathers the rows (the file and offsets come when written)
        dims = [d.dim_value for d in inputs[EMBEDS].type.tensor_type.shape.dim]
        logits = next(o for o in model.graph.output if o.name == "logits")
        rows = logits.type.tensor_type.shape.dim[-1].dim_value
        io["embedding"] = {"rows": rows, "width": dims[-1]}
    return io


def _compile(src: Path, ctx: Path, arch: str) -> None:
    from splice.runtime.npu_runtime import htp_session

    try:
        htp_session(src, htp_arch=arch, context_file=ctx)
    except InputError:
        raise
    except Exception as e:  # onnxruntime raises its own types
        raise InputError(f"NPU backend: the HTP refused {src.name} although the pre-flight "
                         f"passed it: {str(e).strip()[-400:]}") from None


def _partitions(ctx: Path) -> tuple[int, int, list[str]]:
    """(EPContext nodes, other nodes, the binary files they reference) of an EPContext model."""
    m = onnx.load(str(ctx), load_external_data=False)
    parts = [n for n in m.graph.node if n.op_type == "EPContext"]
    files = []
    for n in parts:
        attrs = {a.name: a for a in n.attribute}
        if attrs.get("embed_mode") is not None and attrs["embed_mode"].i == 0:
            files.append(attrs["ep_cache_context"].s.decode())
    return len(parts), len(m.graph.node) - len(parts), sorted(set(files))


def _figures(m: onnx.ModelProto, partitions: int, compile_s: float,
             binaries: Sequence[Path]) -> dict[str, Any]:
    """Ops by type, weight bytes by element type, activation bit-widths of one QDQ graph."""
    ops = Counter(n.op_type for n in m.graph.node)
    weight_bytes: Counter = Counter()
    for t in m.graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}.get(
            t.data_type, np.dtype(dtype).itemsize * 8)
        weight_bytes[onnx.TensorProto.DataType.Name(t.data_type).lower()] += (n * bits + 7) // 8
    zero_types = {t.name: t.data_type for t in m.graph.initializer}
    act = Counter()
    for n in m.graph.node:
        if n.op_type == "QuantizeLinear" and len(n.input) > 2:
            act[onnx.TensorProto.DataType.Name(zero_types.get(n.input[2], 0)).lower()] += 1
    compute = {k: v for k, v in sorted(ops.items(), key=lambda kv: -kv[1]) if k not in QDQ_OPS}
    return {"partitions": partitions, "nodes": len(m.graph.node), "compute_ops": compute,
            "qdq_ops": {k: ops[k] for k in QDQ_OPS if k in ops},
            "weight_bytes": dict(weight_bytes), "weight_bytes_total": sum(weight_bytes.values()),
            "activation_types": dict(act), "context_binary_bytes": sum(
                p.stat().st_size for p in binaries if p.exists()),
            "compile_s": round(compile_s, 3)}
