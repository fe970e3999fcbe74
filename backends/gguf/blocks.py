"""llama.cpp's block formats from splice's quantized weights, and back.

A ggml block holds 32 consecutive weights of one row (`QK` = 32):
- Q4_0: d (float16), 16 bytes of 4-bit codes q; w = (q - 8) * d. Element j of the block is the low
  nibble of byte j, element j + 16 its high nibble (splice's MatMulNBits layout packs element k
  into byte k // 2 instead, so the nibbles are re-paired here).
- Q4_1: d (float16), m (float16), 16 bytes of codes as Q4_0; w = q * d + m.
- Q8_0: d (float16), 32 int8 codes c; w = c * d.

splice stores (q - z) * s with float32 s and z = 8 (4-bit symmetric), 128 (8-bit symmetric: c =
q - 128), or a float z (4-bit min-max, so m = -z * s). These functions take the codes and the
parameters exactly as the quantizer chose them and refuse parameters that float16 cannot hold
exactly (a scale that is not a float16 value would be rounded by the file, and the codes would no
longer be the codes splice optimised): quantize with scale_dtype = "float16" for this backend.
All arrays are numpy; rows are [N, K] with K a multiple of 32.
"""

from __future__ import annotations

import numpy as np

from splice.errors import InputError

QK = 32
TYPES = ("Q4_0", "Q4_1", "Q8_0", "F16", "F32")
BLOCK_BYTES = {"Q4_0": 2 + QK // 2, "Q4_1": 4 + QK // 2, "Q8_0": 2 + QK}
# the llama.cpp header's MIN_Q4_1: a Q4_1 minimum reproduces -z * s to this relative error
_MIN_REL = 1e-6


def _f16(x: np.ndarray, what: str) -> np.ndarray:
    """`x` as float16, refusing values that float16 does not hold exactly (or overflows)."""
    x = np.asarray(x, dtype=np.float32)
    h = x.astype(np.float16)
    bad = ~np.isfinite(h) | (h.astype(np.float32) != x)
    if bad.any():
        i = tuple(int(v) for v in np.argwhere(bad)[0])
        raise InputError(f"{what}: value {float(x[i])!r} at {list(i)} is not a float16 value; "
                         "llama.cpp stores block scales as float16: quantize with "
                         "scale_dtype = 'float16'")
    return h


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """Codes [N, B, 32] (0..15) -> bytes [N, B, 16]: element j low, element j + 16 high."""
    return (codes[..., :QK // 2] | (codes[..., QK // 2:] << 4)).astype(np.uint8)


def _blocks(codes: np.ndarray, scales: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    codes = np.asarray(codes)
    n, k = codes.shape
    if k % QK:
        raise InputError(f"{what}: {k} inputs per row; llama.cpp's block formats need a "
                         f"multiple of {QK}")
    scales = np.asarray(scales, dtype=np.float32)
    if scales.shape != (n, k // QK):
        raise InputError(f"{what}: scales {list(scales.shape)}, expected [{n}, {k // QK}] "
                         f"(groups of {QK})")
    return codes.reshape(n, k // QK, QK), scales


def pack_q4_0(codes: np.ndarray, scales: np.ndarray, what: str = "weight") -> np.ndarray:
    """Codes [N, K] in 0..15 and scales [N, K/32] (w = (q - 8) * s) -> Q4_0 bytes [N, K/32 * 18]."""
    q, s = _blocks(codes, scales, what)
    d = _f16(s, f"{what} scales").view(np.uint8).reshape(*s.shape, 2)
    out = np.concatenate([d, _nibbles(q.astype(np.uint8))], axis=-1)
    return out.reshape(q.shape[0], -1)


def pack_q4_1(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray,
              what: str = "weight") -> np.ndarray:
    """Codes [N, K] in 0..15, scales and float zero points [N, K/32] (w = (q - z) * s) -> Q4_1
    bytes [N, K/32 * 20], with m = -z * s, which must be a float16 value to 1e-6."""
    q, s = _blocks(codes, scales, what)
    m = (-np.asarray(zeros, dtype=np.float64) * s.astype(np.float64))
    mh = m.astype(np.float16)
    off = np.abs(mh.astype(np.float64) - m) > _MIN_REL * np.maximum(np.abs(m), 1e-30)
    if off.any() or not np.isfinite(mh).all():
        i = tuple(int(v) for v in np.argwhere(off | ~np.isfinite(mh))[0])
        raise InputError(f"{what}: the group minimum -z*s = {float(m[i])!r} at {list(i)} is not "
                         "a float16 value; llama.cpp's Q4_1 stores it as float16: quantize with "
                         "scale_dtype = 'float16' and float_zero_points")
    d = _f16(s, f"{what} scales").view(np.uint8).reshape(*s.shape, 2)
    out = np.concatenate([d, mh.view(np.uint8).reshape(*s.shape, 2),
                          _nibbles(q.astype(np.uint8))], axis=-1)
    return out.reshape(q.shape[0], -1)


def pack_q8_0(codes: np.ndarray, scales: np.ndarray, what: str = "weight") -> np.ndarray:
    """Signed codes [N, K] in -128..127 and scales [N, K/32] (w = c * s) -> Q8_0 bytes
    [N, K/32 * 34]."""
    c, s = _blocks(codes, scales, what)
    if c.min(initial=0) < -128 or c.max(initial=0) > 127:
        raise InputError(f"{what}: 8-bit codes outside -128..127")
    d = _f16(s, f"{what} scales").view(np.uint8).reshape(*s.shape, 2)
    out = np.concatenate([d, c.astype(np.int8).view(np.uint8)], axis=-1)
    return out.reshape(c.shape[0], -1)


def unpack(data: np.ndarray, kind: str, k: int) -> tuple[np.ndarray, ...]:
    """The inverse of the pack functions, bytes [N, K/32 * block] -> (codes [N, K], scales
    [N, K/32] float32) and for Q4_1 also the minimums m [N, K/32] float32. Q8_0 codes are int8."""
    data = np.asarray(data, dtype=np.uint8)
    n = data.shape[0]
    b = data.reshape(n, k // QK, BLOCK_BYTES[kind])
    d = np.ascontiguousarray(b[..., :2]).view(np.float16)[..., 0].astype(np.float32)
    if kind == "Q8_0":
        return np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(n, k), d
    head = 4 if kind == "Q4_1" else 2
    qs = b[..., head:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, k)
    if kind == "Q4_1":
        m = np.ascontiguousarray(b[..., 2:4]).view(np.float16)[..., 0].astype(np.float32)
        return codes, d, m
    return codes, d


def dequantize(data: np.ndarray, kind: str, k: int) -> np.ndarray:
    """Weights [N, K] float32 from block bytes, as ggml's reference dequantizers compute them."""
    parts = unpack(data, kind, k)
    n = parts[0].shape[0]
    q = parts[0].reshape(n, k // QK, QK).astype(np.float32)
    d = parts[1][..., None]
    if kind == "Q4_0":
        w = (q - 8) * d
    elif kind == "Q4_1":
        w = q * d + parts[2][..., None]
    else:
        w = q * d
    return w.reshape(n, k)
