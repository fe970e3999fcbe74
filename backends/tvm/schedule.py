"""Schedules: how each kernel of lower.py runs on the CPU (llvm) and on NVIDIA GPUs (cuda).

CPU. TVM 0.27's dlight has two CPU rules, `cpu.GEMV` and `cpu.Reduction`. Reduction is used
where it applies (below); GEMV does not fit the products: it tiles an inner-reduction [N, K] GEMV
and vectorises its spatial axis, which on our packed weights would gather, and it has no GEMM or
dequantizing form. So the product and attention rules are our own, written as a dlight
`ScheduleRule` and applied, with dlight's, by dlight's `ApplyDefaultSchedule` pass. Each kernel
carries its kind (`splice.kernel`) and whether it runs on few rows (decode) or many (prefill)
(`splice.rows`), set by the lowering, so our rules never guess what a PrimFunc is from its loop
nest:

- linear (packed weights): decode streams each packed row once with up to 4 x 16 outputs held in
  vector registers (independent FMA chains), parallel over output blocks; prefill is a
  register-blocked GEMM over whole row tiles (4 rows x up to 3 vector blocks = 12 accumulators,
  one broadcast and three loads per k), parallel over (output blocks x row tiles). Bias and the
  residual add are computed in the accumulator write-back.
- qlinear (quant.py): decode, DECODE_OUTPUTS outputs a task (parallel), per block its partial
  sums (chunks of 16 code bytes, nibbles and outputs unrolled, lanes a vector) then one FMA by
  the block's scale; prefill, one output and a tile of 8 rows a task, each rebuilt weight vector
  shared by the tile's unrolled rows; lanes summed at the end.
- rms_norm, Hadamard stages, dynamic fake quantization: dlight's `cpu.Reduction` (the row's
  reduction and the injective block that uses it under one parallel row loop, the injective part
  vectorised); a decode step's single-row norm gets the same without the parallel loop.
- attention (attention.grouped_attention): one parallel task per (batch, kv head, query, key
  split): the group's scores against 16 keys per vector FMA (keys are stored transposed), each
  key loaded once for the group, mask and exp vectorised over the key tile, the weighted sum of
  values vectorised over head_dim; then the splits combined per query row.
- everything else (element-wise, rotary, gathers, the cache append, whatever dlight's Reduction
  declines): spatial loops fused, the last one vectorised where its extent allows, parallel when
  rows are many.

MetaSchedule was the alternative: it tunes each kernel per shape, but on a shared two-core
machine a useful search is tens of minutes per model, and these rules already stream decode
weights at memory bandwidth and run prefill GEMMs at a large fraction of peak; a compile is
lowering plus LLVM code generation (seconds), with no tuning database to keep (so the issue's
"tuning database saved in the artefact and reused" has nothing to hold: there is no tuning).

GPU: dlight's rules (Matmul, GEMV, LowBatchGEMV, Reduction, GeneralReduction, RMSNorm, Fallback)
on the plain-layout kernels, the way MLC-LLM schedules the same shapes.
"""

from __future__ import annotations

import logging

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.target import Target

log = logging.getLogger(__name__)

DECODE_OUTPUTS = 4  # outputs per task of a decode product: independent accumulator chains
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
    """The llvm schedules of this backend's products and attention (module docstring), by
    `splice.kernel`; None for other kernels, which the next rules take."""

    def apply(self, func, target: Target, tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        kind, rows = _kind(func)
        many = rows == "many"
        schedule = {"linear_packed": _linear, "qlinear": _qlinear, "attention": _attention,
                    "qact": _generic}.get(kind)  # qact: qdot.py's activation quantization
        if kind == "rms_norm" and not many:
            schedule = _rms_norm  # one row: dlight's Reduction would launch a 1-task parallel loop
        if kind == "quantize" and not many:
            # one row (decode's static batch): dlight's Reduction would parallelise the channels
            # and recompute the row's range under each of them
            schedule = _generic
        if schedule is None:
            return None
        sch = s_tir.Schedule(func)
        schedule(sch, many)
        return sch


class CPUFallback(dl.ScheduleRule):
    """Every other kernel: spatial loops fused, the innermost vectorised where its extent allows,
    parallel when rows are many (module docstring)."""

    def apply(self, func, target: Target, tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        _generic(sch, _kind(func)[1] == "many")
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


def _gemm_tiles(sch: s_tir.Schedule) -> None:
    """The prefill GEMM over [row tiles, tile, n] (kernels.linear's row_tile form): a tile of
    rows x up to 3 vector blocks of outputs accumulated in registers, over k, parallel over
    (output blocks x row tiles)."""
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
    sch.parallel(sch.fuse(noo, mo))
    sch.unroll(mi)
    sch.unroll(noi)
    sch.vectorize(ni)
    init = sch.decompose_reduction(mm, k)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(acc)[-1])
    _generic_block(sch, epi, True)


def _qstreamed(sch: s_tir.Schedule, many: bool) -> None:
    """quant.py's streamed product: per (tile of rows, output) in prefill, per (row, a few
    outputs) in decode, parallel; under each task the loop over blocks (and their chunks) with
    the task's vectors of partial sums in registers (rows or outputs unrolled, the lanes a
    vector), then the lanes' sum."""
    total = sch.get_sblock("qsum")
    loops = sch.get_loops(total)
    if len(loops) == 3:  # [row tiles, tile, out]
        o, r, n = loops
        sch.reorder(o, n, r)
        task = sch.fuse(o, n)
        anchor = task
    else:  # [rows, out]: a few outputs a task, independent accumulator chains (one would wait
        # on the FMA latency at every step)
        m, n = loops
        width = next((b for b in (DECODE_OUTPUTS, 2) if (_extent(sch, n) or 1) % b == 0), 1)
        task, ni = sch.split(n, [None, width])
        sch.reorder(task, m, ni)
        anchor = m
    sch.parallel(task)
    if _has_block(sch, "qblock"):
        _qblocks(sch, anchor)
    else:
        _qtiles(sch, anchor)
    for name in ("split", "xsum"):
        if _has_block(sch, name):
            _generic_block(sch, sch.get_sblock(name), many)
    if _has_block(sch, "epilogue"):
        _generic_block(sch, sch.get_sblock("epilogue"), many)


def _qblocks(sch: s_tir.Schedule, anchor) -> None:
    """Decode: per block, its partial sums (qblock: chunks and nibbles unrolled, outputs
    unrolled, lanes a vector) then one FMA by the block's scale into the output's (qpart)."""
    part = sch.get_sblock("qpart")
    sch.compute_at(part, anchor, preserve_unit_loops=True)
    n, lane, g = sch.get_loops(part)[-3:]
    sch.reorder(g, n, lane)
    sch.unroll(n)
    _try(sch.vectorize, lane)
    blk = sch.get_sblock("qblock")
    sch.compute_at(blk, g, preserve_unit_loops=True)
    n_red = sum(1 for iv in sch.get(blk).iter_vars if iv.iter_type != tirx.IterVar.DataPar)
    blk_loops = sch.get_loops(blk)
    red = blk_loops[-n_red:]
    bn, bl = blk_loops[-n_red - 3], blk_loops[-n_red - 1]  # (rows, outputs, block, lanes)
    sch.reorder(*red, bn, bl)
    for lp in [*red[1:], bn]:
        sch.unroll(lp)
    if (_extent(sch, red[0]) or 0) <= 8:
        sch.unroll(red[0])
    _try(sch.vectorize, bl)
    init = sch.decompose_reduction(blk, red[0])
    _try(sch.vectorize, sch.get_loops(init)[-1])
    init = sch.decompose_reduction(part, g)
    _try(sch.vectorize, sch.get_loops(init)[-1])


def _qtiles(sch: s_tir.Schedule, anchor) -> None:
    """Prefill: the blocks, chunks and nibbles as the reduction, each rebuilt weight vector
    feeding the tile's rows (unrolled), the lanes a vector."""
    part = sch.get_sblock("qpart")
    sch.compute_at(part, anchor, preserve_unit_loops=True)
    n_red = sum(1 for iv in sch.get(part).iter_vars if iv.iter_type != tirx.IterVar.DataPar)
    *outer, i = sch.get_loops(part)[:-n_red]
    red = sch.get_loops(part)[-n_red:]  # the blocks, the chunks, then (int4) the nibble
    tile_rows = [lp for lp in outer[1:] if _extent(sch, lp) not in (None, 1)]
    sch.reorder(*red, *tile_rows, i)
    for lp in [*red[2:], *tile_rows]:
        sch.unroll(lp)
    if (_extent(sch, red[1]) or 0) <= 4:
        sch.unroll(red[1])
    vo, vi = _vector_split(sch, i)
    if vo is not None and vi is not None:
        sch.unroll(vo)
    init = sch.decompose_reduction(part, red[0])
    _try(sch.vectorize, sch.get_loops(init)[-1])


def _qlinear(sch: s_tir.Schedule, many: bool) -> None:
    """quant.py's products: the streamed form (_qstreamed), or the plain one (a partial last
    block) over [rows, out] or [row tiles, tile, out]: per output (parallel) and tile, the
    reduction split over 16 lanes (rfactor), the tile's partial sums in registers, summed across
    lanes at the end."""
    if _has_block(sch, "qpart"):
        _qstreamed(sch, many)
        return
    mm = sch.get_sblock("matmul")
    epi = sch.get_sblock("epilogue") if _has_block(sch, "epilogue") else None
    tiled = len(sch.get(mm).iter_vars) - sum(
        1 for iv in sch.get(mm).iter_vars if iv.iter_type != tirx.IterVar.DataPar) == 3
    loops = sch.get_loops(mm)
    spatial, red = (loops[:3], loops[3:]) if tiled else (loops[:2], loops[2:])
    if _extent(sch, red[-1]) % VEC:
        sch.reorder(spatial[-1], *spatial[:-1])
        sch.parallel(spatial[-1])
    else:
        io, lane = sch.split(red[-1], [None, VEC])
        # partial sums [..., out, lane], the lanes contiguous; used only under (out, tile), the
        # buffer compacts to one tile's [row, lane] there, a stack array (cf. ACC_SCOPE)
        rf = sch.rfactor(lane, len(spatial))
        *outer, fn, flane = sch.get_loops(mm)
        sch.reorder(fn, *outer, flane)
        sch.parallel(fn)
        sch.compute_at(rf, outer[0], preserve_unit_loops=True)
        # compute_at makes one loop per block variable, in their order (lane, the spatial ones,
        # the reductions): reductions first, then the tile's rows (unrolled), lanes (a vector)
        rf_loops = sch.get_loops(rf)[2:]
        lane_l, sp_l, red_l = rf_loops[0], rf_loops[1:1 + len(spatial)], rf_loops[1 + len(spatial):]
        inner = [sp_l[1]] if tiled else []
        sch.reorder(*[lp for lp in sp_l if lp not in inner], *red_l, *inner, lane_l)
        if tiled:
            sch.unroll(inner[0])
        sch.vectorize(lane_l)  # before decompose_reduction: TVM refuses it afterwards
        init = sch.decompose_reduction(rf, red_l[0])
        sch.vectorize(sch.get_loops(init)[-1])
    if epi is not None:
        _generic_block(sch, epi, many)


def _rms_norm(sch: s_tir.Schedule, many: bool) -> None:
    """A decode step's norm: the sum of squares under the row loop, the scaling vectorised."""
    norm = sch.get_sblock("norm")
    ss = sch.get_sblock("sumsq")
    loops = sch.get_loops(norm)
    row = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
    sch.compute_at(ss, row)
    _vector_split(sch, loops[-1])


def _attention(sch: s_tir.Schedule, many: bool) -> None:
    """attention.grouped_attention: one task per (batch, kv head, query, key split), every stage
    of the split computed under it; the scores of the group's heads against 16 keys a vector FMA
    (keys stored transposed), each key vector loaded once for the group, accumulated in a
    stack tile (registers) over head_dim; the max and sum first per key lane, then over lanes;
    the weighted values accumulated per head in a head_dim-wide register tile. The combination of
    the splits runs per query row after, vectorised over head_dim (parallel when rows are many)."""
    partial = sch.get_sblock("partial")
    task = sch.fuse(*sch.get_loops(partial)[:4])
    sch.parallel(task)
    for name in ("weighted", "split_sum", "split_sum_lanes", "exp", "split_max",
                 "split_max_lanes", "masked", "score"):
        sch.compute_at(sch.get_sblock(name), task, preserve_unit_loops=True)
    score = sch.get_sblock("score")
    r, t, ji, d = sch.get_loops(score)[-4:]
    sch.reorder(t, d, r, ji)
    tile = sch.cache_write(score, 0, ACC_SCOPE)
    sch.reverse_compute_at(tile, t)
    _try(sch.vectorize, ji)
    _try(sch.unroll, r)
    init = sch.decompose_reduction(score, d)
    _try(sch.vectorize, sch.get_loops(init)[-1])
    _try(sch.vectorize, sch.get_loops(tile)[-1])
    for name in ("split_max_lanes", "split_sum_lanes"):
        block = sch.get_sblock(name)
        r, ji, t = sch.get_loops(block)[-3:]
        sch.reorder(r, t, ji)
        _try(sch.vectorize, ji)
        init = sch.decompose_reduction(block, t)
        _try(sch.vectorize, sch.get_loops(init)[-1])
    for name in ("masked", "exp"):
        _try(sch.vectorize, sch.get_loops(sch.get_sblock(name))[-1])
    weighted = sch.get_sblock("weighted")
    r, dd, wo, wi = sch.get_loops(weighted)[-4:]
    # at most 64 head_dim lanes a pass over the values: 8 AVX2 registers of sums (Gemma's 256
    # at once would spill)
    ddo, ddi = sch.split(dd, [None, min(_extent(sch, dd), 64)])
    sch.reorder(r, ddo, wo, wi, ddi)
    tile = sch.cache_write(weighted, 0, ACC_SCOPE)
    sch.reverse_compute_at(tile, ddo)
    _try(sch.vectorize, ddi)
    init = sch.decompose_reduction(weighted, wo)
    _try(sch.vectorize, sch.get_loops(init)[-1])
    _try(sch.vectorize, sch.get_loops(tile)[-1])
    out = sch.get_sblock("attention")
    b, i, c = sch.get_loops(out)
    hd = _extent(sch, sch.get_loops(sch.get_sblock("combined"))[-2])
    h, d = sch.split(c, [None, hd])
    for name in ("combined", "rowsum", "split_weight", "top"):
        sch.compute_at(sch.get_sblock(name), h, preserve_unit_loops=True)
    _try(sch.vectorize, d)
    if many:
        sch.parallel(sch.fuse(b, i))


def _try(primitive, *args) -> None:
    """Apply an optional schedule step (vectorisation): where TVM refuses it, the loop stays
    scalar and LLVM's own vectoriser may still take it."""
    try:
        primitive(*args)
    except Exception as e:  # tvm.s_tir.schedule.ScheduleError, raised before any change
        log.debug("schedule step %s skipped: %s", getattr(primitive, "__name__", primitive),
                  str(e).splitlines()[0] if str(e) else e)


def _generic_block(sch: s_tir.Schedule, block, many: bool) -> None:
    """Fuse the spatial loops, vectorise the innermost where possible, parallel when many.
    A reduction keeps its reduction loops serial under the fused spatial ones."""
    loops = sch.get_loops(block)
    kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
    if len(kinds) != len(loops):
        return  # loops already restructured (split or fused): leave them
    spatial = [lp for lp, kind in zip(loops, kinds) if kind == tirx.IterVar.DataPar]
    if not spatial or spatial != loops[:len(spatial)]:
        return
    keep = spatial
    if len(spatial) == len(loops):
        outer, _ = _vector_split(sch, spatial[-1])
        keep = [lp for lp in [*spatial[:-1], outer] if lp is not None]
    if many and keep:
        sch.parallel(sch.fuse(*keep) if len(keep) > 1 else keep[0])


def _generic(sch: s_tir.Schedule, many: bool) -> None:
    for block in sch.get_child_blocks(sch.get_sblock("root")) if _has_block(sch, "root") else []:
        try:
            _generic_block(sch, block, many)
        except Exception as e:  # a nest the generic rule cannot restructure stays serial
            log.debug("generic schedule skipped block %s: %s", sch.get(block).name_hint, e)


def cpu_rules() -> list[dl.ScheduleRule]:
    """Ours for products and attention, dlight's CPU Reduction where it applies (rms_norm in
    prefill, Hadamard stages, dynamic fake quantization: a reduction and the injective block that
    uses it, under one parallel row loop), the fallback for the rest."""
    return [CPURule(), dl.cpu.Reduction(), CPUFallback()]


def gpu_rules() -> list[dl.ScheduleRule]:
    return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.LowBatchGEMV(), dl.gpu.Reduction(),
            dl.gpu.GeneralReduction(), dl.gpu.RMSNorm(), dl.gpu.Fallback()]
