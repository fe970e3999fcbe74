"""Run an artefact: `load(path)` checks it and returns an `Artefact` with `logits()`,
`generate()`, `generate_ids()` and `stream()`. numpy, the backend's runtime (onnxruntime, or TVM's
for a TVM artefact) and tokenizers only (no torch), so an edge device needs nothing else."""

from pathlib import Path
from typing import Any

from splice.errors import ArtefactError, InputError
from .artefact import Artefact, Generation, KVCache
from .artefact import load as _load_onnx
from .manifest import read_manifest, verify_artefact
from .sampling import Sampling
from .tokenizer import load_tokenizer

__all__ = ["Artefact", "ArtefactError", "Generation", "InputError", "KVCache", "Sampling", "load",
           "load_tokenizer", "read_manifest", "verify_artefact"]

# load options of the runtimes other than ONNX Runtime's, by the manifest's backend
OPTIONS = {"npu": ("an NPU", ("expected_manifest_sha256", "htp_arch", "source")),
           "tvm": ("a TVM", ("expected_manifest_sha256", "threads", "device"))}


def load(path: str | Path, **options: Any) -> Artefact:
    """Check and open the artefact at `path` with the runtime its manifest names: "onnx"
    (runtime/artefact.py: expected_manifest_sha256, providers, graph_optimization, threads) or
    "tvm" (runtime/tvm_runtime.py: expected_manifest_sha256, threads, device) or "npu"
    (runtime/npu_runtime.py: expected_manifest_sha256, htp_arch, source)."""
    backend = read_manifest(path).get("backend")
    if isinstance(backend, str) and backend in OPTIONS:  # anything else: ONNX's checks refuse it
        kind, accepted = OPTIONS[backend]
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise InputError(f"load options {unknown} do not apply to {kind} artefact; accepted: "
                             f"{', '.join(accepted)}")
        if backend == "npu":
            from .npu_runtime import load as load_npu

            return load_npu(path, **options)
        from .tvm_runtime import load as load_tvm

        return load_tvm(path, **options)
    return _load_onnx(path, **options)
