"""The `qlinear` kernel: products that read ONNX Runtime's MatMulNBits layout directly and
dequantize on the fly.

The stored tensors are the IR's, byte for byte (splice.ir.quant): codes uint8 [N, blocks, blob]
(int4 two per byte, low nibble first), scales [N, blocks], zero points uint8 [N, ceil(blocks *
bits / 8)] or implicit (symmetric). Each weight is rebuilt as (q - z) * scale, the reference's
float32 arithmetic (so a dequantized weight is bit-identical to the interpreter's), and used at
once; the float32 matrix never exists in memory.

The product streams each output row's bytes once per tile of input rows. For int4 the input is
first split into even and odd channels (x_split[g, 0, i] = x[g*gs + 2i], x_split[g, 1, i] =
x[g*gs + 2i + 1]; tiny), so that one 16-byte load of codes meets two contiguous 16-lane vectors
of x, the low nibbles with the even channels and the high ones with the odd; int8 bytes meet x
directly. The reduction is split over 16 lanes (rfactor) and summed across lanes once per output.
Decode runs tiles of one row; prefill tiles of 4, so each decoded vector of weights feeds four
rows (a dequantize-to-float pass ahead of a float GEMM was 3x slower: its stores into the
packed layout are scatters).
"""

from __future__ import annotations

from tvm import te, tirx

from ...ir.core import Node
from .kernels import LANES, pack_rows

LAYOUTS = {1: "q_weight", 2: "q_scales", 3: "q_zeros"}


def qlinear_param_layouts(node: Node, i: int) -> str:
    """The storage layout of qlinear / qembedding input `i` (a bias is a plain float vector)."""
    return LAYOUTS.get(i, "plain")


def _nibble(byte, which):
    return (byte.astype("int32") >> (which.astype("int32") * 4)) & 15


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
                   group_size: int, symmetric: bool, row_tile: int = 1) -> te.Tensor:
    """y = x @ dequant(W).T (+ bias) (+ residual) for x [rows, in] over the MatMulNBits tensors.

    The product runs over [row tiles, row_tile, out] (rows past the end re-read the last row;
    the epilogue keeps the real ones), or [rows, out] when row_tile is 1, reducing over (block, nibble, byte) so that 16 consecutive
    bytes of a row are one vector load: int4 reads x split into even and odd channels (module
    docstring). A partial last block (in not a multiple of group_size) takes the plain form."""
    n_out, blocks = int(w.shape[0]), int(w.shape[1])
    k_in = int(x.shape[-1])
    rows = x.shape[0]
    dt = x.dtype
    fmt = _Format(w, s, zp, bits=bits, group_size=group_size, symmetric=symmetric, dtype=dt)
    tile = max(row_tile, 1)
    # one row per tile (decode): the product is [rows, out] itself
    tiled = (tirx.floordiv(rows - 1, tile) + 1, tile) if tile > 1 else (rows,)

    def row(*t):
        return tirx.min(t[0] * tile + t[1], rows - 1) if tile > 1 else t[0]

    def dequant(n, g, q):
        return (q.astype(dt) - fmt.zero(n, g)) * s[n, g].astype(dt)

    if k_in == blocks * group_size and bits == 4:
        half = group_size // 2
        xs = te.compute((rows, blocks, 2, half),
                        lambda m, g, t, i: x[m, g * group_size + 2 * i + t], name="split")
        g, t, i = (te.reduce_axis((0, blocks), name="g"), te.reduce_axis((0, 2), name="t"),
                   te.reduce_axis((0, half), name="i"))
        y = te.compute((*tiled, n_out), lambda *o: te.sum(
            xs[row(*o[:-1]), g, t, i] * dequant(o[-1], g, _nibble(w[o[-1], g, i], t)),
            axis=[g, t, i]), name="matmul")
    elif k_in == blocks * group_size:
        g, i = te.reduce_axis((0, blocks), name="g"), te.reduce_axis((0, group_size), name="i")
        y = te.compute((*tiled, n_out), lambda *o: te.sum(
            x[row(*o[:-1]), g * group_size + i] * dequant(o[-1], g, w[o[-1], g, i]),
            axis=[g, i]), name="matmul")
    else:
        k = te.reduce_axis((0, k_in), name="k")
        y = te.compute((*tiled, n_out), lambda *o: te.sum(
            x[row(*o[:-1]), k] * fmt.weight(o[-1], k), axis=k), name="matmul")
    if tile == 1 and bias is None and residual is None:
        return y

    def fepi(m, n):
        v = y[m // tile, m % tile, n] if tile > 1 else y[m, n]
        if bias is not None:
            v = v + bias[n]
        if residual is not None:
            v = residual[m, n] + v
        return v
    return te.compute((rows, n_out), fepi, name="epilogue")


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
    from ...ir.quant import act_qrange

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
