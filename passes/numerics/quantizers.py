"""The weight quantizers of the quantize_weights pass: they choose the codes, scales and zero points
that fill the `qlinear` format (splice.ir.quant, whose docstring gives the layout), for one weight
at a time. Used by passes only; the IR needs the format, not how it was filled.

Quantizers (all math on float64 tensors, scales rounded to float32 before codes are computed, so
the stored (codes, scale) pair is exactly what was optimised; with scale_dtype = torch.float16 the
scales, and the minimums of the float-zero grid, are rounded to float16 values instead, as
llama.cpp's Q4_0, Q4_1 and Q8_0 blocks store them, so that the codes chosen are the codes such a
file holds):
- `group_params`: min/max asymmetric (range widened to hold 0, as GPTQ's quantizer does);
  symmetric, for 4 bits the signed-max rule of llama.cpp's Q4_0 and ONNX Runtime's MatMulNBits
  quantizer (the group's value of largest magnitude m, scale = m / -8, so m is code 0 exactly and
  the grid [-8, 7] * scale is used whole, the scale negative when m is positive), for 8 bits
  absmax (scale = 2 * absmax / 255, z = 128: GPTQ's symmetric grid, positive scales, which QDQ
  consumers such as the HTP take); or min-max with a float zero point (range [min, max], not
  widened to 0); each shrunk by a clip ratio. A partial last group is padded by repeating its
  last value, which changes no range. On SmolLM2-135M (W4 RTN, WikiText-2, 2044 tokens in
  512-token windows; float32 30.96) symmetric g32 went from 51.3 (absmax) to 41.0 (signed max),
  asymmetric g32 is 45.0; at g128, 65.1 -> 54.6, asymmetric 50.1.
- `clip_search`: per group, the clip ratio in a grid from 1.0 down to 0.7 that minimises the
  squared error of the group (the MSE grid search of GPTQ's and AWQ's quantizers).
- `rtn`: round to nearest.
- `gptq`: GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization
  for Generative Pre-trained Transformers", ICLR 2023), from the paper's Algorithm 1 and its
  reference code: Cholesky factor of the damped inverse Hessian, lazy batched updates of
  `block_size` columns, optional act-order (columns by decreasing diag(H)). With act-order and
  groups the groups are static (their parameters fixed from the unquantized weight before any
  update, in the original column order), because MatMulNBits has no portable g_idx: groups stay
  contiguous runs of K, which the packed layout requires.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from splice.ir.core import IRError
from splice.ir.quant import (check_format, pack_weight, pack_zero_points, pad_edge, pad_zeros,
                             zero_point_default)

CLIP_GRID = tuple(1.0 - 0.02 * i for i in range(16))  # 1.00, 0.98, ..., 0.70


@dataclasses.dataclass
class QuantizedWeight:
    """Codes [N, K] (uint8), scales [N, n_blocks] (float32) and zero points [N, n_blocks] (uint8,
    or float32 with float_zero) of one weight, before packing."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool
    float_zero: bool = False

    def dequantize(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        n, k = self.codes.shape
        blocks = self.scales.shape[1]
        q = pad_zeros(self.codes.to(dtype), blocks * self.group_size).reshape(n, blocks, -1)
        w = (q - self.zeros.to(dtype)[..., None]) * self.scales.to(dtype)[..., None]
        return w.reshape(n, -1)[:, :k]

    def rows(self, start: int, stop: int) -> QuantizedWeight:
        return dataclasses.replace(self, codes=self.codes[start:stop],
                                  scales=self.scales[start:stop], zeros=self.zeros[start:stop])

    def rel_error(self, weight: torch.Tensor) -> float:
        """||dequantize() - weight|| / ||weight|| in float64, a block of rows at a time."""
        n, k = self.codes.shape
        chunks = _row_chunks(n, k)
        err = ref = 0.0
        for i in chunks:
            w = weight[i:i + chunks.step].detach().to(torch.float64)
            err += float((self.rows(i, i + chunks.step).dequantize() - w).square().sum())
            ref += float(w.square().sum())
        if ref == 0:  # an all-zero weight: exact, or infinitely off
            return 0.0 if err == 0 else math.inf
        return math.sqrt(err / ref)

    def packed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(B, scales, zero points or None when symmetric) in the MatMulNBits layout."""
        zp = None if self.symmetric else self.zeros.to(torch.float32).contiguous() \
            if self.float_zero else pack_zero_points(self.zeros, self.bits)
        return (pack_weight(self.codes, self.bits, self.group_size),
                self.scales.to(torch.float32).contiguous(), zp)


def group_params(w: torch.Tensor, bits: int, symmetric: bool, ratio: float | torch.Tensor = 1.0,
                 float_zero: bool = False, scale_dtype: torch.dtype = torch.float32
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) over the last dim of `w` [..., g] (float64), the range shrunk by `ratio`.
    Scales are rounded to `scale_dtype` values (float32, or float16 for llama.cpp's blocks);
    zeros are integers (as float64), or float32 values with float_zero (the range [min, max]
    itself, shrunk about its middle; with float16 scales the minimum is a float16 value m and the
    zero -m / scale, so that -zero * scale is m again to float32 rounding)."""
    maxq = (1 << bits) - 1
    if float_zero:
        lo, hi = w.min(-1).values, w.max(-1).values
        mid, half = (hi + lo) / 2, (hi - lo) / 2 * ratio
        lo, hi = mid - half, mid + half
        scale = ((hi - lo) / maxq).to(scale_dtype).to(torch.float64)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        if scale_dtype != torch.float32:
            lo = lo.to(scale_dtype).to(torch.float64)
        zero = (-lo / scale).to(torch.float32).to(torch.float64)
        return scale, zero
    if symmetric and bits == 4:
        m = torch.gather(w, -1, w.abs().argmax(-1, keepdim=True))[..., 0] * ratio
        scale = torch.where(m == 0, torch.ones_like(m), m / -float(zero_point_default(bits)))
        zero = torch.full_like(scale, float(zero_point_default(bits)))
        return _round_scale(scale, scale_dtype), zero
    lo = torch.clamp(w.min(-1).values, max=0.0) * ratio
    hi = torch.clamp(w.max(-1).values, min=0.0) * ratio
    if symmetric:
        amax = torch.maximum(lo.abs(), hi)
        scale = 2.0 * amax / maxq
        scale = torch.where(amax == 0, torch.ones_like(scale), scale)
        zero = torch.full_like(scale, float(zero_point_default(bits)))
    else:
        empty = (lo == 0) & (hi == 0)
        lo = torch.where(empty, -torch.ones_like(lo), lo)
        hi = torch.where(empty, torch.ones_like(hi), hi)
        scale = (hi - lo) / maxq
        zero = torch.clamp(torch.round(-lo / scale), 0, maxq)
    return _round_scale(scale, scale_dtype), zero


SCALE_DTYPES = (torch.float32, torch.float16)


def _round_scale(scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The scale rounded to a `dtype` value (as float64), never 0 and never infinite."""
    if dtype not in SCALE_DTYPES:
        raise IRError(f"scale dtype {dtype}; accepted: float32, float16")
    info = torch.finfo(dtype)
    scale = scale.clamp(-info.max, info.max).to(dtype).to(torch.float64)
    return torch.where(scale == 0, torch.full_like(scale, info.tiny), scale)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   bits: int) -> torch.Tensor:
    """Codes clamp(round(w / scale + zero)) (float64, integer-valued); scale and zero broadcast."""
    return torch.clamp(torch.round(w / scale + zero), 0, (1 << bits) - 1)


def clip_search(w: torch.Tensor, bits: int, symmetric: bool, grid: tuple[float, ...] = CLIP_GRID,
                float_zero: bool = False, scale_dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) for each group of `w` [..., g] with the clip ratio of `grid` that gives the
    smallest squared error of that group (scales in `scale_dtype`, as group_params)."""
    best_scale, best_zero = group_params(w, bits, symmetric, grid[0], float_zero, scale_dtype)
    best_err = _group_error(w, best_scale, best_zero, bits)
    for r in grid[1:]:
        scale, zero = group_params(w, bits, symmetric, r, float_zero, scale_dtype)
        err = _group_error(w, scale, zero, bits)
        better = err < best_err
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
        best_err = torch.where(better, err, best_err)
    return best_scale, best_zero


def _group_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int):
    s, z = scale[..., None], zero[..., None]
    return ((quantize_codes(w, s, z, bits) - z) * s - w).pow(2).sum(-1)


def _params(w: torch.Tensor, bits: int, symmetric: bool, clip: bool, float_zero: bool = False,
            scale_dtype: torch.dtype = torch.float32):
    if clip:
        return clip_search(w, bits, symmetric, float_zero=float_zero, scale_dtype=scale_dtype)
    return group_params(w, bits, symmetric, float_zero=float_zero, scale_dtype=scale_dtype)


def _result(codes, scales, zeros, bits, group_size, symmetric, float_zero) -> QuantizedWeight:
    zeros = zeros.to(torch.float32) if float_zero else zeros.to(torch.uint8)
    return QuantizedWeight(codes.to(torch.uint8), scales.to(torch.float32), zeros, bits,
                           group_size, symmetric, float_zero)


def fitted_group(group: int, k: int) -> int:
    """`group` fitted to `k` inputs (fit_groups): one group per row where k <= group, else the
    largest group that divides k, halving from `group` down to 16 (MatMulNBits' smallest block),
    so that no block is padded; `group` itself (a partial last group) where none divides."""
    if k <= group:
        return k
    g = group
    while g > 16 and k % g:
        g //= 2
    return g if k % g == 0 else group


def _check_float_zero(bits: int, symmetric: bool, float_zero: bool) -> None:
    if float_zero and (symmetric or bits != 4):
        raise IRError(f"float zero points need asymmetric 4-bit quantization (MatMulNBits has no "
                      f"8-bit form with float zero points); got bits={bits}, symmetric={symmetric}")


# RTN and its error work on this many weight elements at a time: rows are independent, and a whole
# float64 copy of an embedding-sized table (with the clip search's temporaries) is what a large
# model's compile cannot spare
ROW_CHUNK_ELEMENTS = 1 << 22


def _row_chunks(n: int, k: int) -> range:
    return range(0, n, max(1, ROW_CHUNK_ELEMENTS // max(k, 1)))


def rtn(weight: torch.Tensor, bits: int, group_size: int, *, symmetric: bool = False,
        clip: bool = False, float_zero: bool = False,
        scale_dtype: torch.dtype = torch.float32) -> QuantizedWeight:
    """Round-to-nearest quantization of `weight` [N, K] in groups of `group_size` along K, in
    float64, a block of rows at a time; scales rounded to `scale_dtype` values first."""
    n, k = weight.shape
    blocks = check_format(bits, group_size, k, n)
    _check_float_zero(bits, symmetric, float_zero)
    step = _row_chunks(n, k).step
    parts = []
    for i in range(0, n, step):
        w = pad_edge(weight[i:i + step].detach().to(torch.float64), blocks * group_size)
        w = w.reshape(-1, blocks, group_size)
        scale, zero = _params(w, bits, symmetric, clip, float_zero, scale_dtype)
        codes = quantize_codes(w, scale[..., None], zero[..., None], bits)
        parts.append(_result(codes.reshape(w.shape[0], -1)[:, :k], scale, zero, bits, group_size,
                             symmetric, float_zero))
    if len(parts) == 1:
        return parts[0]
    return dataclasses.replace(parts[0], codes=torch.cat([p.codes for p in parts]),
                               scales=torch.cat([p.scales for p in parts]),
                               zeros=torch.cat([p.zeros for p in parts]))


@dataclasses.dataclass
class GPTQInfo:
    damp: float          # the dampening actually used, relative to mean(diag(H))
    dead_inputs: int     # columns whose Hessian diagonal was zero
    # round to nearest on the same group parameters (act-order's static groups, computed from the
    # weight before any update) when no input is dead: equal to rtn() with the same settings, so
    # a caller comparing the two need not search the clip ratios a second time
    rtn: QuantizedWeight | None = None


def gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, *,
         symmetric: bool = False, clip: bool = False, damp: float = 0.01, act_order: bool = False,
         block_size: int = 128, float_zero: bool = False,
         scale_dtype: torch.dtype = torch.float32) -> tuple[QuantizedWeight, GPTQInfo]:
    """GPTQ of `weight` [N, K] against the Hessian `hessian` [K, K] (2 X^T X of its inputs, any
    positive scale); every group's scale is rounded to `scale_dtype` before its codes are chosen
    and its error is propagated. Dead inputs (zero diagonal) get diagonal 1 and a zero weight column; when the
    damped Hessian is still not positive definite the dampening is multiplied by 10 (up to 1.0).
    A partial last group is padded with copies of the last column that no input multiplies (a
    Hessian row and column of zeros, diagonal at the mean): they take no part in the updates."""
    n, k0 = weight.shape
    blocks = check_format(bits, group_size, k0, n)
    _check_float_zero(bits, symmetric, float_zero)
    if hessian.shape != (k0, k0):
        raise IRError(f"gptq: Hessian is {list(hessian.shape)}, expected [{k0}, {k0}]")
    k = blocks * group_size
    W = pad_edge(weight.detach().to(torch.float64), k).clone()
    H = torch.zeros(k, k, dtype=torch.float64)
    H[:k0, :k0] = hessian.detach().to(torch.float64)
    real_dead = int((torch.diag(H)[:k0] == 0).sum())
    if k > k0:  # padding: dead columns at the mean diagonal, so the dampening is unchanged
        mean = torch.diag(H)[:k0].mean()
        pad = torch.arange(k0, k)
        H[pad, pad] = mean if mean > 0 else 1.0
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    static = rtn_same = None
    if act_order and group_size < k:
        static = _params(W.reshape(n, blocks, group_size), bits, symmetric, clip, float_zero,
                         scale_dtype)
        if real_dead == 0:  # W is still the padded weight itself: this is rtn()'s result
            rounded = quantize_codes(W.reshape(n, blocks, group_size), static[0][..., None],
                                     static[1][..., None], bits)
            rtn_same = _result(rounded.reshape(n, -1)[:, :k0], *static, bits, group_size,
                               symmetric, float_zero)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(k)
    W, H = W[:, perm], H[perm][:, perm]
    hinv, used = _inverse_cholesky(H, damp)
    Q = torch.zeros_like(W)
    scales = torch.zeros(n, blocks, dtype=torch.float64)
    zeros = torch.zeros(n, blocks, dtype=torch.float64)
    scale = zero = None
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        E1 = torch.zeros_like(W1)
        Hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // group_size
            if static is not None:
                scale, zero = static[0][:, g], static[1][:, g]
            elif (i1 + i) % group_size == 0:
                # this group's columns as updated so far: the rest of this block, then the next
                ahead = torch.cat((W1[:, i:], W[:, i2:]), dim=1)[:, :group_size]
                scale, zero = _params(ahead, bits, symmetric, clip, float_zero, scale_dtype)
                scales[:, g], zeros[:, g] = scale, zero
            w = W1[:, i]
            q = quantize_codes(w, scale, zero, bits)
            Q1[:, i] = q
            err = (w - (q - zero) * scale) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            E1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= E1 @ hinv[i1:i2, i2:]
    if static is not None:
        scales, zeros = static
    codes = Q[:, torch.argsort(perm)][:, :k0]
    return (_result(codes, scales, zeros, bits, group_size, symmetric, float_zero),
            GPTQInfo(damp=used, dead_inputs=real_dead, rtn=rtn_same))


def _inverse_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """The upper Cholesky factor of (H + damp * mean(diag H) I)^-1, and the damp that worked."""
    mean = torch.diag(H).mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    d = damp
    while True:
        L, info = torch.linalg.cholesky_ex(H + d * mean * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return U, d
        if d >= 1.0:
            raise IRError(f"gptq: the Hessian is not positive definite even with dampening {d}; "
                          "the calibration inputs are degenerate")
        d = min(1.0, d * 10)


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor, xtx: torch.Tensor) -> float:
    """||X W^T - X A^T|| / ||X W^T|| from X^T X alone (Frobenius norms; bias cancels)."""
    w = weight.to(torch.float64)
    d = w - approx.to(torch.float64)
    num = torch.einsum("nk,kl,nl->", d, xtx, d)
    den = torch.einsum("nk,kl,nl->", w, xtx, w)
    if den <= 0:
        return 0.0 if num <= 0 else math.inf
    return math.sqrt(max(num.item(), 0.0) / den.item())


def shared_solve(solved: tuple[QuantizedWeight, dict[str, Any]] | None, shape: tuple[int, int],
                 bits: int, group: int, symmetric: bool, float_zero: bool,
                 reduce: Callable[[torch.Tensor], torch.Tensor]
                 ) -> tuple[QuantizedWeight, dict[str, Any]]:
    """One linear's GPTQ result (weight `shape` [N, K]) on every rank (quantize_weights across
    processes): the rank that solved it (`solved`) contributes its codes, scales, zero points and
    report numbers, the others zeros of the same shapes, and one sum over the ranks (x + 0 = x,
    exactly) hands everyone the solver's result bit for bit. So each GPTQ solve runs once, not
    once per rank."""
    n, k = shape
    blocks = check_format(bits, group, k, n)
    keys = ("rel_error", "rtn_rel_error", "damp", "dead_inputs")
    if solved is None:
        codes = torch.zeros(n, k, dtype=torch.int32)
        scales = torch.zeros(n, blocks, dtype=torch.float32)
        zeros = torch.zeros(n, blocks, dtype=torch.float32 if float_zero else torch.int32)
        numbers = torch.zeros(len(keys), dtype=torch.float64)
    else:
        qw, entry = solved
        codes, scales = qw.codes.to(torch.int32), qw.scales
        zeros = qw.zeros if float_zero else qw.zeros.to(torch.int32)
        numbers = torch.tensor([float(entry[key]) for key in keys], dtype=torch.float64)
    codes, scales, zeros, numbers = (reduce(t) for t in (codes, scales, zeros, numbers))
    qw = QuantizedWeight(codes.to(torch.uint8), scales,
                         zeros if float_zero else zeros.to(torch.uint8), bits, group, symmetric,
                         float_zero)
    entry = dict(zip(keys, numbers.tolist()))
    entry["dead_inputs"] = int(entry["dead_inputs"])
    return qw, entry
