"""The `qlinear` kernel: products that read ONNX Runtime's MatMulNBits layout directly and
dequantize on the fly.

The stored tensors are the IR's, byte for byte (splice.ir.quant): codes uint8 [N, blocks, blob]
(int4 two per byte, low nibble first), scales [N, blocks], zero points uint8 [N, ceil(blocks *
bits / 8)] or implicit (symmetric). The float32 matrix never exists in memory: prefill rebuilds
each weight as (q - z) * scale, the reference's float32 arithmetic, bit-identical to the
interpreter's dequantized weight, and uses it at once; decode takes z and the scale out of the
inner sum (below), so it agrees with the reference to float32 rounding, not bit for bit.

The CPU product (_streamed) streams each output row's bytes once per tile of input rows, for
every group size (a partial last group included: the input is padded with zeros to whole blocks,
so the padding codes meet zeros) and every zero-point form. The partial sums are a vector of
QLANES floats per (row, output) whatever the group (PREFILL_LANES in prefill), a block's bytes
read that many at a time (its chunks): the registers a task holds do not grow with the group
size (with the block's bytes as the lanes, as before, g128 needed 64 lanes per output and
spilled, and a partial last group fell back to a per-weight form: SmolLM2's [1536, 576] in
groups of 128 took 5.3x longer per decode call than now, one thread, same run).
For int4 the input is first split into even and odd channels (x_split[m, g, t, i] =
x[m, g*gs + 2i + t]; tiny, once per call), so that one load of codes meets two contiguous
vectors of x, the low nibbles with the even channels and the high ones with the odd; int8 bytes
meet x directly. Decode (one row: every weight is read once) sums, per block, codes times x
(zero-extend, mask or shift, convert, FMA: the zero point and the scale are out of the inner
loop: sum (q - z) x = sum q x - z sum x, with the input's per-lane block sums computed once per
call), then one FMA by the block's scale; 4 outputs per task (independent accumulator chains).
Prefill rebuilds each weight as the reference's (q - z) * s once and feeds every row of a tile of
Q_ROW_TILE rows with it (unrolled). Either way the lanes are summed pairwise once per output.

What bounds it (measured on an AVX2 CPU, one thread, kernel alone: benchmarks/tvm_limits.py and
README): the float path costs ~4.5 vector instructions per 8 weights (unpack, convert, FMA),
so an int4 GEMV computes at ~4-5 GB/s per core, about half of ONNX Runtime's MatMulNBits at
accuracy level 4, which quantizes x to int8 and multiplies bytes (vpmaddubsw/VNNI): several
times fewer instructions per weight. On AVX-512 the float path's vectors are twice as wide.
qdot.py is that integer form for decode (the export option activations="int8").

The other classic formulation for prefill, a dequantize-to-float pass ahead of a float GEMM, was
3x slower: its stores into the packed layout are scatters.

On the GPU the product is the plain dequantizing form (dequantize block + matmul) that dlight's
GEMV and Matmul rules schedule, as MLC-LLM's are.
"""

from __future__ import annotations

from tvm import te, tirx

from splice.ir.core import Node
from .kernels import epilogue

# prefill rows per tile of the streamed product: each unpacked vector of codes feeds 8 rows, and
# the 8 independent accumulator chains cover the FMA latency (measured 1.2x faster than 4)
Q_ROW_TILE = 8
# partial sums per (row, output) of the streamed product, a block's bytes read this many at a
# time: 16 in decode; 8 in prefill, where a tile's 8 rows x 8 lanes fit AVX2's 16 registers with
# room for the weights (16 lanes: 16 registers of sums alone, spilled, 1.8x slower measured)
QLANES = 16
PREFILL_LANES = 8
LAYOUTS = {1: "q_weight", 2: "q_scales", 3: "q_zeros"}
# output rows per tile of the CPU's tiled layouts ("q_weight_tiled" [tiles, blocks, TILE, bytes],
# "q_scales_tiled" [tiles, blocks, TILE], "q_zeros_tiled" [tiles, zero-point bytes or blocks,
# TILE]): a decode task's outputs, whose bytes then lie in the order the task reads them
TILE = 4
TILED = {"q_weight": "q_weight_tiled", "q_scales": "q_scales_tiled", "q_zeros": "q_zeros_tiled"}


def qlinear_param_layouts(node: Node, i: int) -> str:
    """The storage layout of qlinear / qembedding input `i` (a bias is a plain float vector)."""
    return LAYOUTS.get(i, "plain")


def at(a, n, g, *rest):
    """Output n's element (block or zero-point byte g, then `rest`) of codes, scales or zero
    points in either layout: plain [out, g, *rest] or tiled [tiles, g, TILE, *rest]."""
    if len(a.shape) == len(rest) + 3:
        return a[(n // TILE, g, n % TILE, *rest)]
    return a[(n, g, *rest)]


def _nibble(byte, which):
    """Nibble `which` (0 low, 1 high) of a code byte, as int32: a select rather than a shift by
    an int64 index, which would promote the unpacking to int64 lanes (half the vector width)."""
    b = byte.astype("int32")
    if isinstance(which, int):
        return (b >> 4) if which else (b & 15)
    return tirx.Select(which.astype("int32") == 0, b & 15, b >> 4)


class _Format:
    """Reads one weight element of the MatMulNBits format: codes, zero points (packed integers,
    float32 per block, or implicit), scales."""

    def __init__(self, w: te.Tensor, s: te.Tensor, zp: te.Tensor | None, *, bits: int,
                 group_size: int, symmetric: bool, dtype: str):
        self.w, self.s, self.zp, self.bits, self.gs = w, s, zp, bits, group_size
        self.symmetric, self.dt = symmetric, dtype

    def code(self, n, g, j):
        if self.bits == 8:
            return at(self.w, n, g, j).astype(self.dt)
        return _nibble(at(self.w, n, g, j // 2), j % 2).astype(self.dt)

    def zero(self, n, g):
        if self.symmetric:
            return tirx.const(1 << (self.bits - 1), self.dt)
        if self.zp.dtype != "uint8":
            return at(self.zp, n, g).astype(self.dt)
        if self.bits == 8:
            return at(self.zp, n, g).astype(self.dt)
        return _nibble(at(self.zp, n, g // 2), g % 2).astype(self.dt)

    def weight(self, n, k):
        """(q - z) * scale: the reference's float32 operations, in its order."""
        g, j = k // self.gs, k % self.gs
        return (self.code(n, g, j) - self.zero(n, g)) * at(self.s, n, g).astype(self.dt)


def qlinear_kernel(x: te.Tensor, w: te.Tensor, s: te.Tensor, zp: te.Tensor | None,
                   bias: te.Tensor | None, residual: te.Tensor | None, *, bits: int,
                   group_size: int, symmetric: bool, out_features: int, row_tile: int = 1,
                   streamed: bool = True) -> te.Tensor:
    """y = x @ dequant(W).T (+ bias) (+ residual) for x [rows, in] over the MatMulNBits tensors.

    streamed (the CPU's form, when `in` is whole blocks): _streamed, over [row tiles, row_tile,
    out] or [rows, out] when row_tile is 1 (rows past the end re-read the last row; the
    epilogue keeps the real ones). Otherwise the plain form: one reduction over `in` of x times
    the weight rebuilt per element (the CPU's fallback for a partial last block) or, for the
    GPU (streamed False), a dequantize block feeding the product, the form dlight's GPU rules
    recognise."""
    n_out = out_features
    k_in = int(x.shape[-1])
    rows = x.shape[0]
    fmt = _Format(w, s, zp, bits=bits, group_size=group_size, symmetric=symmetric, dtype=x.dtype)
    tile = max(row_tile, 1)
    blocks = int(w.shape[1])
    if streamed:
        return _streamed(x, w, s, zp, bias, residual, n_out=n_out, bits=bits, blocks=blocks,
                         group_size=group_size, symmetric=symmetric, tile=tile)
    # one row per tile (decode): the product is [rows, out] itself
    tiled = (tirx.floordiv(rows - 1, tile) + 1, tile) if tile > 1 else (rows,)

    def row(*t):
        return tirx.min(t[0] * tile + t[1], rows - 1) if tile > 1 else t[0]

    k = te.reduce_axis((0, k_in), name="k")
    if streamed:
        y = te.compute((*tiled, n_out), lambda *o: te.sum(
            x[row(*o[:-1]), k] * fmt.weight(o[-1], k), axis=k), name="matmul")
    else:
        # the GPU's: the dequantization a block of its own, which dlight's GEMV (one row) and
        # Matmul (a symbolic number of rows) take as the product's prologue, as in MLC-LLM
        deq = te.compute((n_out, k_in), lambda n, kk: fmt.weight(n, kk), name="dequantize")
        y = te.compute((*tiled, n_out), lambda *o: te.sum(
            x[row(*o[:-1]), k] * deq[o[-1], k], axis=k), name="matmul")
    if tile == 1 and bias is None and residual is None:
        return y

    return epilogue(lambda m, n: y[m // tile, m % tile, n] if tile > 1 else y[m, n],
                    rows, n_out, bias, residual)


def _lanes(width: int, most: int) -> int:
    """Partial sums per (row, output): `most`, or the largest power of two dividing a block's
    bytes when they are fewer or not a multiple of it."""
    return next(n for n in (16, 8, 4, 2, 1) if n <= most and width % n == 0)


def _streamed(x: te.Tensor, w: te.Tensor, s: te.Tensor, zp: te.Tensor | None,
              bias: te.Tensor | None, residual: te.Tensor | None, *, n_out: int, bits: int,
              blocks: int, group_size: int, symmetric: bool, tile: int) -> te.Tensor:
    """The CPU product: a vector of `lanes` partial sums per (row, output); a block's bytes are
    read `lanes` at a time (its chunks), so the registers a task holds do not grow with the group
    size.

    The input is padded with zeros to whole blocks (a partial last group's padding codes then
    meet zeros) and, for int4, split into even and odd channels (x_split[m, g, t, i] =
    x[m, g*gs + 2i + t]; tiny, once per call): one load of code bytes meets two contiguous
    vectors of x, the low nibbles with the even channels and the high ones with the odd.

    Decode (tile 1), where a step reads every weight once: per block, the chunks' codes minus
    the zero point (int32 vector work), converted to float, FMA'd with x into the block's own
    partial sums (qblock), which are then FMA'd into the output's (qpart) with the block's scale
    broadcast: one multiply per lane and block instead of one per weight. Prefill (a tile of
    rows): each weight is rebuilt as the reference's (q - z) * s once and feeds every row of the
    tile (qpart), the rebuilding shared across the tile's unrolled rows. Either way the lanes
    are summed pairwise once per output (qsum). The sum's order is the only difference from the
    reference (and, in decode, the scale applied to a block's sum rather than to each weight)."""
    rows, dt = x.shape[0], x.dtype
    k_in = int(x.shape[-1])
    width = int(w.shape[-1])  # bytes per block: group_size / 2 (int4) or group_size (int8)
    lanes = _lanes(width, QLANES if tile == 1 else PREFILL_LANES)
    chunks = width // lanes
    tiled = (tirx.floordiv(rows - 1, tile) + 1, tile) if tile > 1 else (rows,)

    def row(t):
        return tirx.min(t[0] * tile + t[1], rows - 1) if tile > 1 else t[0]

    def zero(n, g):
        if symmetric:
            return tirx.const(1 << (bits - 1), "int32")
        if zp.dtype != "uint8":
            return None
        if bits == 8:
            return at(zp, n, g).astype("int32")
        return _nibble(at(zp, n, g // 2), g % 2)

    def centred(n, g, code):
        """code - z as float: an int32 subtraction for an integer zero point, a float one for a
        float zero point."""
        z = zero(n, g)
        return (code - z).astype(dt) if z is not None else code.astype(dt) - at(zp, n, g).astype(dt)

    def xin(m, ch):
        if blocks * group_size == k_in:
            return x[m, ch]
        return tirx.if_then_else(ch < k_in, x[m, tirx.min(ch, k_in - 1)], tirx.const(0.0, dt))

    g = te.reduce_axis((0, blocks), name="g")
    c = te.reduce_axis((0, chunks), name="c")
    if bits == 4:
        # the nibble is a reduction axis too, so that each is one FMA into the accumulator
        t = te.reduce_axis((0, 2), name="t")
        xs = te.compute((rows, blocks, 2, width),
                        lambda m, gg, tt, i: xin(m, gg * group_size + 2 * i + tt), name="split")

        def term(m, n, gg, i, f):
            return xs[m, gg, t, i] * f(n, gg, _nibble(at(w, n, gg, i), t))
        red = [c, t]
    else:
        xs = None
        if blocks * group_size != k_in:
            xs = te.compute((rows, blocks, width), lambda m, gg, i: xin(m, gg * group_size + i),
                            name="split")

        def term(m, n, gg, i, f):
            xv = xs[m, gg, i] if xs is not None else x[m, gg * group_size + i]
            return xv * f(n, gg, at(w, n, gg, i).astype("int32"))
        red = [c]

    if tile == 1:
        # sum_i (q_i - z) x_i = sum_i q_i x_i - z sum_i x_i, per lane: the zero point leaves the
        # inner loop (one FMA per lane and block against the input's own lane sums, xsum)
        cx = te.reduce_axis((0, chunks), name="cx")
        if bits == 4:
            tx = te.reduce_axis((0, 2), name="tx")
            xsum = te.compute((rows, blocks, lanes), lambda m, gg, l: te.sum(
                xs[m, gg, tx, cx * lanes + l], axis=[cx, tx]), name="xsum")
        else:
            xsum = te.compute((rows, blocks, lanes), lambda m, gg, l: te.sum(
                xs[m, gg, cx * lanes + l] if xs is not None
                else x[m, gg * group_size + cx * lanes + l], axis=cx), name="xsum")

        def z_float(n, gg):
            z = zero(n, gg)
            return z.astype(dt) if z is not None else at(zp, n, gg).astype(dt)
        blk = te.compute((rows, n_out, blocks, lanes), lambda m, n, gg, l: te.sum(
            term(m, n, gg, c * lanes + l, lambda _n, _g, code: code.astype(dt)), axis=red),
            name="qblock")
        part = te.compute((rows, n_out, lanes), lambda m, n, l: te.sum(
            (blk[m, n, g, l] - z_float(n, g) * xsum[m, g, l]) * at(s, n, g).astype(dt),
            axis=g),
            name="qpart")
    else:
        def weight(n, gg, code):
            return centred(n, gg, code) * at(s, n, gg).astype(dt)
        part = te.compute((*tiled, n_out, lanes), lambda *o: te.sum(
            term(row(o[:-2]), o[-2], g, c * lanes + o[-1], weight), axis=[g, *red]),
            name="qpart")

    def tree(o, lo: int, n: int):
        """The lanes lo..lo+n-1 summed pairwise: depth log2(n), where a reduction would be a
        chain of n dependent adds (LLVM may not reassociate float sums)."""
        if n == 1:
            return part[(*o, lo)]
        half = n // 2
        return tree(o, lo, half) + tree(o, lo + half, n - half)
    total = te.compute((*tiled, n_out), lambda *o: tree(o, 0, lanes), name="qsum")
    if tile == 1 and bias is None and residual is None:
        return total

    return epilogue(lambda m, n: total[m // tile, m % tile, n] if tile > 1 else total[m, n],
                    rows, n_out, bias, residual)


def qembedding_kernel(ids: te.Tensor, w: te.Tensor, s: te.Tensor, zp: te.Tensor | None, *,
                      bits: int, group_size: int, symmetric: bool, embedding_dim: int,
                      scale: float) -> te.Tensor:
    """Rows `ids` of a block-quantized table, dequantized (then times `scale`)."""
    dt = "float32"
    fmt = _Format(w, s, zp, bits=bits, group_size=group_size, symmetric=symmetric, dtype=dt)

    def f(*i):
        v = fmt.weight(ids[i[:-1]], i[-1])
        return v * tirx.const(scale, dt) if scale != 1.0 else v
    return te.compute((*ids.shape, embedding_dim), f, name="qembedding")


def quantize_kernel(x: te.Tensor, scale: te.Tensor | None, zero: te.Tensor | None, *,
                    mode: str, bits: int, symmetric: bool, group: int,
                    clip_ratio: float) -> te.Tensor:
    """Fake quantization, splice.ir.quant.fake_quantize's formula in its order of operations;
    torch.round is round-half-to-even, which is nearbyint here."""
    from splice.ir.quant import act_qrange

    dt = x.dtype
    lo_q, hi_q = (tirx.const(v, dt) for v in act_qrange(bits, symmetric))

    def c(v: float):
        return tirx.const(v, dt)

    def codes(v, sc, z=None):
        r = tirx.nearbyint(v / sc)
        return tirx.min(tirx.max(r if z is None else r + z, lo_q), hi_q)

    if mode != "dynamic_per_token":
        def fstatic(*i):
            j = 0 if mode == "static_per_tensor" else i[-1]  # a per-tensor scalar is [1]
            sc = scale[j]
            z = c(0.0) if zero is None else zero[j]
            return (codes(x[i], sc, z) - z) * sc
        return te.compute(x.shape, fstatic, name="quantize")
    width = int(x.shape[-1])
    size = group or width
    rows = list(x.shape[:-1])
    r = te.reduce_axis((0, size), name="r")

    def run(i):
        return (*i[:-1], i[-1] // size)

    shape = (*rows, width // size)
    if symmetric:
        amax = te.compute(shape, lambda *i: te.max(tirx.abs(x[(*i[:-1], i[-1] * size + r)]),
                                                   axis=r), name="amax")

        def fsym(*i):
            sc = amax[run(i)] * c(clip_ratio / float(hi_q.value))
            sc = tirx.Select(sc == c(0.0), c(1.0), sc)
            return codes(x[i], sc) * sc
        return te.compute(x.shape, fsym, name="quantize")
    r2 = te.reduce_axis((0, size), name="r2")
    lo = te.compute(shape, lambda *i: te.min(x[(*i[:-1], i[-1] * size + r)], axis=r), name="lo")
    hi = te.compute(shape, lambda *i: te.max(x[(*i[:-1], i[-1] * size + r2)], axis=r2),
                    name="hi")

    def fasym(*i):
        lo_v = tirx.min(lo[run(i)], c(0.0))
        hi_v = tirx.max(hi[run(i)], c(0.0))
        sc = (hi_v - lo_v) * c(clip_ratio / float(hi_q.value))
        sc = tirx.Select(sc == c(0.0), c(1.0), sc)
        z = tirx.min(tirx.max(tirx.nearbyint(-(lo_v * c(clip_ratio)) / sc), lo_q), hi_q)
        return (codes(x[i], sc, z) - z) * sc
    return te.compute(x.shape, fasym, name="quantize")
