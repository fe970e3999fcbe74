"""What every backend shares, defined once: the lowering error and how it names an IR node, the
decoder's I/O contract, the tokenizer files an artefact carries, and the manifest fields that
every artefact's manifest.json starts from.

The backends (onnx/, tvm/, npu/, and any new one) import this module and nothing of each other's
for these; the atomic writer that the fields go to is backends/artefact.py, and the format it
writes is runtime/manifest.py's.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np

from splice.errors import InputError
from splice.ir.core import Graph, Module, Node
from splice.ir.hadamard import hadamard_matrix, kronecker_factors

# where a tokenizer kind keeps the file the runtime reads
TOKENIZER_MAIN = {"hf": "tokenizer.json", "llama2c": "tokenizer.bin"}
# names the tokenizer files may not take: the manifest's, and the ONNX backend's external weights
# (a tokenizer file of that name would be overwritten by the weights' writer)
RESERVED_NAMES = ("manifest.json", "model.onnx.data")


class LoweringError(InputError):
    """The graph holds something a backend cannot express (an op without a rule, a non-constant
    operand where a constant is required, a graph that is not the canonical decoder)."""


def describe(node: Node) -> str:
    """How an error names an IR node: op, role, layer and the pass that made it."""
    where = f"role {node.role!r}" if node.role else "no role"
    layer = f", layer {node.layer}" if node.layer is not None else ""
    origin = f", made by {node.origin!r}" if node.origin else ""
    out = node.outputs[0].name if node.outputs else "?"
    return f"{node.op} node ({where}{layer}{origin}) -> %{out}"


def splice_version() -> str:
    """splice's installed version ("0" when run from a tree that is not installed)."""
    try:
        return version("splice")
    except PackageNotFoundError:
        return "0"


def decoder_io(graph: Graph) -> dict[str, Any]:
    """The decoder's I/O as the runtimes need it: names and the cache's per-layer shapes. Raises
    when the graph is not the canonical decoder (input_ids, position_ids, past.{i}.key/value in;
    logits, present.{i}.key/value out), because no runtime could drive it."""
    inputs = {v.name: v for v in graph.inputs}
    outputs = {v.name: v for v in graph.outputs}
    layers = sorted({int(n.split(".")[1]) for n in inputs if n.startswith("past.")})
    expected_in = {"input_ids", "position_ids"} | {f"past.{i}.{kv}" for i in layers
                                                   for kv in ("key", "value")}
    expected_out = {"logits"} | {f"present.{i}.{kv}" for i in layers for kv in ("key", "value")}
    if set(inputs) != expected_in or set(outputs) != expected_out or layers != list(
            range(len(layers))):
        raise LoweringError(
            "splice's runtimes drive decoder graphs: inputs input_ids, position_ids, "
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


def tokenizer_files(module: Module, files: dict[str, Any]) -> dict[str, Any] | None:
    """Add the module's tokenizer files to an artefact's `files` (name -> bytes) and return the
    manifest's tokenizer section (None when the module carries no tokenizer). Refuses a kind no
    runtime reads, a kind without its main file, and file names that are paths or clash with the
    artefact's own files."""
    tok = module.tokenizer
    if tok is None:
        return None
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
        if name in files or name in RESERVED_NAMES:
            raise InputError(f"tokenizer file name {name!r} clashes with the artefact's own")
        files[name] = bytes(data)
    return {"kind": tok.kind, "path": main, "files": sorted(tok.files)}


def manifest_fields(module: Module, *, backend: str, target: str, io: dict[str, Any],
                    tokenizer: dict[str, Any] | None, recipe: Any, report: Any,
                    created_by: str = "", **sections: Any) -> dict[str, Any]:
    """The manifest fields of an artefact, in the order every backend writes them: backend,
    target, created_by (splice's version, and `created_by` after it, such as "with TVM 0.27"),
    the model config, the decoder's io, the backend's own `sections` (its name -> its table), the
    tokenizer section, the recipe and the per-pass report as given."""
    made = f"splice {splice_version()}" + (f" {created_by}" if created_by else "")
    return {"backend": backend, "target": target, "created_by": made,
            "config": module.config.to_json(), "io": io, **sections, "tokenizer": tokenizer,
            "recipe": recipe, "report": report}


def hadamard_factors(width: int, *, max_factor: int = 64, split: str = "halves") -> list[int]:
    """The Kronecker factors a backend applies for the `hadamard` op's matrix of order `width`
    (splice.ir.hadamard.kronecker_factors; each backend picks its split), or a LoweringError."""
    factors = kronecker_factors(width, max_factor=max_factor, split=split)
    if factors is None:
        raise LoweringError(f"no Hadamard matrix of order {width}")
    return factors


def hadamard_signs(order: int) -> np.ndarray:
    """The +-1 matrix of `order` (float32) whose normalised form is hadamard_matrix(order)."""
    return np.rint(hadamard_matrix(order).numpy() * np.sqrt(order)).astype(np.float32)
