"""What bounds a TVM artefact's decode step, measured as memory_limits does for ONNX Runtime: the
bytes of weights one step reads and how fast the artefact's own product kernels run with nothing
else in the step (its kernel limit).

Both come from one recorded decode step: the Relax VM's instrument hook sees every kernel call
with its arguments, so the products (kernels `qlinear*`, `linear*`, `matmul*`) and the weights
they read are the artefact's own, in the step's order. The kernel limit replays those calls
alone, the same arguments (weights, thread pool) in the same order, so the weights stream from
memory as in the step (the model's int4 weights are larger than the last-level cache); each
replayed call also pays the Python call into TVM's FFI, about a microsecond, so the limit is, if
anything, a little low."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

PRODUCTS = ("qlinear", "linear", "matmul")


def _decode_calls(art) -> list[tuple[str, object, tuple]]:
    """(symbol, function, arguments) of every kernel call of one decode step after a short
    prompt."""
    from splice.runtime.tvm_replay import record_calls

    _, cache = art.logits(np.asarray([[1, 2, 3, 4]]))
    off, art._replay.off = art._replay.off, True  # the VM's step: its calls are the ones seen
    try:
        calls, _ = record_calls(art.vm, lambda: art.logits(np.asarray([[5]]), cache))
    finally:
        art._replay.off = off
    return calls


def _products(art) -> list[tuple[str, object, tuple]]:
    return [c for c in _decode_calls(art) if c[0].startswith(PRODUCTS)]


def weight_bytes_per_step(art) -> int:
    """Bytes of the artefact's parameters that one decode step's products read (an embedding
    table that is only gathered from is not among them)."""
    params = {p.data_ptr(): p for p in art._params}
    seen = {a.data_ptr(): a for _, _, args in _products(art) for a in args
            if hasattr(a, "data_ptr") and a.data_ptr() in params}
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in seen.values())


def weight_product_seconds(art, runs: int = 20, repeats: int = 5) -> float:
    """Seconds one decode step's weight products take alone: the recorded product calls
    replayed in order, best of `repeats` means over `runs` steps."""
    calls = [(func, args) for _, func, args in _products(art)]

    def step() -> None:
        for func, args in calls:
            func(*args)
    for _ in range(3):
        step()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(runs):
            step()
        best = min(best, (time.perf_counter() - t) / runs)
    return best


def limits(path: Path, threads: int, runs: int = 20) -> dict[str, float]:
    """The TVM artefact at `path` opened with `threads`: weight bytes a decode step reads and
    its kernel limit in seconds."""
    from splice.runtime import load

    art = load(path, threads=threads)
    return {"weight_bytes": weight_bytes_per_step(art),
            "product_s": weight_product_seconds(art, runs=runs)}
