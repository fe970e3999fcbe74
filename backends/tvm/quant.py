"""The `qlinear` kernel: products that read ONNX Runtime's MatMulNBits layout directly and
dequantize on the fly.

The stored tensors are the IR's, byte for byte (splice.ir.quant): codes uint8 [N, blocks, blob]
(int4 two per byte, low nibble first), scales [N, blocks], zero points uint8 [N, ceil(blocks *
bits / 8)] or implicit (symmetric). Each weight is rebuilt as (q - z) * scale, the reference's
float32 arithmetic (so a dequantized weight is bit-identical to the interpreter's), and used at
once; the float32 matrix never exists in memory.

The CPU product (_streamed) streams each output row's bytes once per tile of input rows. For
int4 the input is first split into even and odd channels (x_split[g, 0, i] = x[g*gs + 2i],
x_split[g, 1, i] = x[g*gs + 2i + 1]; tiny, once per call), so that one 16-byte load of codes
meets two contiguous 16-lane vectors of x, the low nibbles with the even channels and the high
ones with the odd; int8 bytes meet x directly. Per block the unpacking is int32 vector work
(zero-extend, mask, shift, minus the zero point), then one int-to-float conversion and one
multiply by the block's broadcast scale per nibble, and one FMA per row of the tile; the lanes
are summed once per output, pairwise. Decode runs one row and 4 outputs per task (4
independent accumulator chains: with one, each step waits on the FMA latency); prefill tiles of
Q_ROW_TILE rows, so each unpacked vector of codes feeds every row of the tile. Against the
previous form, which rebuilt each weight in float with int64 unpacking and split the reduction
over lanes with rfactor, SmolLM2-135M int4 went from 0.27x to 1.40x ONNX Runtime's
MatMulNBits (accuracy level 4) in decode and from 0.88x to 1.09x in prefill (benchmarks/
tvm_bench.py, two threads, same run). With one thread each, decode measured ~0.9x: MatMulNBits
at that level quantizes x to int8 and uses int8 dot products, more work per instruction than
float FMAs, at the cost of its accuracy. A dequantize-to-float pass ahead of a float GEMM was 3x
slower: its stores into the packed layout are scatters.

The other classic formulation, accumulating sum_j q_j x_j per block and correcting with
s * zero * sum_j x_j afterwards, saves the subtraction and a multiply per vector but needs a
scalar correction per (row, output, block); it was not measured against this form.

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
LAYOUTS = {1: "q_weight", 2: "q_scales", 3: "q_zeros"}


def qlinear_param_layouts(node: Node, i: int) -> str:
    """The storage layout of qlinear / qembedding input `i` (a bias is a plain float vector)."""
    return LAYOUTS.get(i, "plain")


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
            return self.w[n, g, j].astype(self.dt)
        return _nibble(self.w[n, g, j // 2], j % 2).astype(self.dt)

    def zero(self, n, g):
        if self.symmetric:
            return tirx.const(1 << (self.bits - 1), self.dt)
        if self.zp.dtype != "uint8":
            return self.zp[n, g].astype(self.dt)
        if self.bits == 8:
            return self.zp[n, g].astype(self.dt)
        return _nibble(self.zp[n, g // 2], g % 2).astype(self.dt)

    def weight(self, n, k):
        """(q - z) * scale: the reference's float32 operations, in its order."""
        g, j = k // self.gs, k % self.gs
        return (self.code(n, g, j) - self.zero(n, g)) * self.s[n, g].astype(self.dt)


def qlinear_kernel(x: te.Tensor, w: te.Tensor, s: te.Tensor, zp: te.Tensor | None,
                   bias: te.Tensor | None, residual: te.Tensor | None, *, bits: int,
                   group_size: int, symmetric: bool, row_tile: int = 1,
                   streamed: bool = True) -> te.Tensor:
    """y = x @ dequant(W).T (+ bias) (+ residual) for x [rows, in] over the MatMulNBits tensors.

    streamed (the CPU's form, when `in` is whole blocks): _streamed, over [row tiles, row_tile,
    out] or [rows, out] when row_tile is 1 (rows past the end re-read the last row; the
    epilogue keeps the real ones). Otherwise the plain form: one reduction over `in` of x times
    the weight rebuilt per element (the CPU's fallback for a partial last block) or, for the
    GPU (streamed False), a dequantize block feeding the product, the form dlight's GPU rules
    recognise."""
    n_out = int(w.shape[0])
    k_in = int(x.shape[-1])
    rows = x.shape[0]
    fmt = _Format(w, s, zp, bits=bits, group_size=group_size, symmetric=symmetric, dtype=x.dtype)
    tile = max(row_tile, 1)
    blocks = int(w.shape[1])
    if k_in == blocks * group_size and streamed:
        return _streamed(x, w, s, zp, bias, residual, bits=bits, blocks=blocks,
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


def _streamed(x: te.Tensor, w: te.Tensor, s: te.Tensor, zp: te.Tensor | None,
              bias: te.Tensor | None, residual: te.Tensor | None, *, bits: int, blocks: int,
              group_size: int, symmetric: bool, tile: int) -> te.Tensor:
    """The CPU product: one vector of partial sums per output and row, the bytes of a block as
    its lanes.

    part[.., n, i] = sum_g sum_t x[.., channel(g, t, i)] * (float(code(n, g, i, t) - z) * s_g):
    the code minus the zero point is an int32 operation on a whole vector of unpacked codes
    (both are integers; a float zero point is subtracted in float), times the block's scale, a
    broadcast; the weight so rebuilt is the reference's dequantized weight bit for bit, and the
    only difference from the reference is the order of the sum. With a tile of rows, each
    unpacked vector of codes meets every row of the tile (LLVM shares the unpacking across the
    unrolled rows). The lanes are summed once per output at the end (qsum)."""
    rows, n_out, dt = x.shape[0], int(w.shape[0]), x.dtype
    width = int(w.shape[2])  # bytes per block: group_size / 2 (int4) or group_size (int8)
    tiled = (tirx.floordiv(rows - 1, tile) + 1, tile) if tile > 1 else (rows,)

    def row(t):
        return tirx.min(t[0] * tile + t[1], rows - 1) if tile > 1 else t[0]

    def zero(n, g):
        if symmetric:
            return tirx.const(1 << (bits - 1), "int32")
        if zp.dtype != "uint8":
            return None
        if bits == 8:
            return zp[n, g].astype("int32")
        return _nibble(zp[n, g // 2], g % 2)

    def weight(n, g, code):
        z = zero(n, g)
        q = (code - z).astype(dt) if z is not None else code.astype(dt) - zp[n, g].astype(dt)
        return q * s[n, g].astype(dt)

    g = te.reduce_axis((0, blocks), name="g")
    if bits == 4:
        # the nibble is a reduction axis too, so that each is one FMA into the accumulator
        t = te.reduce_axis((0, 2), name="t")
        xs = te.compute((rows, blocks, 2, width),
                        lambda m, gg, tt, i: x[m, gg * group_size + 2 * i + tt], name="split")
        part = te.compute((*tiled, n_out, width), lambda *o: te.sum(
            xs[row(o[:-2]), g, t, o[-1]] * weight(o[-2], g, _nibble(w[o[-2], g, o[-1]], t)),
            axis=[g, t]), name="qpart")
    else:
        part = te.compute((*tiled, n_out, width), lambda *o: te.sum(
            x[row(o[:-2]), g * group_size + o[-1]]
            * weight(o[-2], g, w[o[-2], g, o[-1]].astype("int32")), axis=g), name="qpart")

    def tree(o, lo: int, n: int):
        """The lanes lo..lo+n-1 summed pairwise: depth log2(n), where a reduction would be a
        chain of n dependent adds (LLVM may not reassociate float sums)."""
        if n == 1:
            return part[(*o, lo)]
        half = n // 2
        return tree(o, lo, half) + tree(o, lo + half, n - half)
    total = te.compute((*tiled, n_out), lambda *o: tree(o, 0, width), name="qsum")
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
