"""The ONNX backend's entry: an ir.Module -> an artefact directory that runtime.load runs.

The artefact holds model.onnx with its weights in model.onnx.data, the tokenizer files,
genai_config.json (so onnxruntime-genai runs it too) and a manifest that tells splice's runtime
everything it needs without the IR: the model config, the decoder's I/O names and KV-cache shapes,
the tokenizer's kind, and the ONNX Runtime session settings that pay on the target (intra-op
threads, graph optimisation level). The tokenizer files sit at the top level, beside
genai_config.json, because that is where onnxruntime-genai looks for tokenizer.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from splice.errors import InputError
from splice.ir.core import Module
from ..artefact import write_artefact
from ..common import decoder_io, manifest_fields, tokenizer_files
from .contrib import ATTENTION_MASK, OPS_MODES, rule_table
from .cuda import to_float16
from .genai import genai_config
from .lower import DATA_FILE, MODEL_FILE, OPSET, lower, save
from .quant import ACCURACY_LEVEL

TARGETS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}
# contrib ops on both: the CUDA provider has GroupQueryAttention, MatMulNBits and the fused norms
DEFAULT_OPS = {"cpu": "contrib", "cuda": "contrib"}
# compute dtype per target: the CUDA kernels' fast paths take float16 (cuda.py says which)
DEFAULT_DTYPE = {"cpu": "float32", "cuda": "float16"}
DTYPES = ("float32", "float16")
GENAI_FILE = "genai_config.json"


def export(module: Module, out_dir: str | Path, *, target: str = "cpu",
           recipe: dict | None = None, report: list | dict | None = None,
           threads: int = 2, graph_optimization: str = "all", ops: str | None = None,
           accuracy_level: int = ACCURACY_LEVEL, spinning: bool = True,
           dtype: str | None = None) -> Path:
    """Lower `module` to ONNX and write the artefact into `out_dir` (atomically; see
    backends.artefact). `recipe` and `report` are recorded in the manifest as given. `threads`
    and `graph_optimization` are the session defaults the runtime starts from. `ops`: "contrib"
    (ONNX Runtime's com.microsoft ops where faster: GroupQueryAttention, RotaryEmbedding,
    SkipSimplifiedLayerNormalization, MatMulNBits; the default for every target here) or
    "standard" (ONNX-domain ops only, for runtimes without them); `accuracy_level` is
    MatMulNBits' compute precision in contrib mode (4: int8, 0: float32). Both are recorded in
    the manifest's onnx section. `spinning`: whether ONNX Runtime's idle intra-op threads spin
    (its default; fastest on dedicated cores, slow on cores shared with other processes).
    `dtype`: the compute dtype, "float32" or "float16" (weights, activations and KV cache; the
    logits stay float32; cuda.py); default float16 for cuda, float32 for cpu."""
    if target not in TARGETS:
        raise InputError(f"ONNX backend: unknown target {target!r}; accepted: {', '.join(TARGETS)}")
    ops = DEFAULT_OPS[target] if ops is None else ops
    dtype = DEFAULT_DTYPE[target] if dtype is None else dtype
    if dtype not in DTYPES:
        raise InputError(f"ONNX backend: dtype={dtype!r}; accepted: {', '.join(DTYPES)}")
    if ops not in OPS_MODES:
        raise InputError(f"ONNX backend: ops={ops!r}; accepted: {', '.join(OPS_MODES)}")
    if not isinstance(threads, int) or threads < 1:
        raise InputError(f"ONNX backend: threads={threads!r}; expected a positive integer")
    if graph_optimization not in ("disable", "basic", "extended", "all"):
        raise InputError(f"ONNX backend: graph_optimization={graph_optimization!r}; accepted: "
                         "disable, basic, extended, all")
    io = decoder_io(module.graph)
    model = lower(module, rules=rule_table(ops, accuracy_level=accuracy_level))
    if dtype == "float16":
        to_float16(model)
    _cache_io(module, model, io)
    genai = genai_config(module, io, MODEL_FILE, threads=threads, spinning=spinning,
                         provider="cuda" if target == "cuda" else None)
    files: dict[str, Any] = {MODEL_FILE: lambda dest: save(model, dest.parent),
                             GENAI_FILE: json.dumps(genai, indent=2).encode()}
    tokenizer = tokenizer_files(module, files)
    fields = manifest_fields(
        module, backend="onnx", target=target, io=io, tokenizer=tokenizer, recipe=recipe,
        report=report,
        onnx={"model": MODEL_FILE, "external_data": DATA_FILE, "opset": OPSET,
              "dtype": dtype, "ops": ops,
              "accuracy_level": accuracy_level if ops == "contrib" else None},
        session={"providers": TARGETS[target], "intra_op_num_threads": threads,
                 "inter_op_num_threads": 1, "graph_optimization": graph_optimization,
                 "execution_mode": "sequential", "allow_spinning": bool(spinning)})
    return write_artefact(out_dir, files, fields)


def _cache_io(module: Module, model: Any, io: dict[str, Any]) -> None:
    """Record the attention_mask input GroupQueryAttention's lengths come from, and whether the
    cache can be one max-length buffer shared by past and present: only when every attention is
    a GQA (a standard-rule attention concatenates, so its present outgrows such a buffer)."""
    names = {v.name for v in model.graph.inputs}
    if ATTENTION_MASK in names:
        io["attention_mask"] = ATTENTION_MASK
    gqa = sum(n.op_type == "GroupQueryAttention" for n in model.graph)
    io["share_buffer"] = bool(gqa) and gqa == len(module.graph.find(op="attention"))
