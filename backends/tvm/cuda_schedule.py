"""Schedules for NVIDIA GPUs (the cuda target): which rule takes each kernel of lower.py.

dlight's GPU rules are tried in a fixed order, and the first that accepts a kernel schedules it.
Left to themselves they give every product, prefill's and decode's alike, to `gpu.Matmul`: the
decode products have a symbolic number of rows (the batch), and Matmul is the rule that accepts a
symbolic row axis, so a batch-1 decode step runs each weight through a GEMM tiling (row tiles of
which all but one row are padding, shared-memory staging of a vector). A decode step is a GEMV:
it reads each weight once and does two flops per weight byte-pair, so its time is the time to
stream the weights, and the schedule that reaches memory bandwidth is one warp per few outputs
with the reduction split over the warp's lanes, the dequantization fused into the loads.

`DecodeProducts` routes the products of the decode function (`splice.rows` == "few", kinds
qlinear, linear and matmul) to dlight's `gpu.LowBatchGEMV` (MLC-LLM's decode rule): the batch is
padded to a bucket of 4 rows inside the kernel, so one kernel serves batch 1 (a GEMV: every weight
read once, the padded rows masked) and batched decode (16 rows: four buckets, each weight read
once per bucket from L2), the int4 dequantization inlined into the weight loads and the reduction
split across a warp's lanes with a shuffle. `gpu.GEMV` proper needs the row count to be 1 at
compile time, which the decode function's symbolic batch is not. Prefill's products keep
`gpu.Matmul`. Everything else keeps dlight's rules in MLC-LLM's order: Reduction and RMSNorm
(norms), GeneralReduction, Fallback (element-wise, rotary, the cache append, attention).

Attention stays on dlight's Fallback (each stage a thread-per-output loop nest): at the benchmark's
contexts (64 + 128 positions) it reads a few kilobytes per head, against megabytes of weights per
layer, so it is not what decode waits on; a fused one-block-per-row kernel is the next step
when a GPU measures that it is.

Nothing here ran on a GPU while it was written (no machine had one): the CPU tests check which
rule takes which kernel and that the library builds; `python -m benchmarks.gpu` checks the
logits against the reference interpreter on the GPU itself.
"""

from __future__ import annotations

import logging

from tvm import tirx
from tvm.s_tir import dlight as dl
from tvm.target import Target

log = logging.getLogger(__name__)

DECODE_PRODUCTS = ("qlinear", "linear", "matmul")
BATCH_BUCKET = 4  # decode rows per LowBatchGEMV bucket (MLC-LLM's default)


def _attr(func: tirx.PrimFunc, key: str) -> str | None:
    attrs = func.attrs or {}
    return str(attrs[key]) if key in attrs else None


class DecodeProducts(dl.ScheduleRule):
    """The decode function's weight products as (low-batch) GEMVs (module docstring); None for
    every other kernel, which the next rules take."""

    def __init__(self, bucket: int = BATCH_BUCKET):
        self.gemv = dl.gpu.LowBatchGEMV(bucket=bucket)

    def apply(self, func, target: Target, tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "cuda":
            return None
        if _attr(func, "splice.rows") != "few" or _attr(func, "splice.kernel") \
                not in DECODE_PRODUCTS:
            return None
        sch = self.gemv.apply(func, target, tunable)
        if sch is None:
            log.debug("decode %s kernel not in GEMV form; left to the next rule",
                      _attr(func, "splice.kernel"))
        return sch


def cuda_rules() -> list[dl.ScheduleRule]:
    """The cuda pipeline's rules, in the order they are tried."""
    return [DecodeProducts(), dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.LowBatchGEMV(),
            dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.RMSNorm(), dl.gpu.Fallback()]


def rule_of(func: tirx.PrimFunc, target: Target) -> str | None:
    """The name of the rule that schedules `func` for `target` (for tests and reports)."""
    for rule in cuda_rules():
        if rule.apply(func, target, False) is not None:
            return type(rule).__name__
    return None
