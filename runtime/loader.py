"""`splice.runtime.load`: one checked open for every artefact. The manifest is read, the backend
it names picks the runtime, the options are checked against that runtime's, every file's hash is
checked (opening.checked_manifest), and the runtime opens the checked artefact (`open_checked`).

A runtime module is imported only when an artefact of its backend is opened, so a device that
runs TVM artefacts needs no onnxruntime, and one that runs ONNX artefacts no TVM.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from types import ModuleType
from typing import Any

from splice.errors import ArtefactError, InputError
from .generation import Artefact
from .manifest import read_manifest
from .opening import checked_manifest

__all__ = ["BACKENDS", "open_artefact"]

# the backends this splice runs, and how an error names their artefacts
BACKENDS = {"onnx": "an ONNX", "tvm": "a TVM", "npu": "an NPU", "gguf": "a GGUF"}


def _runtime(backend: str) -> ModuleType:
    """The runtime module of `backend` (imported on first use)."""
    if backend == "tvm":
        from . import tvm_runtime
        return tvm_runtime
    if backend == "npu":
        from . import npu_runtime
        return npu_runtime
    if backend == "gguf":
        from . import gguf_runtime
        return gguf_runtime
    from . import onnx_runtime
    return onnx_runtime


def open_artefact(path: str | Path, **options: Any) -> Artefact:
    """Check and open the artefact at `path` with the runtime its manifest names: "onnx"
    (onnx_runtime.py: expected_manifest_sha256, providers, graph_optimization, threads,
    spinning), "tvm" (tvm_runtime.py: expected_manifest_sha256, threads, device), "npu"
    (npu_runtime.py: expected_manifest_sha256, htp_arch, source) or "gguf" (gguf_runtime.py,
    llama.cpp: expected_manifest_sha256, threads, n_ctx, kv_type). An option given as None counts
    as not given."""
    if path is None or isinstance(path, bytes) or not isinstance(path, (str, PathLike)) \
            or not str(path).strip():
        raise InputError(f"load: the artefact path must be a non-empty str or pathlib.Path, got "
                         f"{path!r:.60}")
    backend = read_manifest(path).get("backend")
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ArtefactError(f"artefact {path}: backend {backend!r}; this splice runs "
                            f"{', '.join(repr(b) for b in BACKENDS)} artefacts")
    runtime = _runtime(backend)
    options = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - set(runtime.OPTIONS))
    if unknown:
        raise InputError(f"load options {unknown} do not apply to {BACKENDS[backend]} artefact; "
                         f"accepted: {', '.join(runtime.OPTIONS)}")
    sha = options.pop("expected_manifest_sha256", None)
    path, manifest = checked_manifest(path, backend=backend, expected_manifest_sha256=sha)
    return runtime.open_checked(path, manifest, **options)
