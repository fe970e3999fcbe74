"""The reference trajectory every backend test compares against: the interpreter's logits and
caches over a prefill and greedy decode steps, and the largest difference a backend shows."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from splice.ir import past_from_present, run_logits


def reference_trajectory(module, ids: torch.Tensor, steps: int) -> list:
    """Logits and caches of the interpreter for a prefill then `steps` greedy decode steps."""
    out = run_logits(module, ids)
    traj = [(ids.numpy(), out)]
    for _ in range(steps):
        tok = out["logits"][:, -1:].argmax(-1)
        out = run_logits(module, tok, past=past_from_present(out))
        traj.append((tok.numpy(), out))
    return traj


def worst_difference(traj: list, step: Callable) -> float:
    """Run the trajectory's inputs through `step(ids) -> (logits, {cache name: array})`, which
    feeds the backend's own cache back; the largest difference from the reference over logits and
    present KV (each cache array of the reference's shape)."""
    worst = 0.0
    for ids, ref in traj:
        logits, cache = step(ids)
        worst = max(worst, float(np.abs(logits - ref["logits"].numpy()).max()))
        for name, value in past_from_present(ref).items():
            assert cache[name].shape == tuple(value.shape), name
            worst = max(worst, float(np.abs(cache[name] - value.numpy()).max()))
    return worst
