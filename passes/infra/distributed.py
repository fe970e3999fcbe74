"""Calibration across processes and machines with torch.distributed.

`torchrun --nproc-per-node N [--nnodes M ...] -m splice.cli compile MODEL ...` starts N x M
copies of the same compile. Each process joins the default process group (env:// rendezvous, the
variables torchrun sets; gloo on CPU, nccl where CUDA is available), takes its share of the
calibration batches (`shard`: a contiguous block of whole sequences per rank, so positions and
chunking inside each sequence are the one-process ones), and runs the recipe with a
`TorchDistributedReducer` in its PassContext: every pass that accumulates a statistic over
calibration tokens calls ctx.reduce where it finishes accumulating, the all-reduce sums the
shares, and every rank computes the same transform. Rank 0 alone writes the artefact; the
others wait for it at a barrier and return None. Results equal the one-process compile up to
the order of floating-point additions (tests/scale/test_distributed.py checks the statistics).

What is split is the calibration work (the forward passes over calibration tokens and the
statistics), not the model: each process holds the model (layer by layer with layerwise=True).
"""

from __future__ import annotations

import logging
import os

import torch

from splice.errors import InputError
from splice.passes.infra.reduce import Reducer, TorchDistributedReducer

log = logging.getLogger(__name__)


def launched_by_torchrun() -> bool:
    """Whether this process is one of several that torchrun (or an equivalent launcher) started."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def init(backend: str | None = None) -> Reducer:
    """Join the default process group (env:// rendezvous) and return its reducer."""
    import torch.distributed as dist

    if not dist.is_available():
        raise InputError("this torch build has no torch.distributed; compile in one process")
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
        log.info("joined process group: rank %d of %d (%s)", dist.get_rank(),
                 dist.get_world_size(), backend)
    return TorchDistributedReducer()


def shard(calibration: torch.Tensor | None, rank: int, world_size: int) -> torch.Tensor | None:
    """This rank's share of the calibration batches [n, seq]: a contiguous block of whole rows,
    the first n % world_size ranks taking one more."""
    if calibration is None or world_size == 1:
        return calibration
    rows = calibration if calibration.dim() == 2 else calibration.reshape(1, -1)
    n = rows.shape[0]
    if n < world_size:
        raise InputError(f"{n} calibration sequences cannot be shared by {world_size} processes; "
                         "give at least one sequence per process (more calibration text, or a "
                         "shorter calibration seq_len)")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return rows[start:start + base + (rank < extra)]


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
