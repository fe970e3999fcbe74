"""Block-quantized weights: the storage format of the `qlinear` op, and the `quantize` op's semantics.

Format (exactly ONNX Runtime's com.microsoft MatMulNBits layout, so the ONNX backend passes the
tensors through untouched). A weight W [N = out_features, K = in_features] is cut along K into
n_blocks = ceil(K / group_size) groups (the last one partial when group_size does not divide K, as
MatMulNBits allows: SmolLM2's K = 576 in groups of 128 is 4 full groups and one of 64); each group
of each row has a float32 scale and a zero point z (integer; float for 4-bit min-max, below), and
holds codes q in [0, 2^bits - 1]

    W[n, k] ~= (q[n, k] - z[n, k // group_size]) * scale[n, k // group_size]

- packed weight B: uint8 [N, n_blocks, group_size * bits / 8]; 4-bit codes two per byte along K,
  the even k in the low nibble (element k of a block sits in byte k // 2, bits 4 * (k % 2)); the
  tail of a partial last block holds zero codes that no product reads.
- scales: float32 [N, n_blocks].
- zero points: uint8 [N, ceil(n_blocks * bits / 8)], packed like B along the blocks (4-bit: two
  per byte, low nibble first, the last nibble of an odd row count is padding); absent for
  symmetric quantization, where z = 2^(bits-1) (8 or 128), MatMulNBits' default; or, for 4-bit
  only, float32 [N, n_blocks] unpacked (MatMulNBits' zero points of A's type): the min-max grid
  (q - z) * s = q * s + min of llama.cpp's Q4_1 and HQQ, which an integer z cannot express.

The quantizers that fill it (round to nearest, GPTQ) are numerics of the quantize_weights pass
and live beside it (passes/numerics/quantizers.py); this module is what the IR, its interpreter and
the backends need: the format, packing, and the activation quantization semantics.

Activations: `fake_quantize` is the `quantize` op's semantics (dynamic per token or per group of
channels, static per tensor or per channel), `static_params` turns a calibrated range into its
scale and zero point.
"""

from __future__ import annotations

import math

import torch

from .core import IRError

BITS = (4, 8)


def check_format(bits: int, group_size: int, in_features: int, out_features: int) -> int:
    """n_blocks for this format, or an IRError naming what is wrong and what is accepted."""
    if bits not in BITS:
        raise IRError(f"int{bits} is not supported; bits must be 4 or 8")
    if in_features <= 0 or out_features <= 0:
        raise IRError(f"in_features {in_features} and out_features {out_features} must be positive")
    if group_size <= 0 or (group_size * bits) % 8:
        raise IRError(f"group_size {group_size} with {bits}-bit codes does not fill whole bytes; "
                      "group_size must be a positive even number (32, 64, 128, or in_features)")
    if group_size > in_features:
        raise IRError(f"group_size {group_size} exceeds in_features {in_features}; use a smaller "
                      "group, or per-channel groups (group_size = in_features)")
    return -(-in_features // group_size)


def pad_zeros(t: torch.Tensor, width: int) -> torch.Tensor:
    """`t` [..., K] padded with zeros to `width` along the last dim."""
    k = t.shape[-1]
    return t if k == width else torch.nn.functional.pad(t, (0, width - k))


def pad_edge(t: torch.Tensor, width: int) -> torch.Tensor:
    """`t` [..., K] padded to `width` by repeating its last column (no group range changes)."""
    k = t.shape[-1]
    return t if k == width else torch.cat((t, t[..., -1:].expand(*t.shape[:-1], width - k)), -1)


def zero_point_default(bits: int) -> int:
    return 1 << (bits - 1)


# -- packing ---------------------------------------------------------------------------------------

def _pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [..., n] (integers in [0, 2^bits)) -> uint8 [..., n * bits / 8], low nibble first."""
    q = q.to(torch.uint8)
    if bits == 8:
        return q.contiguous()
    if q.shape[-1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    return (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous()


def _unpack_codes(p: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The inverse of _pack_codes: uint8 [..., bytes] -> codes uint8 [..., n]."""
    if bits == 8:
        return p[..., :n]
    lo, hi = p & 0x0F, p >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)[..., :n]


def pack_weight(codes: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Codes [N, K] -> B uint8 [N, ceil(K / group_size), group_size * bits / 8]."""
    n, k = codes.shape
    blocks = check_format(bits, group_size, k, n)
    return _pack_codes(pad_zeros(codes, blocks * group_size).reshape(n, blocks, group_size), bits)


def unpack_weight(packed: torch.Tensor, bits: int, group_size: int,
                  in_features: int | None = None) -> torch.Tensor:
    """B uint8 [N, n_blocks, blob] -> codes uint8 [N, in_features] (default n_blocks * group)."""
    n, blocks, _ = packed.shape
    codes = _unpack_codes(packed, bits, group_size).reshape(n, blocks * group_size)
    return codes if in_features is None else codes[:, :in_features]


def pack_zero_points(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points [N, n_blocks] -> uint8 [N, ceil(n_blocks * bits / 8)]."""
    return _pack_codes(zeros, bits)


def unpack_zero_points(packed: torch.Tensor, bits: int, n_blocks: int) -> torch.Tensor:
    return _unpack_codes(packed, bits, n_blocks)


def zero_points_shape(out_features: int, n_blocks: int, bits: int) -> tuple[int, int]:
    return (out_features, math.ceil(n_blocks * bits / 8))


def dequantize(packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
               bits: int, group_size: int, dtype: torch.dtype = torch.float32,
               in_features: int | None = None) -> torch.Tensor:
    """W [N, in_features] in `dtype` from the packed format: (q - z) * scale, groupwise."""
    n, blocks, _ = packed.shape
    q = unpack_weight(packed, bits, group_size).reshape(n, blocks, group_size)
    if zero_points is None:
        z = torch.full((n, blocks), zero_point_default(bits), dtype=torch.uint8)
    elif zero_points.is_floating_point():
        z = zero_points.reshape(n, blocks)
    else:
        z = unpack_zero_points(zero_points.reshape(n, -1), bits, blocks)
    s = scales.reshape(n, blocks).to(dtype)
    w = (q.to(dtype) - z.to(dtype)[..., None]) * s[..., None]
    w = w.reshape(n, blocks * group_size)
    return w if in_features is None else w[:, :in_features]


# -- activation fake quantization (the `quantize` op) ----------------------------------------------

ACT_MODES = ("dynamic_per_token", "static_per_tensor", "static_per_channel")


def act_qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range of the codes: signed [-2^(b-1), 2^(b-1) - 1] or unsigned [0, 2^b - 1]."""
    if symmetric:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def fake_quantize(x: torch.Tensor, *, mode: str, bits: int, symmetric: bool, group: int = 0,
                  clip_ratio: float = 1.0, scale: torch.Tensor | None = None,
                  zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize `x` over its last dim; the semantics of the `quantize` op.

    dynamic_per_token: a scale (and zero point) per token, or per run of `group` channels of each
    token (per head), from the value's own range: symmetric s = clip * max|x| / (2^(b-1) - 1),
    codes clamp(round(x / s), -2^(b-1), 2^(b-1) - 1); asymmetric over [min(x, 0), max(x, 0)] * clip,
    s = range / (2^b - 1), z = clamp(round(-lo / s)), codes clamp(round(x / s) + z, 0, 2^b - 1).
    A zero range gives s = 1. static_*: the given scale (and zero point) per tensor or per channel.
    y = (codes - z) * s. The float operations are in this order in every backend."""
    lo_q, hi_q = act_qrange(bits, symmetric)
    if mode == "dynamic_per_token":
        shape = x.shape
        xg = x.reshape(*shape[:-1], shape[-1] // group, group) if group else x
        if symmetric:
            s = xg.abs().amax(-1, keepdim=True) * (clip_ratio / hi_q)
            s = torch.where(s == 0, torch.ones_like(s), s)
            y = torch.clamp(torch.round(xg / s), lo_q, hi_q) * s
        else:
            lo = torch.clamp(xg.amin(-1, keepdim=True), max=0.0)
            hi = torch.clamp(xg.amax(-1, keepdim=True), min=0.0)
            s = (hi - lo) * (clip_ratio / hi_q)
            s = torch.where(s == 0, torch.ones_like(s), s)
            z = torch.clamp(torch.round(-(lo * clip_ratio) / s), lo_q, hi_q)
            y = (torch.clamp(torch.round(xg / s) + z, lo_q, hi_q) - z) * s
        return y.reshape(shape)
    if mode not in ACT_MODES or scale is None:
        raise IRError(f"quantize: mode {mode!r} needs a scale; modes: {', '.join(ACT_MODES)}")
    s = scale.to(x.dtype)
    z = torch.zeros((), dtype=x.dtype) if zero_point is None else zero_point.to(x.dtype)
    return (torch.clamp(torch.round(x / s) + z, lo_q, hi_q) - z) * s


def static_params(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool,
                  clip_ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Static (scale float32, zero point uint8 or None) from a calibrated range [lo, hi]
    (per tensor: 0-d tensors; per channel: [C])."""
    lo_q, hi_q = act_qrange(bits, symmetric)
    lo = torch.clamp(lo.to(torch.float64), max=0.0) * clip_ratio
    hi = torch.clamp(hi.to(torch.float64), min=0.0) * clip_ratio
    if symmetric:
        s = torch.maximum(-lo, hi) / hi_q
    else:
        s = (hi - lo) / hi_q
    s = torch.where(s == 0, torch.ones_like(s), s).to(torch.float32)
    if symmetric:
        return s, None
    z = torch.clamp(torch.round(-lo / s.double()), lo_q, hi_q).to(torch.uint8)
    return s, z
