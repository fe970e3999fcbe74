"""Schedules: how each kernel of lower.py runs on the CPU (llvm) and on NVIDIA GPUs (cuda).

CPU. TVM 0.27's dlight has two CPU rules, `cpu.GEMV` and `cpu.Reduction`. Neither fits what
this backend emits: GEMV vectorises the spatial axis of an inner-reduction product (gathers on
our packed weights), and Reduction keeps the normalised row in a second pass. So the CPU rules are
our own, written as dlight `ScheduleRule`s and applied with dlight's `ApplyDefaultSchedule`
pass; each kernel carries its kind (`splice.kernel`) and whether it runs on few rows (decode)
or many (prefill) (`splice.rows`), set by the lowering, so a rule never has to guess what a
PrimFunc is from its loop nest:

- linear (packed weights): decode streams each packed row once with 4 x 16 outputs held in
  vector registers (four independent FMA chains), parallel over output blocks; prefill is a
  register-blocked GEMM, 4 rows x 32 outputs (8 accumulators, two weight vectors per k step), the
  product of the two parallel axes split over the cores. Bias and the residual add are computed
  in the accumulator write-back.
- qlinear: see quant_schedule in this module: per packed byte column, 16 lanes of codes at a time.
- rms_norm: the row's sum of squares computed under the row loop, the normalisation vectorised.
- attention: one parallel task per (batch, head, query): scores, softmax and the weighted sum of
  values for that row are computed under it (no intermediate leaves the task).
- everything else (element-wise, rotary, gathers, Hadamard stages, the cache append): spatial
  loops fused, the last one vectorised where its extent allows, parallel when rows are many.

MetaSchedule was the alternative: it tunes each of these kernels per shape, but on a shared
two-core machine a useful search is tens of minutes per model, and the hand schedules above
already stream weights at memory bandwidth in decode and reach a large fraction of peak in
prefill (benchmarks/tvm_bench.py measures both).

GPU: dlight's rules (Matmul, GEMV, LowBatchGEMV, Reduction, GeneralReduction, RMSNorm, Fallback)
on the plain-layout kernels, which is how MLC-LLM schedules the same shapes.
"""

from __future__ import annotations

import logging

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.target import Target

log = logging.getLogger(__name__)

VEC = 16  # float32 lanes of one AVX-512 register; LLVM splits it for narrower targets
# The accumulator tile's scope. TVM 0.27 gives a "local" buffer on the CPU a heap workspace,
# and whether LLVM then keeps the tile in registers depends on alias analysis that other
# functions in the same module can defeat (measured: a prefill GEMM 2.4x slower built inside
# the whole model than alone). A small "global" allocation inside the task loop is a stack
# alloca instead, which LLVM always promotes to registers.
ACC_SCOPE = "global"


def _extent(sch: s_tir.Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def _kind(func: tirx.PrimFunc) -> tuple[str | None, str]:
    attrs = func.attrs or {}
    kind = attrs.get("splice.kernel") if "splice.kernel" in attrs else None
    rows = attrs.get("splice.rows") if "splice.rows" in attrs else "many"
    return (str(kind) if kind is not None else None), str(rows)


def _has_block(sch: s_tir.Schedule, name: str) -> bool:
    try:
        sch.get_sblock(name)
        return True
    except Exception:  # tvm raises its own error type for a missing block
        return False


def _vector_split(sch: s_tir.Schedule, loop, lanes: int = VEC):
    """(outer, inner) with the inner loop vectorised when the extent is a known multiple of a
    vector width; (loop, None) when it is not (a predicated vector loop would be scalarised)."""
    ext = _extent(sch, loop)
    if ext is None:
        return loop, None
    for width in (lanes, 8, 4):
        if ext % width == 0:
            if ext == width:
                sch.vectorize(loop)
                return None, loop
            outer, inner = sch.split(loop, [None, width])
            sch.vectorize(inner)
            return outer, inner
    if ext <= 64:
        sch.vectorize(loop)
        return None, loop
    return loop, None


class CPURule(dl.ScheduleRule):
    """The llvm schedules of this backend's kernels (module docstring), by `splice.kernel`."""

    def apply(self, func, target: Target, tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        kind, rows = _kind(func)
        sch = s_tir.Schedule(func)
        many = rows == "many"
        if kind == "linear_packed":
            _linear(sch, many)
        elif kind == "qlinear":
            _qlinear(sch, many)
        elif kind == "rms_norm":
            _rms_norm(sch, many)
        elif kind == "attention":
            _attention(sch, many)
        else:
            _generic(sch, many)
        return sch


def _linear(sch: s_tir.Schedule, many: bool) -> None:
    if many:
        _gemm_tiles(sch)
        return
    mm = sch.get_sblock("matmul")
    epi = sch.get_sblock("epilogue") if _has_block(sch, "epilogue") else None
    m, n, k = sch.get_loops(mm)
    blocks = _extent(sch, n) // VEC
    no, ni = sch.split(n, [None, VEC])
    nb = 4 if blocks % 4 == 0 and blocks >= 64 else 2 if blocks % 2 == 0 else 1
    noo, noi = sch.split(no, [None, nb])
    sch.reorder(noo, m, k, noi, ni)
    acc = sch.cache_write(mm, 0, ACC_SCOPE)
    sch.reverse_compute_at(acc, m)
    sch.parallel(noo)
    sch.unroll(noi)
    sch.vectorize(ni)
    init = sch.decompose_reduction(mm, k)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(acc)[-1])
    if epi is None:
        return
    if _extent(sch, sch.get_loops(epi)[-1]) != blocks * VEC:
        # a padded product's epilogue drops the padding: a separate pass (inlined into the
        # write-back it would need a masked vector store, which TVM 0.27 emits unmasked)
        _generic_block(sch, epi, many)
        return
    sch.reverse_compute_inline(epi)


def _gemm_tiles(sch: s_tir.Schedule, dequant=None) -> None:
    """The prefill GEMM over [row tiles, tile, n] (kernels.linear's row_tile form): a tile of
    rows x up to 3 vector blocks of outputs accumulated in registers, over k. Parallel over
    (output blocks x row tiles), or over output blocks alone when a dequant stage fills the
    block's float weights first (decoded once, reused by every row tile)."""
    mm = sch.get_sblock("matmul")
    epi = sch.get_sblock("epilogue")
    mo, mi, n, k = sch.get_loops(mm)
    blocks = _extent(sch, n) // VEC
    no, ni = sch.split(n, [None, VEC])
    nb = 3 if blocks % 3 == 0 else 2 if blocks % 2 == 0 else 1
    noo, noi = sch.split(no, [None, nb])
    sch.reorder(noo, mo, k, mi, noi, ni)
    acc = sch.cache_write(mm, 0, ACC_SCOPE)
    sch.reverse_compute_at(acc, mo)
    if dequant is not None:
        sch.compute_at(dequant, noo, preserve_unit_loops=True)
        sch.parallel(noo)
    else:
        sch.parallel(sch.fuse(noo, mo))
    sch.unroll(mi)
    sch.unroll(noi)
    sch.vectorize(ni)
    init = sch.decompose_reduction(mm, k)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(acc)[-1])
    _generic_block(sch, epi, True)


def _qlinear(sch: s_tir.Schedule, many: bool) -> None:
    """quant.py's two forms: prefill dequantizes a block of outputs per task and runs the
    float micro-kernel; decode splits each row's reduction over VEC lanes (rfactor)."""
    if many:
        _gemm_tiles(sch, dequant=sch.get_sblock("dequant"))
        return
    mm = sch.get_sblock("matmul")
    epi = sch.get_sblock("epilogue") if _has_block(sch, "epilogue") else None
    loops = sch.get_loops(mm)
    m, n, inner = loops[0], loops[1], loops[-1]
    if _extent(sch, inner) % VEC:
        sch.reorder(n, m)
        sch.parallel(n)
        return
    _, lanes = sch.split(inner, [None, VEC])
    rf = sch.rfactor(lanes, 0)
    fm, fn, _ = sch.get_loops(mm)
    sch.reorder(fn, fm)
    sch.parallel(fn)
    sch.compute_at(rf, fm, preserve_unit_loops=True)
    rf_loops = sch.get_loops(rf)
    init = sch.decompose_reduction(rf, rf_loops[2])
    _try(sch.vectorize, sch.get_loops(init)[-1])
    _try(sch.vectorize, sch.get_loops(rf)[-1])
    if epi is not None:
        sch.reverse_compute_at(epi, fm)
    if _has_block(sch, "split"):
        _generic_block(sch, sch.get_sblock("split"), False)


def _rms_norm(sch: s_tir.Schedule, many: bool) -> None:
    norm = sch.get_sblock("norm")
    ss = sch.get_sblock("sumsq")
    loops = sch.get_loops(norm)
    row = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
    sch.compute_at(ss, row)
    _vector_split(sch, loops[-1])
    if many:
        sch.parallel(row)


def _attention(sch: s_tir.Schedule, many: bool) -> None:
    """One task per (batch, head, query); every stage of its row computed under it: scores
    against 16 keys per vector FMA (keys are stored transposed), mask and exp vectorised over the
    key tile, the weighted sum of values vectorised over head_dim."""
    out = sch.get_sblock("attention")
    b, i, c = sch.get_loops(out)
    hd = _extent(sch, sch.get_loops(sch.get_sblock("weighted"))[3])
    h, d = sch.split(c, [None, hd])
    sch.reorder(b, h, i, d)
    task = sch.fuse(b, h, i)
    for name in ("weighted", "rowsum", "exp", "rowmax", "masked", "score"):
        sch.compute_at(sch.get_sblock(name), task, preserve_unit_loops=True)
    sch.parallel(task)
    _try(sch.vectorize, d)
    score = sch.get_sblock("score")
    jo, ji, dd = sch.get_loops(score)[-3:]
    sch.reorder(jo, dd, ji)
    init = sch.decompose_reduction(score, dd)
    _try(sch.vectorize, sch.get_loops(init)[-1])
    _try(sch.vectorize, ji)
    for name in ("masked", "exp"):
        _try(sch.vectorize, sch.get_loops(sch.get_sblock(name))[-1])
    w = sch.get_sblock("weighted")
    dd, wo, wi = sch.get_loops(w)[-3:]
    sch.reorder(wo, wi, dd)
    init = sch.decompose_reduction(w, wo)
    _try(sch.vectorize, sch.get_loops(init)[-1])
    _try(sch.vectorize, dd)


def _try(primitive, *args) -> None:
    """Apply an optional schedule step (vectorisation): where TVM refuses it, the loop stays
    scalar and LLVM's own vectoriser may still take it."""
    try:
        primitive(*args)
    except Exception as e:  # tvm.s_tir.schedule.ScheduleError, raised before any change
        log.debug("schedule step %s skipped: %s", getattr(primitive, "__name__", primitive),
                  str(e).splitlines()[0] if str(e) else e)


def _generic_block(sch: s_tir.Schedule, block, many: bool) -> None:
    """Fuse the spatial loops, vectorise the innermost where possible, parallel when many."""
    info = {iv.var: iv.iter_type for iv in sch.get(block).iter_vars}
    loops = sch.get_loops(block)
    kinds = []
    for iv in sch.get(block).iter_vars:
        kinds.append(iv.iter_type)
    spatial = [lp for lp, kind in zip(loops, kinds) if kind == tirx.IterVar.DataPar]
    del info
    if len(spatial) != len(loops) - sum(1 for k in kinds if k != tirx.IterVar.DataPar) \
            or len(kinds) != len(loops):
        return
    if not spatial:
        return
    pure = len(spatial) == len(loops)
    if pure:
        last = spatial[-1]
        outer_rest = spatial[:-1]
        outer, _ = _vector_split(sch, last)
        keep = [lp for lp in [*outer_rest, outer] if lp is not None]
    else:
        keep = spatial
    if many and keep:
        fused = sch.fuse(*keep) if len(keep) > 1 else keep[0]
        sch.parallel(fused)


def _generic(sch: s_tir.Schedule, many: bool) -> None:
    for block in sch.get_child_blocks(sch.get_sblock("root")) if _has_block(sch, "root") else []:
        try:
            _generic_block(sch, block, many)
        except Exception as e:  # a nest the generic rule cannot restructure stays serial
            log.debug("generic schedule skipped block %s: %s", sch.get(block).name_hint, e)


def cpu_rules() -> list[dl.ScheduleRule]:
    return [CPURule()]


def gpu_rules() -> list[dl.ScheduleRule]:
    return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.LowBatchGEMV(), dl.gpu.Reduction(),
            dl.gpu.GeneralReduction(), dl.gpu.RMSNorm(), dl.gpu.Fallback()]
