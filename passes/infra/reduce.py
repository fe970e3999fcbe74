"""Reducers: how a pass combines what it accumulated over calibration data split across processes.

A calibration statistic that is a sum over tokens (GPTQ's X^T X and token count, a LinearPatch
scale's sums of |x Q|, the least-squares normal equations X^T X and X^T Y, activation maxima,
cosine sums) can be accumulated by each process over its share of the calibration batches and
combined afterwards; the result then equals the one-process result up to the order of the
floating-point additions. A pass calls `ctx.reduce(tensor)` (sum) or `ctx.reduce(tensor, "max")`
once, where it finishes accumulating; `Reducer` (one process) returns the tensor as it is, and
`TorchDistributedReducer` all-reduces it over the default torch.distributed process group (gloo
on CPU; with nccl the tensor goes through the GPU). Every process then holds the same combined
statistic and computes the same transform from it, so the ranks' modules stay identical and
rank 0 alone writes the artefact (passes/infra/distributed.py launches and shards). Where the
transform is costly (GPTQ's solves) one rank computes each part and a sum in which the other
ranks put zeros hands it to all (numerics/quantizers.shared_solve).
"""

from __future__ import annotations

import torch

from splice.errors import InputError

OPS = ("sum", "max", "min")


class Reducer:
    """One process: nothing to combine."""

    world_size = 1
    rank = 0

    def __call__(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if op not in OPS:
            raise InputError(f"reduce op {op!r}; accepted: {', '.join(OPS)}")
        return tensor

    def __repr__(self) -> str:
        return "Reducer()"


class TorchDistributedReducer(Reducer):
    """all_reduce over torch.distributed's default group (initialised by the caller)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise InputError("TorchDistributedReducer needs an initialised torch.distributed "
                             "process group (launch with torchrun; see splice.passes.infra.distributed)")
        self._dist = dist
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self._device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend() == "nccl" else torch.device("cpu")

    def __call__(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if op not in OPS:
            raise InputError(f"reduce op {op!r}; accepted: {', '.join(OPS)}")
        red = {"sum": self._dist.ReduceOp.SUM, "max": self._dist.ReduceOp.MAX,
               "min": self._dist.ReduceOp.MIN}[op]
        t = tensor.detach().to(self._device).contiguous().clone()
        self._dist.all_reduce(t, op=red)
        return t.to(tensor.device)

    def __repr__(self) -> str:
        return f"TorchDistributedReducer(rank={self.rank}, world_size={self.world_size})"
