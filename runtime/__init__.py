"""Run an artefact: `load(path)` checks it and returns an `Artefact` with `logits()`,
`generate()`, `generate_ids()` and `stream()`. numpy, the backend's runtime (onnxruntime, or TVM's
for a TVM artefact) and tokenizers only (no torch), so an edge device needs nothing else.

The layout: generation.py (the backend-neutral `Artefact`: sampling, prompt lookup, streaming,
stats), one module per backend (onnx_runtime.py, tvm_runtime.py, npu_runtime.py), opening.py (the
checks every runtime makes before it opens an artefact) and loader.py (`load`: the checked open
that dispatches on the manifest's backend)."""

from pathlib import Path
from typing import Any

from splice.errors import ArtefactError, InputError
from .generation import Artefact, Generation
from .loader import open_artefact
from .manifest import read_manifest, verify_artefact
from .sampling import Sampling
from .tokenizer import load_tokenizer

__all__ = ["Artefact", "ArtefactError", "Generation", "InputError", "KVCache", "Sampling", "load",
           "load_tokenizer", "read_manifest", "verify_artefact"]


def load(path: str | Path, **options: Any) -> Artefact:
    """Check and open the artefact at `path` with the runtime its manifest names: "onnx"
    (runtime/onnx_runtime.py: expected_manifest_sha256, providers, graph_optimization, threads,
    spinning) or "tvm" (runtime/tvm_runtime.py: expected_manifest_sha256, threads, device) or
    "npu" (runtime/npu_runtime.py: expected_manifest_sha256, htp_arch, source). An option given
    as None counts as not given."""
    return open_artefact(path, **options)


def __getattr__(name: str) -> Any:
    # the ONNX runtime's cache type, imported on first use so that `import splice.runtime` does
    # not need onnxruntime where only another backend's artefacts run
    if name == "KVCache":
        from .onnx_runtime import KVCache

        return KVCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
