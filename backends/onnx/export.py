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
from splice.ir.core import Graph, Module
from ..artefact import write_artefact
from .genai import genai_config
from .contrib import ATTENTION_MASK, OPS_MODES, rule_table
from .quant import ACCURACY_LEVEL
from .lower import DATA_FILE, MODEL_FILE, OPSET, LoweringError, lower, save, splice_version

TARGETS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}
# contrib ops on both: the CUDA provider has GroupQueryAttention, MatMulNBits and the fused norms
DEFAULT_OPS = {"cpu": "contrib", "cuda": "contrib"}
# where a tokenizer kind keeps the file the runtime reads
TOKENIZER_MAIN = {"hf": "tokenizer.json", "llama2c": "tokenizer.bin"}
GENAI_FILE = "genai_config.json"


def export(module: Module, out_dir: str | Path, *, target: str = "cpu",
           recipe: dict | None = None, report: list | dict | None = None,
           threads: int = 2, graph_optimization: str = "all", ops: str | None = None,
           accuracy_level: int = ACCURACY_LEVEL, spinning: bool = True) -> Path:
    """Lower `module` to ONNX and write the artefact into `out_dir` (atomically; see
    backends.artefact). `recipe` and `report` are recorded in the manifest as given. `threads`
    and `graph_optimization` are the session defaults the runtime starts from. `ops`: "contrib"
    (ONNX Runtime's com.microsoft ops where faster: GroupQueryAttention, RotaryEmbedding,
    SkipSimplifiedLayerNormalization, MatMulNBits; the default for every target here) or
    "standard" (ONNX-domain ops only, for runtimes without them); `accuracy_level` is
    MatMulNBits' compute precision in contrib mode (4: int8, 0: float32). Both are recorded in
    the manifest's onnx section. `spinning`: whether ONNX Runtime's idle intra-op threads spin
    (its default; fastest on dedicated cores, slow on cores shared with other processes)."""
    if target not in TARGETS:
        raise InputError(f"ONNX backend: unknown target {target!r}; accepted: {', '.join(TARGETS)}")
    ops = DEFAULT_OPS[target] if ops is None else ops
    if ops not in OPS_MODES:
        raise InputError(f"ONNX backend: ops={ops!r}; accepted: {', '.join(OPS_MODES)}")
    if not isinstance(threads, int) or threads < 1:
        raise InputError(f"ONNX backend: threads={threads!r}; expected a positive integer")
    if graph_optimization not in ("disable", "basic", "extended", "all"):
        raise InputError(f"ONNX backend: graph_optimization={graph_optimization!r}; accepted: "
                         "disable, basic, extended, all")
    io = decoder_io(module.graph)
    model = lower(module, rules=rule_table(ops, accuracy_level=accuracy_level))
    _cache_io(module, model, io)
    genai = genai_config(module, io, MODEL_FILE, threads=threads, spinning=spinning)
    files: dict[str, Any] = {MODEL_FILE: lambda dest: save(model, dest.parent),
                             GENAI_FILE: json.dumps(genai, indent=2).encode()}
    tokenizer = None
    if module.tokenizer is not None:
        tokenizer = _tokenizer_files(module, files)
    fields = {
        "backend": "onnx",
        "target": target,
        "created_by": f"splice {splice_version()}",
        "config": module.config.to_json(),
        "io": io,
        "onnx": {"model": MODEL_FILE, "external_data": DATA_FILE, "opset": OPSET,
                 "dtype": "float32", "ops": ops,
                 "accuracy_level": accuracy_level if ops == "contrib" else None},
        "session": {"providers": TARGETS[target], "intra_op_num_threads": threads,
                    "inter_op_num_threads": 1, "graph_optimization": graph_optimization,
                    "execution_mode": "sequential", "allow_spinning": bool(spinning)},
        "tokenizer": tokenizer,
        "recipe": recipe,
        "report": report,
    }
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


def _tokenizer_files(module: Module, files: dict[str, Any]) -> dict[str, Any]:
    tok = module.tokenizer
    main = TOKENIZER_MAIN.get(tok.kind)
    if main is None:
        raise InputError(f"tokenizer kind {tok.kind!r} has no runtime; accepted: "
                         f"{', '.join(TOKENIZER_MAIN)}")
    if main not in tok.files:
        raise InputError(f"{tok.kind} tokenizer carries {sorted(tok.files)}; the runtime needs "
                         f"{main!r}")
    for name, data in tok.files.items():
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise InputError(f"tokenizer file name {name!r}: expected a plain file name")
        if name in files or name in (DATA_FILE, "manifest.json"):
            raise InputError(f"tokenizer file name {name!r} clashes with the artefact's own")
        files[name] = bytes(data)
    return {"kind": tok.kind, "path": main, "files": sorted(tok.files)}


def decoder_io(graph: Graph) -> dict[str, Any]:
    """The decoder's I/O as the runtime needs it: names and the cache's per-layer shapes. Raises
    when the graph is not the canonical decoder (input_ids, position_ids, past.{i}.key/value in;
    logits, present.{i}.key/value out), because the runtime could not drive it."""
    inputs = {v.name: v for v in graph.inputs}
    outputs = {v.name: v for v in graph.outputs}
    layers = sorted({int(n.split(".")[1]) for n in inputs if n.startswith("past.")})
    expected_in = {"input_ids", "position_ids"} | {f"past.{i}.{kv}" for i in layers
                                                   for kv in ("key", "value")}
    expected_out = {"logits"} | {f"present.{i}.{kv}" for i in layers for kv in ("key", "value")}
    if set(inputs) != expected_in or set(outputs) != expected_out or layers != list(
            range(len(layers))):
        raise LoweringError(
            "the ONNX runtime drives decoder graphs: inputs input_ids, position_ids, "
            "past.{i}.key, past.{i}.value and outputs logits, present.{i}.key, present.{i}.value "
            f"(i = 0..L-1); this graph has inputs {sorted(inputs)} and outputs {sorted(outputs)}")
    past = []
    for i in layers:
        k = inputs[f"past.{i}.key"]
        if len(k.shape) != 4 or not isinstance(k.shape[1], int) or not isinstance(k.shape[3], int):
            raise LoweringError(f"past.{i}.key has shape {list(k.shape)}; expected [batch, "
                                "kv_heads, past, head_dim] with fixed kv_heads and head_dim")
        past.append({"key": f"past.{i}.key", "value": f"past.{i}.value",
                     "present_key": f"present.{i}.key", "present_value": f"present.{i}.value",
                     "kv_heads": k.shape[1], "head_dim": k.shape[3]})
    return {"input_ids": "input_ids", "position_ids": "position_ids", "logits": "logits",
            "num_layers": len(layers), "past": past}
