"""The TVM backend's kernels: one tensor-expression (TE) computation per IR op, plus the in-place
KV-cache append in TIR.

Each function here takes TE tensors and returns TE tensors with the arithmetic of the op's torch
reference (ir/ops.py) in the same order of operations, so float32 results agree to rounding. They
are target-independent and unscheduled: `lower.py` turns each into a PrimFunc tagged with its
kind (the `splice.kernel` attribute) and `schedule.py` schedules it for the target.

Weight layouts. A linear weight is stored either as the IR holds it, [out, in] ("plain", what
dlight's GPU GEMV/GEMM rules recognise), or "packed" [ceil(out/16), in, 16]: sixteen output
channels interleaved along the reduction axis, MLAS-style. Packed is what the CPU wants for both
shapes of the product: a decode GEMV streams each packed row once, multiplying 16 contiguous
weights by one broadcast input and accumulating in a vector register (no horizontal sums), and a
prefill GEMM keeps a 4 x 32 block of outputs in registers with two vector loads per step of k.
A tied embedding table is stored packed only, and the gather reads the packed layout (a handful
of rows per step), so the table is not stored twice.
"""

from __future__ import annotations

import math

from tvm import te, tirx

from .attention import exp_f32

LANES = 16  # output channels per packed row: one AVX-512 register of float32


def pack_rows(n: int) -> int:
    return -(-n // LANES)


def _rows(x: te.Tensor) -> list:
    return list(x.shape[:-1])


def linear(x: te.Tensor, w: te.Tensor, bias: te.Tensor | None = None,
           residual: te.Tensor | None = None, *, out: int, packed: bool,
           row_tile: int = 0) -> te.Tensor:
    """y = x @ W.T (+ bias) (+ residual) for x [rows, in]: W plain [out, in] or packed
    [out/16, in, 16]. The residual add is the decoder's skip connection fused as an epilogue
    (added after the bias, as the graph's separate add node would).

    With `row_tile` (packed prefill), the product is computed over [ceil(rows/tile), tile,
    padded out] with the rows past the end reading the last row again: every tile is whole, so
    the scheduled inner loops carry no bounds test (a predicated tile runs ~6x slower), and the
    epilogue (always present then) keeps the real rows and outputs."""
    k = te.reduce_axis((0, x.shape[-1]), name="k")
    rows = x.shape[0]
    width = pack_rows(out) * LANES if packed else out

    def weight(n):
        return w[n // LANES, k, n % LANES] if packed else w[n, k]

    if packed and row_tile:
        last = rows - 1
        # (rows - 1) // tile + 1, not (rows + tile - 1) // tile: the same number, but the form
        # TVM's region analysis matches with the epilogue's reads (else "not a stage pipeline")
        y = te.compute((tirx.floordiv(rows - 1, row_tile) + 1, row_tile, width),
                       lambda o, i, n: te.sum(x[tirx.min(o * row_tile + i, last), k] * weight(n),
                                              axis=k), name="matmul")

        def product(m, n):
            return y[m // row_tile, m % row_tile, n]
    else:
        # packed: the product covers the padded outputs too (zero weights), so the kernel's
        # inner loops are whole vectors; the epilogue drops the padding
        y = te.compute((rows, width), lambda m, n: te.sum(x[m, k] * weight(n), axis=k),
                       name="matmul")
        if bias is None and residual is None and width == out:
            return y

        def product(m, n):
            return y[m, n]

    return epilogue(product, rows, out, bias, residual)


def epilogue(product, rows, out, bias: te.Tensor | None, residual: te.Tensor | None) -> te.Tensor:
    """[rows, out] from `product(m, n)` plus the bias and the residual: the block named
    "epilogue" that the schedules inline into the product's loops."""
    def fepi(m, n):
        v = product(m, n)
        if bias is not None:
            v = v + bias[n]
        if residual is not None:
            v = residual[m, n] + v
        return v
    return te.compute((rows, out), fepi, name="epilogue")


def matmul(x: te.Tensor, w: te.Tensor) -> te.Tensor:
    """x @ w for a run-time w [in, out] (a constant w is lowered as a linear instead)."""
    k = te.reduce_axis((0, x.shape[-1]), name="k")
    return te.compute((*_rows(x), w.shape[1]),
                      lambda *i: te.sum(x[(*i[:-1], k)] * w[k, i[-1]], axis=k), name="matmul")


def embedding(ids: te.Tensor, table: te.Tensor, *, scale: float, packed: bool) -> te.Tensor:
    """table[ids] * scale; a packed table [vocab/16, hidden, 16] is read in place."""
    hidden = table.shape[1]

    def f(*i):
        v = ids[i[:-1]]
        row = table[v // LANES, i[-1], v % LANES] if packed else table[v, i[-1]]
        return row * tirx.const(scale, table.dtype) if scale != 1.0 else row
    return te.compute((*ids.shape, hidden), f, name="embedding")


def rms_norm(x: te.Tensor, w: te.Tensor | None, *, eps: float, offset: float,
             group: int) -> te.Tensor:
    """x / sqrt(mean(x^2) + eps) * (offset + w), over the last dim or over runs of `group`."""
    width = group or int(x.shape[-1])
    k = te.reduce_axis((0, width), name="k")
    rows = _rows(x)
    if group:
        ss = te.compute((*rows, int(x.shape[-1]) // group),
                        lambda *i: te.sum(x[(*i[:-1], i[-1] * group + k)]
                                          * x[(*i[:-1], i[-1] * group + k)], axis=k), name="sumsq")
    else:
        ss = te.compute(rows, lambda *i: te.sum(x[(*i, k)] * x[(*i, k)], axis=k), name="sumsq")
    dt = x.dtype

    def f(*i):
        j = (*i[:-1], i[-1] // group) if group else i[:-1]
        y = x[i] * te.rsqrt(ss[j] / tirx.const(width, dt) + tirx.const(eps, dt))
        if w is None:
            return y
        c = i[-1] % group if group else i[-1]
        return y * (w[c] + tirx.const(offset, dt)) if offset else y * w[c]
    return te.compute(x.shape, f, name="norm")


def binary(a: te.Tensor, b: te.Tensor, op: str) -> te.Tensor:
    """Broadcasting a + b or a * b (numpy rules, as ir.ops.broadcast)."""
    rank = max(len(a.shape), len(b.shape))

    def index(t: te.Tensor, i: tuple) -> tuple:
        lead = rank - len(t.shape)
        return tuple(0 if (isinstance(d, tirx.IntImm) and d.value == 1) else i[lead + n]
                     for n, d in enumerate(t.shape))

    shape = []
    for n in range(rank):
        da = a.shape[n - rank + len(a.shape)] if n >= rank - len(a.shape) else None
        db = b.shape[n - rank + len(b.shape)] if n >= rank - len(b.shape) else None
        one = lambda d: d is None or (isinstance(d, tirx.IntImm) and d.value == 1)  # noqa: E731
        shape.append(db if one(da) else da)

    def f(*i):
        x, y = a[index(a, i)], b[index(b, i)]
        return x + y if op == "add" else x * y
    return te.compute(shape, f, name=op)


def unary(x: te.Tensor, op: str, **attrs) -> te.Tensor:
    """silu, gelu (exact erf or tanh approximation), softcap, channel scale."""
    dt = x.dtype

    def c(v: float):
        return tirx.const(v, dt)

    if op == "silu":
        # x * sigmoid(x) = x / (1 + e^-x), with the vectorisable exp (attention.exp_f32)
        fn = lambda v: v / (c(1.0) + exp_f32(-v))  # noqa: E731
    elif op == "gelu" and attrs["approximate"] == "none":
        fn = lambda v: c(0.5) * v * (c(1.0) + te.erf(v * c(1.0 / math.sqrt(2.0))))  # noqa: E731
    elif op == "gelu":
        k = math.sqrt(2.0 / math.pi)
        fn = lambda v: c(0.5) * v * (c(1.0) + te.tanh(c(k) * (v + c(0.044715) * v * v * v)))  # noqa
    elif op == "softcap":
        cap = attrs["cap"]
        fn = lambda v: te.tanh(v / c(cap)) * c(cap)  # noqa: E731
    else:
        raise ValueError(op)
    return te.compute(x.shape, lambda *i: fn(x[i]), name=op)


def channel_scale(x: te.Tensor, s: te.Tensor) -> te.Tensor:
    return te.compute(x.shape, lambda *i: x[i] * s[i[-1]], name="channel_scale")


def rope_table(pos: te.Tensor, inv: te.Tensor, *, scale: float, dtype: str) -> te.Tensor:
    """cos and sin of position * inv_freq, computed in float64 and then rounded (as the
    reference does), times `scale`: [..., 2, rotary_dim/2]. One table serves every rotary node of
    the step that shares positions and frequencies."""
    def f(*i):
        ang = pos[i[:-2]].astype("float64") * inv[i[-1]].astype("float64")
        trig = tirx.if_then_else(i[-2] == 0, te.cos(ang), te.sin(ang))
        return (trig * tirx.const(scale, "float64")).astype(dtype)
    return te.compute((*pos.shape, 2, inv.shape[0]), f, name="rope_table")


def rotary(x: te.Tensor, table: te.Tensor, *, head_dim: int, rotary_dim: int,
           interleaved: bool) -> te.Tensor:
    """The rotary op on x [..., heads*head_dim] with a rope_table [..., 2, rotary_dim/2]."""
    rd = rotary_dim or head_dim
    half = rd // 2

    def f(*i):
        lead, ch = i[:-1], i[-1]
        d = ch % head_dim

        def cs(which, j):
            return table[(*lead, which, j)]

        if interleaved:
            p = d // 2
            even = x[i] * cs(0, p) - x[(*lead, ch + 1)] * cs(1, p)
            odd = x[i] * cs(0, p) + x[(*lead, ch - 1)] * cs(1, p)
            rot = tirx.if_then_else(d % 2 == 0, even, odd)
        else:
            first = x[i] * cs(0, d) - x[(*lead, ch + half)] * cs(1, d)
            second = x[i] * cs(0, d - half) + x[(*lead, ch - half)] * cs(1, d - half)
            rot = tirx.if_then_else(d < half, first, second)
        return rot if rd == head_dim else tirx.if_then_else(d < rd, rot, x[i])
    return te.compute(x.shape, f, name="rotary")


def hadamard_stage(x: te.Tensor, signs: te.Tensor, axis: int, norm: float,
                   scale: float) -> te.Tensor:
    """One Kronecker factor of a Hadamard transform: x viewed as [..., f1, .., fm] times the +-1
    matrix of factor `axis` along that axis; the last stage then multiplies by `norm` (1/sqrt(n))
    and by the op's `scale`, as two roundings in the reference's order."""
    f = int(signs.shape[0])
    r = te.reduce_axis((0, f), name="r")
    ax = len(x.shape) - 1 - axis if axis < 0 else axis

    def g(*i):
        src = (*i[:ax], r, *i[ax + 1:])
        v = te.sum(x[src] * signs[r, i[ax]], axis=r)
        return v
    y = te.compute(x.shape, g, name="hadamard")
    if norm == 1.0 and scale == 1.0:
        return y

    def fscale(*i):
        v = y[i] * tirx.const(norm, x.dtype)
        return v * tirx.const(scale, x.dtype) if scale != 1.0 else v
    return te.compute(x.shape, fscale, name="scale")
