"""Integer-activation product (the TVM backend's `activations="int8"` option): the
activations quantized to int8 per block, multiplied with the int4/int8 weight codes by x86's
byte dot products, the scales applied per block in float.

Semantics (what tests/backends/test_tvm_kernels.py checks exactly, to float32 rounding): the
input row x is split into activation blocks of `ab` channels (the weight's group size, or for
groups over 256 channels the largest of 256, 128, 64, 32 that divides it), padded with zeros to
whole weight groups; per block a = max |x|, d = a / 127 (1 where a is 0), xq = nearbyint(x / d)
(round half to even; |xq| <= 127). Then, per output n and block b of weight group g:

    y[n] = sum_b s[n, g] d_b sum_i (q_i - c) xq_i  -  sum_b (z[n, g] - c) s[n, g] d_b sum_i xq_i

with c = 0 for int4 (codes 0..15 meet xq directly) and c = 128 for int8 (codes - 128 are signed
bytes), which is sum_b s d sum_i (q_i - z) xq_i: the weight's own (q - z) s times the dequantized
activation xq d. The integer sums are exact; the float ones are float32 (the block terms summed
over 8 lanes, or 4 (below), then the lanes).

The machine code, x86 (`isa="avx2"`, every AVX2 CPU): per 32 weights, vpmaddubsw multiplies
unsigned bytes by signed bytes and adds adjacent pairs into 16 int16 sums. int4: 16 code bytes
become 32 unsigned nibbles (mask, shift, the two halves combined), the activations laid out to
meet them (within every 32 channels, the 16 even ones then the 16 odd ones); |sum| <= 2 * 15 *
127 per pair, so up to 8 chunks (256 channels, one activation block) add in int16 before one
vpmaddwd by ones widens them to 8 int32 sums. int8: the codes minus 128 are signed bytes w and
vpmaddubsw takes |xq| (unsigned) against sign(w, xq) (vpsignb), |pair| <= 2 * 128 * 127 < 2^15;
each chunk widens at once. Per block: the 8 int32 sums converted and FMA'd into 8 float lanes by
s d; the zero point's term is one scalar FMA per (output, block) against the block's
d sum xq (computed once per call with the quantization; with tiled zero points, one 4-wide FMA
for the tile's outputs). 4 outputs (one tile of quant.py's tiled layout) per task, parallel over
tasks, the rows (one in decode, a prefill chunk's) looped inside a task, so its weights come
from memory once and from L1 for the other rows. With the tiled layout a task prefetches the
codes and scales PREFETCH_AHEAD bytes on in its thread's stream, once per weight group.

x86, int4 in 16-byte chunks (groups of 32 and their odd multiples): two outputs share a register,
their 16 code bytes each side by side (one load in the tiled layout), the low nibbles against the
chunk's 16 even activations in both halves, the high ones against the 16 odd: lanes 0-3 hold the
first output's sums, 4-7 the second's, each scaled by its own s d (the tile's 4 scales times d in
one multiply), and an output's float sum is then over 4 lanes, not 8.

x86 with AVX-512 (`isa="vnni512"`: VNNI and BW), int4: the same on 512-bit registers, two
outputs' 32 code bytes a register in 32-byte chunks (groups of 64 and more: lanes 0-7 and 8-15),
the tile's four outputs' 16 bytes in 16-byte chunks (groups of 32: 4 lanes each); the same int32
lanes as AVX2's, so the same outputs bit for bit. int8 weights keep 256-bit registers.

x86 with VNNI (`isa="vnni"`: AVX-VNNI, or AVX-512 VNNI's 256-bit forms; export picks it where the
target CPU has it): vpdpbusd adds each lane's 4 unsigned-by-signed byte products into its int32
sum, in place of vpmaddubsw, the int16 stage and vpmaddwd, on the same operands (int4 nibbles;
int8 through the same sign trick). Each int32 lane sums the same 4 products as vpmaddwd's pairs
of pairs, so the sums, and the outputs, are AVX2's bit for bit. Zen 5, the kernel alone with its
weights in L2: 1.07-1.16x AVX2's over int4 g32-g256 and int8 g64 (a decode step from memory
~1.02x: there the weights' reads bound it).

aarch64 (`isa="neon"`, the dot-product extension of Armv8.2+: `sdot`): per 32 weights two
sdots, each 16 signed bytes times 16 into 4 int32 sums of 4 products; the int4 codes (0..15)
and the int8 codes minus 128 are signed bytes as they are, so both widths meet xq directly (no
sign trick, no int16 stage), in the same activation layout, the same 8 int32 sums a block (the
two sdots' 4 lanes side by side), and the same float epilogue: the integer sums are the x86
ones; only which products share a lane differs, so the float sums differ by rounding.
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx
from tvm.script import tirx as T

from .quant import TILE

ACT_MAX = 127
CHUNK = 32  # weights per vpmaddubsw (one 256-bit register of bytes)
OUTPUTS = TILE  # outputs per task: independent accumulator chains, one tile of the tiled layout
LANES = 8  # int32 / float32 lanes of one 256-bit register
LINE = 64  # bytes of a cache line
# how far ahead of its reads a task prefetches the tiled codes and scales, in bytes of codes: a
# step's weights come from memory (SmolLM2's 71 MB against 32 MB of L3), and a task's stream is
# too short for the hardware prefetcher to run ahead of it. SmolLM2 fastest decode measured
# 7.3 -> 5.6-6.0 ms at 1 thread, 5.4 -> 4.6 at 2 (4, 8 and 16 KB ahead alike within the noise)
PREFETCH_AHEAD = 8192


def act_block(group_size: int) -> int | None:
    """Channels per activation block for a weight group, or None when the group is not a
    multiple of 32 channels (such products keep float activations)."""
    if group_size % CHUNK:
        return None
    if group_size <= 256:
        return group_size
    return next(b for b in (256, 128, 64, 32) if group_size % b == 0)


def nibble_span(bits: int, ab: int) -> int:
    """int4: the channels whose codes one load unpacks, 64 (32 bytes: their low nibbles are the
    span's even channels, the high ones its odd channels) where the activation block is a multiple
    of 64 channels, else 32 (16 bytes, the two halves combined into one register)."""
    return 2 * CHUNK if bits == 4 and ab % (2 * CHUNK) == 0 else CHUNK


def _source(bits: int, p, span: int = CHUNK):
    """The input channel at position p of an activation block's stored order: for int4, within
    every `span` channels the even ones then the odd ones (the low nibbles then the high)."""
    if bits == 8:
        return p
    c, i, half = p // span, p % span, span // 2
    return c * span + (i % half) * 2 + i // half


def quantize_activations(x: te.Tensor, *, bits: int, blocks: int, group_size: int
                         ) -> list[te.Tensor]:
    """x [rows, in] -> xq int8 [rows, blocks * group_size] (int4: in the nibbles' order),
    d [rows, act blocks] and d * sum(xq) [rows, act blocks]."""
    rows, k_in = x.shape[0], int(x.shape[1])
    ab = act_block(group_size)
    nab = blocks * group_size // ab
    span = nibble_span(bits, ab)
    dt = x.dtype

    def xin(m, ch):
        if ch_static_ok(ch, k_in, blocks * group_size):
            return x[m, ch]
        return tirx.if_then_else(ch < k_in, x[m, tirx.min(ch, k_in - 1)], tirx.const(0.0, dt))

    r = te.reduce_axis((0, ab), name="r")
    amax = te.compute((rows, nab), lambda m, b: te.max(tirx.abs(xin(m, b * ab + r)), axis=r),
                      name="amax")
    d = te.compute((rows, nab), lambda m, b: tirx.Select(
        amax[m, b] == tirx.const(0.0, dt), tirx.const(1.0, dt),
        amax[m, b] / tirx.const(float(ACT_MAX), dt)), name="xscale")

    def code(m, p):
        b = p // ab
        v = tirx.nearbyint(xin(m, b * ab + _source(bits, p % ab, span)) / d[m, b])
        return tirx.max(tirx.min(v, tirx.const(float(ACT_MAX), dt)),
                        tirx.const(-float(ACT_MAX), dt))
    xqf = te.compute((rows, nab * ab), code, name="xcode")
    xq = te.compute((rows, nab * ab), lambda m, p: xqf[m, p].astype("int8"), name="xq")
    r2 = te.reduce_axis((0, ab), name="r2")
    sums = te.compute((rows, nab), lambda m, b: te.sum(xqf[m, b * ab + r2], axis=r2),
                      name="xqsum")
    dsum = te.compute((rows, nab), lambda m, b: d[m, b] * sums[m, b], name="xdsum")
    return [xq, d, dsum]


def ch_static_ok(ch, k_in: int, padded: int) -> bool:
    """True when every position is a real channel (no padding to test for)."""
    return padded == k_in


def _pmaddubs(u8, s8):
    return tirx.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", u8, s8)


def _pmaddwd(a16):
    return tirx.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", a16,
                                      tirx.Broadcast(tirx.const(1, "int16"), 16))


def _dpbusd(acc8, u8, s8):
    """acc8 (int32x8) plus VNNI's vpdpbusd: each lane adds its 4 unsigned-by-signed byte
    products (the lanes vpmaddubsw then vpmaddwd by ones would give, without the int16 stage)."""
    return tirx.call_llvm_pure_intrin("int32x8", "llvm.x86.avx512.vpdpbusd.256", acc8, u8, s8)


def _dpbusd512(acc16, u8, s8):
    """_dpbusd on 512-bit registers: 16 int32 lanes, 64 byte products."""
    return tirx.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc16, u8, s8)


def _psign(a, b):
    return tirx.call_llvm_pure_intrin("int8x32", "llvm.x86.avx2.psign.b", a, b)


def _sdot32(acc8, a32, b32):
    """acc8 (int32x8) plus aarch64's sdot of 32 signed bytes by 32: each half of acc8 takes one
    16-byte sdot (4 lanes of 4 products each)."""
    def half(v, which, lanes, dtype):
        return tirx.call_intrin(f"{dtype}x{lanes}", f"tirx.vector{which}", v)

    lo, hi = (tirx.call_llvm_pure_intrin(
        "int32x4", "llvm.aarch64.neon.sdot.v4i32.v16i8", half(acc8, which, 4, "int32"),
        half(a32, which, 16, "int8"), half(b32, which, 16, "int8")) for which in ("low", "high"))
    return tirx.call_intrin("int32x8", "tirx.vectorcombine", lo, hi)


# the integer dot products the product is written for: AVX2, VNNI on 256-bit registers (AVX-VNNI),
# VNNI on 512-bit ones (AVX-512 VNNI and BW), aarch64's sdot
ISAS = ("avx2", "vnni", "vnni512", "neon")


def qdot_decode(*, n_out: int, blocks: int, group_size: int, bits: int, zeros: str,
                zp_shape: tuple[int, ...] | None, tiled: bool = False, isa: str = "avx2",
                accumulate: bool = False):
    """The product's PrimFunc over (xq, [xa,] d, dsum, w, s, zp, y): y [rows, n_out] =
    the module docstring's sum; `accumulate`: y += it (y holds the residual on entry: the skip
    connection's add in place, `residual + product` as the separate epilogue computes it).
    `zeros`: "symmetric" (zp unused: pass the scales), "uint8" (int4 two per byte, low nibble
    first, or int8 one per byte) or "float". `tiled`: the codes
    and scales in quant.py's tiled layouts (a task's bytes contiguous, in the order it reads
    them; the padded outputs of a last partial tile are computed and not stored), else
    [n_out, blocks, bytes] and [n_out, blocks]. `isa`: one of ISAS: "avx2" (x86), "vnni" (x86 with
    VNNI), "vnni512" (x86 with AVX-512 VNNI and BW) or "neon" (aarch64 with the dot-product
    extension)."""
    assert isa in ISAS, isa
    neon = isa == "neon"
    ab = act_block(group_size)
    nab = blocks * group_size // ab
    per = ab // CHUNK  # chunks per activation block
    span = nibble_span(bits, ab)
    ratio = group_size // ab  # activation blocks per weight group
    width = group_size * bits // 8
    kp = blocks * group_size
    tasks = -(-n_out // OUTPUTS)
    last = n_out - 1
    c_off = 0 if bits == 4 else 128
    zdt = "float32" if zeros in ("symmetric", "float") else "uint8"
    sym_z = float((1 << (bits - 1)) - c_off)  # z - c for a symmetric weight: 8 or 0
    wshape = (tasks, blocks, OUTPUTS, width) if tiled else (n_out, blocks, width)
    sshape = (tasks, blocks, OUTPUTS) if tiled else (n_out, blocks)
    zshape = zp_shape if zp_shape is not None else sshape
    partial = tiled and n_out % OUTPUTS != 0
    quad = T.ramp(0, 1, OUTPUTS)
    lines = -(-OUTPUTS * width // LINE)  # cache lines of a tile's codes in one weight group
    ahead_s = PREFETCH_AHEAD // width  # scales: as many groups ahead as the codes (floats)
    wsize, ssize = (int(np.prod(shape)) for shape in (wshape, sshape))
    two = bits == 4 and span == 2 * CHUNK  # a chunk is 32 code bytes: low and high nibbles
    # x86, int4 in 16-byte chunks (groups of 32): two outputs' 16 code bytes a register, each
    # int32 lane an output's (lanes 0-3 the first, 4-7 the second), against the chunk's 16
    # activations repeated in both halves: half the unpacking and scaling of one output a
    # register (the kernel alone 1.47x, docs/tvm.md)
    # AVX-512, int4: the same on 512-bit registers, two outputs' 32 code bytes a register in
    # 32-byte chunks (groups of 64 and more; lanes 0-7 the first output's, 8-15 the second's),
    # or the tile's four outputs' 16 bytes in 16-byte chunks (4 lanes each)
    wide = isa == "vnni512" and bits == 4
    paired = bits == 4 and span == CHUNK and not neon and not wide
    outs = 4 if wide and not two else 2 if paired or wide else 1  # outputs an accumulator row
    row_lanes = 2 * LANES if wide else LANES  # its int32 lanes
    assert OUTPUTS == 4  # the epilogue writes its rows out
    units = OUTPUTS // outs  # accumulator rows
    R8, R16 = T.ramp(0, 1, LANES), T.ramp(0, 1, 16)

    def codes(w, t, j, g, start, n):
        """n code bytes of output t * OUTPUTS + j (clamped to the last in the plain layout),
        block g, from byte `start`."""
        if tiled:
            return w[t, g, j, T.ramp(start, 1, n)]
        return w[T.min(t * OUTPUTS + j, last), g, T.ramp(start, 1, n)]

    def scale(s, t, j, g):
        if tiled:
            return s[t, g, j]
        return s[T.min(t * OUTPUTS + j, last), g]

    def zc(zp, n, g):
        """z - c as float32."""
        if zeros == "symmetric":
            return tirx.const(sym_z, "float32")
        if zeros == "float":
            return zp[n, g] - tirx.const(float(c_off), "float32")
        if bits == 8:
            return (zp[n, g].astype("int32") - c_off).astype("float32")
        byte = zp[n, g // 2].astype("int32")
        return tirx.Select(g % 2 == 0, byte & 15, byte >> 4).astype("float32")

    def zc_tile(zp, t, g):
        """z - c of a tile's OUTPUTS outputs as one float32 vector (tiled zero points)."""
        if zeros == "symmetric":
            return tirx.Broadcast(tirx.const(sym_z, "float32"), OUTPUTS)
        if zeros == "float":
            return zp[t, g, quad] - tirx.Broadcast(tirx.const(float(c_off), "float32"), OUTPUTS)
        if bits == 8:
            return (zp[t, g, quad].astype(f"int32x{OUTPUTS}") - tirx.Broadcast(
                tirx.const(c_off, "int32"), OUTPUTS)).astype(f"float32x{OUTPUTS}")
        byte = zp[t, g // 2, quad].astype(f"int32x{OUTPUTS}")
        shift = tirx.Broadcast((g % 2 * 4).astype("int32"), OUTPUTS)
        return ((byte >> shift) & tirx.Broadcast(tirx.const(15, "int32"), OUTPUTS)).astype(
            f"float32x{OUTPUTS}")

    def low(v, n=CHUNK):
        """The low nibbles of n code bytes."""
        return v & tirx.Broadcast(tirx.const(15, "uint8"), n)

    def high(v, n=CHUNK):
        return v >> tirx.Broadcast(tirx.const(4, "uint8"), n)

    def unpack(v16):
        """16 code bytes -> 32 nibbles: the low ones, then the high ones."""
        return tirx.call_intrin("uint8x32", "tirx.vectorcombine", low(v16, 16), high(v16, 16))

    def operands(w, xq, t, j, m, b, c, nibbles=None):
        """The two byte vectors of output t * OUTPUTS + j's product with row m's xq in chunk c
        of activation block b: int4 codes unpacked (`nibbles` None: 16 bytes' low then high
        nibbles; "low" / "high": one half of 32 bytes), int8 codes minus 128 as signed bytes
        ws. x86 multiplies unsigned by signed bytes, so its int8 operands are |ws| (vpsignb(ws,
        ws) read as unsigned: -128 stays 0x80, which is 128) and xq with ws's sign (vpsignb(xq,
        ws)); aarch64's sdot takes both signed, as they are."""
        g, at = b // ratio, b * ab
        if bits == 4 and nibbles is None:
            wb = unpack(codes(w, t, j, g, (b % ratio) * (ab // 2) + c * 16, 16))
            xb = xq[m, T.ramp(at + c * CHUNK, 1, CHUNK)]
        elif bits == 4:
            v = codes(w, t, j, g, (b % ratio) * (ab // 2) + c * CHUNK, CHUNK)
            wb = low(v) if nibbles == "low" else high(v)
            xb = xq[m, T.ramp(at + c * span + (0 if nibbles == "low" else CHUNK), 1, CHUNK)]
        else:
            ws = tirx.reinterpret("int8x32", codes(w, t, j, g, (b % ratio) * ab + c * CHUNK,
                                                   CHUNK) ^ T.broadcast(T.uint8(128), CHUNK))
            xb = xq[m, T.ramp(at + c * CHUNK, 1, CHUNK)]
            if neon:
                return ws, xb
            return tirx.reinterpret("uint8x32", _psign(ws, ws)), _psign(xb, ws)
        return (tirx.reinterpret("int8x32", wb) if neon else wb), xb

    def combine(parts, dtype, lanes):
        """The vectors `parts` of `lanes` lanes each (a power of two of them) side by side."""
        while len(parts) > 1:
            lanes *= 2
            parts = [tirx.call_intrin(f"{dtype}x{lanes}", "tirx.vectorcombine", parts[i],
                                      parts[i + 1]) for i in range(0, len(parts), 2)]
        return parts[0]

    def shared_operands(w, xq, t, u, m, b, c, nibbles):
        """`paired` or `wide`: the low or high nibbles of chunk c of row u's `outs` outputs
        (4 row_lanes / outs code bytes each, side by side), and the chunk's activations they meet
        (its even channels or its odd ones), repeated once per output."""
        n = 4 * row_lanes // outs
        start = (b % ratio) * (ab // 2) + c * n
        v = combine([codes(w, t, outs * u + k, b // ratio, start, n) for k in range(outs)],
                    "uint8", n)
        x = xq[m, T.ramp(b * ab + c * 2 * n + (0 if nibbles == "low" else n), 1, n)]
        return (low(v, 4 * row_lanes) if nibbles == "low" else high(v, 4 * row_lanes)), combine(
            [x] * outs, "int8", n)

    def row_scale(s, t, u: int, g, dm):
        """s d of accumulator row u's lanes, row_lanes / outs lanes for each of its outputs. Tiled,
        the tile's 4 scales are multiplied by d at once, then spread; either way each lane's s d
        is the same float32 product."""
        n = row_lanes // outs
        if tiled:
            sd = s[t, g, quad] * T.broadcast(dm, OUTPUTS)
            return tirx.Shuffle([sd] * (row_lanes // OUTPUTS),
                                [outs * u + k for k in range(outs) for _ in range(n)])
        return combine([T.broadcast(scale(s, t, outs * u + k, g) * dm, n) for k in range(outs)],
                       "float32", n)

    def dot(acc, ops):
        """acc plus the products of the byte vectors ops: int16x16 pair sums (AVX2 int4),
        else int32x8 sums of 4 adjacent products."""
        if isa == "avx2" and bits == 4:
            return acc + _pmaddubs(*ops)
        if isa == "avx2":
            return acc + _pmaddwd(_pmaddubs(*ops))
        if neon:
            return _sdot32(acc, *ops)
        return _dpbusd(acc, *ops)

    def hsum(acc, accw, j):
        """Output j's row_lanes / outs lanes of its accumulator row (accw's where `wide`), summed
        pairwise."""
        n, buf = row_lanes // outs, accw if wide else acc
        v = [buf[j // outs, j % outs * n + i] for i in range(n)]
        while len(v) > 1:
            v = [v[i] + v[i + 1] for i in range(0, len(v), 2)]
        return v[0]

    @T.prim_func(private=True)
    def qdot(var_xq: T.handle, var_d: T.handle, var_ds: T.handle,
             w: T.Buffer(wshape, "uint8"), s: T.Buffer(sshape, "float32"),
             zp: T.Buffer(zshape, zdt), var_y: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True,
                     "splice.kernel": "qlinear_i8"})
        rows = T.int64()
        xq = T.match_buffer(var_xq, (rows, kp), "int8")
        d = T.match_buffer(var_d, (rows, nab), "float32")
        ds = T.match_buffer(var_ds, (rows, nab), "float32")
        y = T.match_buffer(var_y, (rows, n_out), "float32")
        wf = T.decl_buffer((wsize,), "uint8", data=w.data)
        sf = T.decl_buffer((ssize,), "float32", data=s.data)
        for t in T.parallel(tasks):
            for m in range(rows):
                acc = T.alloc_buffer((OUTPUTS, LANES), "float32")
                accw = T.alloc_buffer((OUTPUTS // 2, 2 * LANES), "float32")  # `wide`'s
                aw = T.alloc_buffer((OUTPUTS // 2, 2 * LANES), "int32")
                corr = T.alloc_buffer((OUTPUTS,), "float32")
                a16 = T.alloc_buffer((OUTPUTS, 16), "int16")
                a32 = T.alloc_buffer((OUTPUTS, LANES), "int32")
                for j in T.unroll(OUTPUTS):
                    acc[j, R8] = T.broadcast(T.float32(0), LANES)
                    corr[j] = T.float32(0)
                if wide:
                    for u in T.unroll(OUTPUTS // 2):
                        accw[u, R16] = T.broadcast(T.float32(0), 2 * LANES)
                for b in range(nab):
                    if tiled and m == 0 and b % ratio == 0:
                        # the bytes PREFETCH_AHEAD on in this thread's stream (the tiles run in
                        # order): a prefetch past the end is dropped, it never faults
                        for k in T.unroll(lines):
                            T.evaluate(T.call_intrin("void", "tirx.prefetch", T.address_of(wf[
                                (t * blocks + b // ratio) * OUTPUTS * width + PREFETCH_AHEAD
                                + k * LINE]), 0, 3, 1))
                        T.evaluate(T.call_intrin("void", "tirx.prefetch", T.address_of(sf[
                            (t * blocks + b // ratio) * OUTPUTS + ahead_s]), 0, 3, 1))
                    for j in T.unroll(units):
                        if bits == 4 and isa == "avx2":  # its int4 sums pass through int16
                            a16[j, R16] = T.broadcast(T.int16(0), 16)
                        if wide:
                            aw[j, R16] = T.broadcast(T.int32(0), 2 * LANES)
                        else:
                            a32[j, R8] = T.broadcast(T.int32(0), LANES)
                    for c in T.unroll(ab // span if bits == 4 else per):
                        for j in T.unroll(units):
                            if paired and isa == "avx2":
                                a16[j, R16] = a16[j, R16] + _pmaddubs(*shared_operands(
                                    w, xq, t, j, m, b, c, "low")) + _pmaddubs(*shared_operands(
                                        w, xq, t, j, m, b, c, "high"))
                            elif paired:
                                a32[j, R8] = _dpbusd(_dpbusd(a32[j, R8], *shared_operands(
                                    w, xq, t, j, m, b, c, "low")), *shared_operands(
                                    w, xq, t, j, m, b, c, "high"))
                            elif wide:
                                aw[j, R16] = _dpbusd512(_dpbusd512(aw[j, R16], *shared_operands(
                                    w, xq, t, j, m, b, c, "low")), *shared_operands(
                                    w, xq, t, j, m, b, c, "high"))
                            elif bits == 4 and isa == "avx2" and two:
                                a16[j, R16] = dot(dot(a16[j, R16], operands(
                                    w, xq, t, j, m, b, c, "low")), operands(
                                    w, xq, t, j, m, b, c, "high"))
                            elif bits == 4 and isa == "avx2":
                                a16[j, R16] = dot(a16[j, R16], operands(w, xq, t, j, m, b, c))
                            elif two:
                                a32[j, R8] = dot(dot(a32[j, R8], operands(
                                    w, xq, t, j, m, b, c, "low")), operands(
                                    w, xq, t, j, m, b, c, "high"))
                            else:
                                a32[j, R8] = dot(a32[j, R8], operands(w, xq, t, j, m, b, c))
                    if bits == 4 and isa == "avx2":
                        for j in T.unroll(units):
                            a32[j, R8] = _pmaddwd(a16[j, R16])
                    # the rows written out: row_scale's lane indices must be constants
                    if wide:
                        accw[0, R16] = accw[0, R16] + T.Cast("float32x16", aw[0, R16]) * \
                            row_scale(s, t, 0, b // ratio, d[m, b])
                        if units == 2:
                            accw[1, R16] = accw[1, R16] + T.Cast("float32x16", aw[1, R16]) * \
                                row_scale(s, t, 1, b // ratio, d[m, b])
                    else:
                        acc[0, R8] = acc[0, R8] + T.Cast("float32x8", a32[0, R8]) * row_scale(
                            s, t, 0, b // ratio, d[m, b])
                        acc[1, R8] = acc[1, R8] + T.Cast("float32x8", a32[1, R8]) * row_scale(
                            s, t, 1, b // ratio, d[m, b])
                    if units == 4:
                        acc[2, R8] = acc[2, R8] + T.Cast("float32x8", a32[2, R8]) * row_scale(
                            s, t, 2, b // ratio, d[m, b])
                        acc[3, R8] = acc[3, R8] + T.Cast("float32x8", a32[3, R8]) * row_scale(
                            s, t, 3, b // ratio, d[m, b])
                    if not tiled:
                        for j in T.unroll(OUTPUTS):
                            corr[j] = corr[j] + zc(zp, T.min(t * OUTPUTS + j, last), b // ratio) \
                                * scale(s, t, j, b // ratio) * ds[m, b]
                    if tiled:  # the zero points' terms of the tile's outputs as one vector
                        corr[quad] = corr[quad] + zc_tile(zp, t, b // ratio) * s[
                            t, b // ratio, quad] * T.broadcast(ds[m, b], OUTPUTS)
                for j in T.unroll(OUTPUTS):
                    if accumulate:  # each output once: no clamped rewrites of the last one
                        if t * OUTPUTS + j < n_out:
                            y[m, t * OUTPUTS + j] = y[m, t * OUTPUTS + j] + (
                                hsum(acc, accw, j) - corr[j])
                    elif partial:
                        if t * OUTPUTS + j < n_out:
                            y[m, t * OUTPUTS + j] = hsum(acc, accw, j) - corr[j]
                    else:
                        y[m, T.min(t * OUTPUTS + j, last)] = hsum(acc, accw, j) - corr[j]
    return qdot
