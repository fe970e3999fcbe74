"""`splice.compile()`: checkpoint -> frontend -> passes -> backend -> artefact, in one call."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from .errors import InputError
from .recipe import Recipe

log = logging.getLogger(__name__)

TARGETS = {"cpu": ("onnx", "cpu")}


def resolve_recipe(recipe: Recipe | str | Path | None) -> Recipe:
    """A Recipe, the name of a built-in one, a .toml file, or None for no passes."""
    return Recipe.resolve("none" if recipe is None else recipe)


def calibration_batches(module, calibration: Any, *, seq_len: int = 512,
                        max_batches: int = 16) -> torch.Tensor | None:
    """Token batches [n, seq_len] from a tensor, a list of ids, or text (a str or a file path)."""
    if calibration is None:
        return None
    if isinstance(calibration, torch.Tensor):
        ids = calibration.to(torch.int64)
        return ids if ids.dim() == 2 else ids.reshape(1, -1)
    from .text import encode_text, read_text

    if isinstance(calibration, Path) or (isinstance(calibration, str) and Path(calibration).is_file()):
        calibration = read_text(Path(calibration))
    if isinstance(calibration, str):
        ids = encode_text(module, calibration)
    else:
        ids = [int(t) for t in calibration]
    seq_len = min(seq_len, module.config.max_position)
    n = min(len(ids) // seq_len, max_batches)
    if n == 0:
        raise InputError(f"calibration has {len(ids)} tokens, fewer than one window of {seq_len}; "
                         "give more text or a shorter window")
    return torch.tensor(ids[: n * seq_len], dtype=torch.int64).reshape(n, seq_len)


def run_passes(module, recipe: Recipe, *, calibration=None, instruments=(), seed: int | None = None):
    """Run the recipe's passes; returns (module, report). `seed` overrides the recipe's."""
    from .passes.base import PassContext
    from .passes.manager import PassManager

    ctx = PassContext(calibration=calibration, seed=recipe.seed if seed is None else seed)
    return PassManager(recipe.build(), instruments=list(instruments)).run(module, ctx)


def compile(model: Any, recipe: Recipe | str | Path | None = "fold_norms", target: str = "cpu",
            out: str | Path = "artefact", *, calibration: Any = None, instruments=(),
            seed: int | None = None, load: bool = True):
    """Compile `model` with `recipe` for `target` into the artefact directory `out`.

    model: anything frontend.load_model accepts (a path, "smollm2-135m", a transformers model, an
    ir.Module). Calibration data is explicit: token batches, a list of ids, or text. Returns the
    loaded artefact (splice.runtime.Artefact), or its path when `load` is False. The artefact is
    written to a temporary directory and renamed into place, so a failure leaves `out` as it was.
    """
    from .frontend import load_model

    if target not in TARGETS:
        raise InputError(f"unknown target {target!r}; supported: {', '.join(TARGETS)}")
    recipe = resolve_recipe(recipe)  # a bad recipe fails here, before the model is loaded
    t0 = time.perf_counter()
    module = load_model(model)
    t_import = time.perf_counter() - t0
    calib = calibration_batches(module, calibration, seq_len=recipe.calibration_seq_len,
                                max_batches=recipe.calibration_samples or 16)
    module, report = run_passes(module, recipe, calibration=calib, instruments=instruments, seed=seed)
    backend, device = TARGETS[target]
    from .backends.onnx import export

    t1 = time.perf_counter()
    path = export(module, Path(out), target=device, recipe=recipe.to_dict(),
                  report={"import_s": round(t_import, 3), "passes": report})
    log.info("compiled %s in %.1f s (import %.1f s, lowering %.1f s)", path,
             time.perf_counter() - t0, t_import, time.perf_counter() - t1)
    if not load:
        return path
    from .runtime import load as load_artefact

    return load_artefact(path)
