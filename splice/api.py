"""`splice.compile()`: checkpoint -> frontend -> passes -> backend -> artefact, in one call."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from . import checks
from .errors import InputError
from .recipe import Recipe

log = logging.getLogger(__name__)

# backend -> the targets it builds for (cuda artefacts build without a GPU: ONNX's float16 graph
# for ONNX Runtime's CUDA provider, TVM's CUDA library; TVM also cross-compiles aarch64 Linux)
TARGETS = {"onnx": ("cpu", "cuda"), "tvm": ("cpu", "cuda", "aarch64"), "npu": ("npu",),
           "gguf": ("cpu",)}


def resolve_recipe(recipe: Recipe | str | Path | None) -> Recipe:
    """A Recipe, the name of a built-in one, a .toml file, or None for no passes."""
    return Recipe.resolve("none" if recipe is None else recipe)


def _is_file(text: str) -> bool:
    """Whether a calibration string names a file (a long text is not a path: no OS accepts it
    as one, and asking raises OSError)."""
    if "\n" in text or len(text) > 4096:
        return False
    try:
        return Path(text).is_file()
    except OSError:
        return False


def calibration_batches(module, calibration: Any, *, seq_len: int = 512,
                        max_batches: int = 16) -> torch.Tensor | None:
    """Token batches [n, seq_len] from a tensor, a list of ids, or text (a str or a file path)."""
    if calibration is None:
        return None
    if isinstance(calibration, torch.Tensor):
        ids = calibration.to(torch.int64)
        return ids if ids.dim() == 2 else ids.reshape(1, -1)
    from splice.frontend.text import encode_text, read_text

    if isinstance(calibration, Path) or (isinstance(calibration, str) and _is_file(calibration)):
        calibration = read_text(Path(calibration))
    if isinstance(calibration, str):
        ids = encode_text(module, calibration)
    else:
        try:
            ids = [int(t) for t in calibration]
        except (TypeError, ValueError, OverflowError):
            raise InputError("calibration: expected token batches (a tensor), a list of token "
                             f"ids or text, got {type(calibration).__name__} holding something "
                             "that is not an integer id") from None
    seq_len = min(seq_len, module.config.max_position)
    n = min(len(ids) // seq_len, max_batches)
    if n == 0:
        raise InputError(f"calibration has {len(ids)} tokens, fewer than one window of {seq_len}; "
                         "give more text or a shorter window")
    return torch.tensor(ids[: n * seq_len], dtype=torch.int64).reshape(n, seq_len)


def run_passes(module, recipe: Recipe, *, calibration=None, instruments=(), seed: int | None = None,
               reducer=None, layerwise_dir: str | Path | None = None):
    """Run the recipe's passes; returns (module, report). `seed` overrides the recipe's.
    `reducer` combines calibration statistics over processes (passes/infra/reduce.py); with
    `layerwise_dir` the passes run one decoder layer at a time (passes/infra/layerwise.py), writing the
    transformed weights there."""
    from splice.passes.infra.base import PassContext
    from splice.passes.infra.manager import PassManager
    from splice.passes.infra.reduce import Reducer

    ctx = PassContext(calibration=calibration, seed=recipe.seed if seed is None else seed,
                      reducer=reducer or Reducer(),
                      precision=recipe.precision)
    if layerwise_dir is not None:
        from splice.passes.infra.layerwise import run_layerwise

        return run_layerwise(module, recipe.build(), ctx, layerwise_dir,
                             instruments=list(instruments))
    return PassManager(recipe.build(), instruments=list(instruments)).run(module, ctx)


def _check_nothing_pending(module) -> None:
    """A patch that estimate_patch fitted is put to work by prune_layers; one still waiting at
    the end of the recipe would be exported as dead code while the layers it was fitted to
    replace stay, which is never what a recipe meant."""
    outputs = set(map(id, module.graph.outputs))
    waiting = [n.outputs[0].name for n in module.graph.nodes if n.role == "patch"
               and not n.outputs[0].uses and id(n.outputs[0]) not in outputs]
    if waiting:
        block = module.config.extra.get("prune_block")
        where = f" for layers {block[0]}..{block[0] + block[1] - 1}" if block else ""
        raise InputError(f"the recipe fits a patch ({', '.join(waiting)}){where} but no "
                         "prune_layers pass removes the layers it replaces; put prune_layers "
                         "after estimate_patch (select_layers, estimate_patch, prune_layers, "
                         "fuse_patch)")


def compile(model: Any, recipe: Recipe | str | Path | None = "fold_norms", target: str = "cpu",
            out: str | Path = "artefact", *, calibration: Any = None, instruments=(),
            seed: int | None = None, load: bool = True, memory_limit: int | float | None = None,
            backend: str = "onnx", layerwise: bool = False, distributed: bool = False,
            export_options: dict[str, Any] | None = None, progress=None):
    """Compile `model` with `recipe` for `target` into the artefact directory `out`.

    model: anything frontend.load_model accepts (a path, "smollm2-135m", a transformers model, an
    ir.Module). backend: "onnx" (ONNX Runtime), "tvm" (a compiled library; targets cpu, cuda,
    aarch64), "npu", or "gguf" (a GGUF file for llama.cpp; recipes that change llama.cpp's graph
    are refused before the model is loaded, backends/gguf/fits.py). Calibration data is
    explicit: token batches, a list of ids, or text. Returns the loaded artefact
    (splice.runtime.Artefact), or its path when `load` is False. The artefact is written to a
    temporary directory and renamed into place, so a failure leaves `out` as it was.
    Before loading, the memory the compile needs is estimated (frontend/memory.py) and checked
    against `memory_limit` bytes (None: what the machine has available).
    layerwise: import a Hugging Face directory or a GGUF file lazily and run the passes one
    decoder layer at a time, after the whole-model ones (passes/infra/layerwise.py), for models larger
    than memory; the memory check is then skipped.
    distributed: this process is one of several (torchrun): calibration is sharded across them,
    statistics are all-reduced, and only rank 0 writes the artefact (others return None).
    export_options: the backend's own export settings, e.g. for ONNX {"ops": "standard"} (no
    contrib ops), {"accuracy_level": 0} (MatMulNBits in float32), {"threads": 4} (the session
    default); an option the backend does not have is refused before the model is loaded.
    progress: a callable given the name of each step as it starts ("import", "pass NAME",
    "export", ...), e.g. splice.progress.Progress.stage; None for none.
    """
    from splice.frontend import load_model

    out = check_compile_arguments(model, out, instruments=instruments, seed=seed,
                                  memory_limit=memory_limit, calibration=calibration)
    if target == "npu" and backend == "onnx":  # the NPU target has one backend: take it
        backend = "npu"
    if not isinstance(backend, str) or backend not in TARGETS:
        raise InputError(f"unknown backend {backend!r}; supported: {', '.join(TARGETS)}")
    if not isinstance(target, str) or target not in TARGETS[backend]:
        raise InputError(f"the {backend} backend has no target {target!r}; supported: "
                         f"{', '.join(TARGETS[backend])}")
    recipe = resolve_recipe(recipe)  # a bad recipe fails here, before the model is loaded
    if backend == "gguf":  # llama.cpp's graph holds weights-only changes: refuse the rest now
        from splice.backends.gguf.fits import check_recipe

        check_recipe(recipe.build())
    export_options = dict(export_options or {})
    _check_export_options(backend, export_options)
    from splice.frontend.memory import check_memory

    if layerwise:
        from splice.passes.infra.layerwise import check_supported

        check_supported(recipe.build())
    else:
        check_memory(model, recipe, memory_limit)
    stage = progress or (lambda name: None)
    if progress is not None:
        from .progress import StageInstrument

        instruments = [*instruments, StageInstrument(progress)]
    t0 = time.perf_counter()
    stage("import")
    from splice.frontend.lazy_gguf import gguf_source  # the default model's name, or a .gguf file

    if layerwise and isinstance(model, (str, Path)) and (Path(model) / "config.json").is_file():
        from splice.frontend.lazy import load_hf_lazy

        module = load_hf_lazy(model)
    elif layerwise and (gguf_file := gguf_source(model)) is not None:
        from splice.frontend.lazy_gguf import load_gguf_lazy

        module = load_gguf_lazy(gguf_file)
    else:
        module = load_model(model)
    t_import = time.perf_counter() - t0
    from .presets import check_calibration

    # after the import, so that a model that cannot be read is reported first, as it was before
    # the default recipe calibrated (a missing, empty or unknown file is found only by loading it)
    check_calibration(recipe, calibration)
    if calibration is not None:
        stage("calibration text")
    calib = calibration_batches(module, calibration, seq_len=recipe.calibration_seq_len,
                                max_batches=recipe.calibration_samples or 16)
    reducer = None
    if distributed:
        from splice.passes.infra import distributed as dist

        reducer = dist.init()
        calib = dist.shard(calib, reducer.rank, reducer.world_size)
    scratch = None
    if layerwise:  # beside the artefact: the transformed layers need that disk's room
        Path(out).resolve().parent.mkdir(parents=True, exist_ok=True)
        scratch = tempfile.TemporaryDirectory(prefix=".splice-layers-",
                                              dir=Path(out).resolve().parent)
    try:
        return _lower(module, recipe, calib, instruments, seed, reducer, scratch, backend, target,
                      out, t0, t_import, load, export_options, stage)
    finally:
        if scratch is not None:
            scratch.cleanup()


def check_compile_arguments(model: Any, out: Any, *, instruments=(), seed=None,
                            memory_limit=None, calibration=None) -> Path:
    """compile()'s arguments that can be judged without loading anything: the model is given,
    `out` is a directory an artefact may replace (nothing is created to find out), every
    instrument's output directory is writable, the numbers are in range and a calibration path
    is a readable file. Returns `out` as a Path."""
    if model is None:
        raise InputError("model is missing (None); give a checkpoint path, 'smollm2-135m', a "
                         "transformers model or an ir.Module")
    if isinstance(model, str) and not model.strip():
        raise InputError("model is an empty path; give a checkpoint path or 'smollm2-135m'")
    out = checks.output_dir(out, "output directory (out)", "artefact")
    for inst in instruments:
        if getattr(inst, "directory", None) is not None:   # DumpInstrument writes there
            checks.output_dir(inst.directory, f"IR dump directory ({type(inst).__name__})")
    checks.integer(seed, "seed", minimum=0, optional=True)
    checks.number(memory_limit, "memory_limit (bytes)", above=0, optional=True)
    if calibration is not None and not isinstance(calibration, Path) and (
            isinstance(calibration, (bytes, dict)) or not hasattr(calibration, "__iter__")):
        raise InputError(f"calibration: expected token batches (a tensor), a list of token ids, "
                         f"text or a text file's Path, got {type(calibration).__name__}")
    if isinstance(calibration, Path):
        checks.input_file(calibration, "calibration text")
    elif isinstance(calibration, str):
        checks.text_argument(calibration, "calibration text")
        if "\n" not in calibration and len(calibration) <= 4096 and _is_dir(calibration):
            raise InputError(f"calibration text {calibration} is a directory; give a text file "
                             "or the text itself")
    return out


def _is_dir(text: str) -> bool:
    try:
        return Path(text).is_dir()
    except OSError:
        return False


# export() arguments that compile() fills itself: not export options
_FILLED = ("module", "out_dir", "target", "recipe", "report", "calibration")


def _exporter(backend: str):
    if backend == "tvm":
        from splice.backends.tvm import export
    elif backend == "npu":
        from splice.backends.npu import export
    elif backend == "gguf":
        from splice.backends.gguf import export
    else:
        from splice.backends.onnx import export
    return export


def _check_export_options(backend: str, options: dict[str, Any]) -> None:
    import inspect

    if "threads" in options:
        checks.integer(options["threads"], "export option threads", minimum=0, optional=True)
    accepted = [k for k in inspect.signature(_exporter(backend)).parameters if k not in _FILLED]
    bad = sorted(set(options) - set(accepted))
    if bad:
        raise InputError(f"the {backend} backend has no export option {', '.join(bad)}; "
                         f"accepted: {', '.join(accepted) or 'none'}")


def _lower(module, recipe, calib, instruments, seed, reducer, scratch, backend, target, out, t0,
           t_import, load, export_options, stage):
    """compile() after the import: passes, then (on rank 0) the backend and loading."""
    module, report = run_passes(module, recipe, calibration=calib, instruments=instruments,
                                seed=seed, reducer=reducer,
                                layerwise_dir=scratch.name if scratch is not None else None)
    if reducer is not None and reducer.rank != 0:
        from splice.passes.infra.distributed import barrier

        barrier()  # rank 0 writes the artefact
        return None
    _check_nothing_pending(module)
    export = _exporter(backend)
    extra = dict(export_options)
    if backend == "npu":  # static activation scales: the calibration tokens go to the backend
        extra["calibration"] = calib

    t1 = time.perf_counter()
    stage(f"export ({backend})")
    path = export(module, Path(out), target=target, recipe=recipe.to_dict(),
                  report={"import_s": round(t_import, 3), "passes": report}, **extra)
    log.info("compiled %s in %.1f s (import %.1f s, lowering %.1f s)", path,
             time.perf_counter() - t0, t_import, time.perf_counter() - t1)
    if reducer is not None:
        from splice.passes.infra.distributed import barrier

        barrier()
    if not load:
        return path
    stage("load")
    from splice.runtime import load as load_artefact

    return load_artefact(path)
