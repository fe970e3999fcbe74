"""The gguf backend's entry: an ir.Module -> an artefact directory holding a GGUF file that stock
llama.cpp loads.

Each weight is written in the llama.cpp type that holds exactly what splice's passes computed:
- a float weight as F32 (or F16 with float_type = "f16"; norms always F32, as llama.cpp wants);
- a 4-bit symmetric qlinear/qembedding in groups of 32 as Q4_0 (splice's signed-max grid is
  Q4_0's), a 4-bit one with float zero points (the min-max grid) as Q4_1, an 8-bit symmetric one
  as Q8_0 (code - 128 as int8).
The block scales must be float16 values (quantize_weights scale_dtype = "float16" rounds them
before choosing codes), so the codes llama.cpp reads are the codes the quantizer optimised; any
other quantized format is refused with the setting that fits. The graph must be llama.cpp's
llama graph (backends/gguf/llama.py); the tokenizer goes into the file's metadata
(backends/gguf/vocab.py) and its own files into the artefact for splice's runtime.

The artefact: model.gguf, the tokenizer files, manifest.json with the sha256 of each (written
atomically by backends.artefact). runtime/gguf_runtime.py runs it through llama-cpp-python.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from splice.errors import InputError
from splice.ir import quant
from splice.ir.core import Module, Node
from ..artefact import write_artefact
from ..common import decoder_io, manifest_fields, tokenizer_files
from . import blocks
from .llama import Entry, llama_layout
from .vocab import tokenizer_metadata

log = logging.getLogger(__name__)

MODEL_FILE = "model.gguf"
TARGETS = ("cpu",)
FLOAT_TYPES = ("f32", "f16")
KV_TYPES = ("f32", "f16")
FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7}
FITS = ("Q4_0: quantize_weights bits = 4, symmetric = true, group_size = 32, scale_dtype = "
        "'float16'; Q4_1: bits = 4, float_zero_points = true, group_size = 32, scale_dtype = "
        "'float16'; Q8_0: bits = 8, symmetric = true, group_size = 32, scale_dtype = 'float16'")


def export(module: Module, out_dir: str | Path, *, target: str = "cpu",
           recipe: dict | None = None, report: list | dict | None = None,
           float_type: str = "f32", threads: int = 2, kv_type: str = "f32") -> Path:
    """Write `module` as a GGUF artefact into `out_dir` (atomically). float_type: how float
    weights are stored ("f32" or "f16"). threads and kv_type ("f32" or "f16", llama.cpp's
    KV-cache type) are the runtime's defaults, recorded in the manifest."""
    if target not in TARGETS:
        raise InputError(f"gguf backend: unknown target {target!r}; accepted: {', '.join(TARGETS)}")
    if float_type not in FLOAT_TYPES:
        raise InputError(f"gguf backend: float_type={float_type!r}; accepted: "
                         f"{', '.join(FLOAT_TYPES)}")
    if kv_type not in KV_TYPES:
        raise InputError(f"gguf backend: kv_type={kv_type!r}; accepted: {', '.join(KV_TYPES)}")
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise InputError(f"gguf backend: threads={threads!r}; expected a positive integer")
    layout = llama_layout(module)
    tok_keys, tok_source = tokenizer_metadata(module)
    tensors = [(e.name, *encode(module, e, float_type)) for e in layout.tensors]
    types = Counter(kind for _, _, kind in tensors)

    def write(dest: Path) -> None:
        write_gguf(dest, module, layout, tok_keys, tensors)

    files: dict[str, Any] = {MODEL_FILE: write}
    tokenizer = tokenizer_files(module, files)
    fields = manifest_fields(
        module, backend="gguf", target=target, io=decoder_io(module.graph), tokenizer=tokenizer,
        recipe=recipe, report=report, created_by=f"with gguf {_gguf_version()}",
        gguf={"file": MODEL_FILE, "arch": layout.arch, "tied_embeddings": layout.tied,
              "types": dict(sorted(types.items())),
              "tensors": {name: kind for name, _, kind in tensors},
              "tokenizer_metadata": tok_source},
        runtime={"threads": threads, "kv_type": kv_type})
    return write_artefact(out_dir, files, fields)


def _gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")


def encode(module: Module, entry: Entry, float_type: str = "f32") -> tuple[np.ndarray, str]:
    """The tensor's data for the GGUF writer (float rows, or block bytes [N, K/32 * block]) and
    its llama.cpp type name."""
    if entry.node is None:  # a norm weight
        return entry.array, "F32"
    node = entry.node
    rows = entry.rows
    if node.op in ("linear", "embedding"):
        w = module.weight(node.inputs[1]).detach().to("cpu").float().numpy()
        if rows is not None:
            w = w[rows]
        if float_type == "f16":
            return np.ascontiguousarray(w.astype(np.float16)), "F16"
        return np.ascontiguousarray(w, dtype=np.float32), "F32"
    return _quantized(module, node, rows, entry.name)


def _quantized(module: Module, node: Node, rows: np.ndarray | None,
               name: str) -> tuple[np.ndarray, str]:
    a = node.attrs
    bits, group, sym = a["bits"], a["group_size"], a["symmetric"]
    k = a["in_features"] if node.op == "qlinear" else a["embedding_dim"]
    what = f"{name} (%{node.output.name})"
    if group != blocks.QK:
        raise InputError(f"{what}: {bits}-bit groups of {group}; llama.cpp's block types hold "
                         f"groups of {blocks.QK}. What fits: {FITS}")
    packed = module.weight(node.inputs[1])
    codes = quant.unpack_weight(packed, bits, group, k).numpy()
    scales = module.weight(node.inputs[2]).detach().float().numpy()
    zp = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3] is not None else None
    zeros = None
    if zp is not None:
        z = module.weight(zp)
        zeros = z.float().numpy() if z.is_floating_point() else \
            quant.unpack_zero_points(z, bits, scales.shape[1]).numpy().astype(np.float32)
    if rows is not None:
        codes, scales = codes[rows], scales[rows]
        zeros = None if zeros is None else zeros[rows]
    if bits == 4 and sym:
        return blocks.pack_q4_0(codes, scales, what), "Q4_0"
    if bits == 4:
        return blocks.pack_q4_1(codes, scales, zeros, what), "Q4_1"
    if bits == 8 and sym:
        return blocks.pack_q8_0(codes.astype(np.int16) - 128, scales, what), "Q8_0"
    raise InputError(f"{what}: asymmetric 8-bit weights have no llama.cpp type. What fits: {FITS}")


def write_gguf(dest: Path, module: Module, layout, tok_keys: dict[str, Any],
               tensors: list[tuple[str, np.ndarray, str]]) -> None:
    """The GGUF file itself, through the gguf package's writer."""
    import gguf

    w = gguf.GGUFWriter(str(dest), layout.arch)
    w.add_name(module.config.architecture or "splice")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    two_d = Counter(kind for name, _, kind in tensors if not name.endswith("norm.weight"))
    w.add_file_type(FILE_TYPE[two_d.most_common(1)[0][0]])
    for key, value in layout.metadata.items():
        full = f"{layout.arch}.{key}"
        if isinstance(value, float):
            w.add_float32(full, value)
        else:
            w.add_uint32(full, value)
    for key, (value, vtype, sub) in tok_keys.items():
        w.add_key_value(key, value, vtype, sub_type=sub)
    for name, data, kind in tensors:
        if kind in blocks.BLOCK_BYTES:
            w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[kind])
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    log.info("wrote %s: %d tensors", dest, len(tensors))
