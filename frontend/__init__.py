"""Frontends: model sources -> ir.Module.

`load_model` accepts what the CLI's MODEL argument accepts: the name of the embedded default
model, a Hugging Face directory, a .gguf file, a llama2.c .bin, a saved splice module directory,
an in-memory transformers model or ir.Module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from splice.errors import FrontendError

DEFAULT_MODEL = "smollm2-135m"
ACCEPTED = (f"the name {DEFAULT_MODEL!r}, a Hugging Face model directory (config.json + "
            "safetensors), a .gguf file, a llama2.c .bin checkpoint, or a saved splice module "
            "directory (graph.txt)")


def load_model(model: Any):
    """Import `model` into an ir.Module (see ACCEPTED for the forms). Weights that are not finite
    (NaN or infinity) are refused here, naming the tensor: they would compile into an artefact
    whose every output is NaN."""
    from splice.ir.core import Module

    if isinstance(model, Module):
        return model
    module = _load(model)
    check_finite(module, str(model) if isinstance(model, (str, Path)) else type(model).__name__)
    return module


def check_finite(module, source: str) -> None:
    """Refuse a module with a NaN or infinite floating-point weight, naming the first one."""
    from .finite import check_finite as check_named

    check_named(module.weights.items(), source)


def _load(model: Any):
    from splice.ir.core import Module  # noqa: F401 - the forms ACCEPTED names
    if model is None:
        raise FrontendError(f"the model is missing (None); accepted: {ACCEPTED}")
    if not isinstance(model, (str, Path)):
        try:
            from transformers import PreTrainedModel
        except ImportError:  # pragma: no cover - transformers is a dependency
            PreTrainedModel = ()
        if isinstance(model, PreTrainedModel):
            from .hf import from_transformers

            return from_transformers(model)
        raise FrontendError(f"cannot import a {type(model).__name__}; accepted: {ACCEPTED}, "
                            "or an in-memory transformers model (use frontend.torch_export."
                            "from_torch for another torch.nn.Module)")
    if str(model) == DEFAULT_MODEL:
        from .hf import default_model_path, load_gguf

        return load_gguf(default_model_path())
    path = Path(model)
    if not path.exists():
        raise FrontendError(f"model {str(model)!r} not found; accepted: {ACCEPTED}")
    if path.is_dir():
        if (path / "graph.txt").is_file():
            from splice.ir.serialize import load_module

            return load_module(path)
        if (path / "config.json").is_file():
            from .hf import load_hf

            return load_hf(path)
        raise FrontendError(f"{path} is a directory without config.json or graph.txt; "
                            f"accepted: {ACCEPTED}")
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        from .hf import load_gguf

        return load_gguf(path)
    if suffix == ".bin":
        from .llama2c import load_llama2c

        return load_llama2c(path)
    raise FrontendError(f"{path}: unknown model file type {suffix or '(none)'!r}; accepted: {ACCEPTED}")
