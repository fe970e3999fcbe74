"""The rotations that the rotate pass folds into weights: Q = diag(s) (I_group (x) H), H a Hadamard
matrix of ir.hadamard's construction (full, or block-diagonal), s random signs drawn from a seed.

Q is never formed: `apply_hadamard` multiplies by H one small Kronecker factor at a time, in
float64, and `_Rotation` applies Q to a weight's input or output side a chunk of rows at a time.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from splice.ir.hadamard import factorize, hadamard_matrix

CHUNK = 1 << 20  # elements of a weight rotated at once (8 MiB in float64)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """The signs s of `random_hadamard(n, seed)` = diag(s) @ H, drawn the same way, so the pass
    can apply x @ Q = fwht(x * s) without forming Q (a test checks the two agree)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g, dtype=torch.int64).to(torch.float64) * 2 - 1


def kron_factors(n: int) -> list[int]:
    """Kronecker factors of hadamard_matrix(n): factorize(n)'s [base, 2^k] with 2^k split into
    near-equal powers of two of at most 64 (Sylvester's H_(2^(a+b)) = H_(2^a) (x) H_(2^b))."""
    out: list[int] = []
    for f in factorize(n) or []:
        if f & (f - 1) == 0:
            while f > 64:
                hi = 1 << ((f.bit_length() - 1 + 1) // 2)
                out.append(hi)
                f //= hi
        out.append(f)
    return out


def apply_hadamard(x: torch.Tensor, n: int) -> torch.Tensor:
    """x @ hadamard_matrix(n) for x [rows, n]: one small matmul per Kronecker factor, cycling the
    factor axes (x @ (A (x) B) = A^T X B). For weight-sized float64 x on one CPU thread this
    is 1.3-1.5x faster than ir.hadamard.fwht's butterfly (measured at n = 576 and 1536) and
    launches 2-3 BLAS calls instead of ~4 log2(n) elementwise kernels, which matters most when
    the cores are oversubscribed; the two agree to float64 rounding (a test checks it against
    the dense matrix)."""
    rows = x.shape[0]
    y = x
    for f in reversed(kron_factors(n)):
        h = hadamard_matrix(f, dtype=x.dtype)
        y = (y.reshape(-1, f) @ h).reshape(rows, n // f, f).transpose(1, 2).reshape(rows, n)
    return y


@dataclasses.dataclass(frozen=True)
class _Rotation:
    """Right-multiplication by diag(signs) (I_group (x) H): `size` channels per group, H of order
    `size` (block = 0) or block-diagonal of order-`block` blocks."""

    size: int
    block: int
    signs: torch.Tensor | None
    group: int = 0

    def right(self, x: torch.Tensor) -> torch.Tensor:
        """x @ Q over the last dim (x in float64), a few rows at a time so that rotating a large
        embedding table needs one extra copy of it, not several."""
        width = self.block or self.size
        signs = None
        if self.signs is not None:
            signs = self.signs.repeat(self.group) if self.group else self.signs
        flat = x.reshape(-1, x.shape[-1])
        out = torch.empty_like(flat)
        step = max(1, CHUNK // flat.shape[1])
        for i in range(0, flat.shape[0], step):
            rows = flat[i:i + step] if signs is None else flat[i:i + step] * signs
            out[i:i + step] = apply_hadamard(rows.reshape(-1, width), width).reshape(rows.shape)
        return out.reshape(x.shape)

    def input_side(self, w: torch.Tensor) -> torch.Tensor:
        """W Q: a linear reading a rotated input (W is [out, in]); also an embedding table E Q."""
        return self.right(w)

    def output_side(self, w: torch.Tensor) -> torch.Tensor:
        """Q^T W (W [out, in]); for a bias (1-D), b Q."""
        return self.right(w) if w.dim() == 1 else self.right(w.T).T

    def record(self) -> dict[str, Any]:
        width = self.block or self.size
        return {"size": self.size, "factors": factorize(width), "block": self.block,
                **({"heads": self.group} if self.group else {})}
