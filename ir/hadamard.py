"""Hadamard matrices and the fast transform, for the rotation (QuaRot, SpinQuant) and LinearPatch
passes.

An orthonormal Hadamard matrix H of order n has entries +-1/sqrt(n) and H @ H.T = I. The rotation
passes fold H (with random signs) into weights and leave an online `hadamard` op where an
activation must be rotated at run time; every backend must then apply *exactly* the matrix built
here, so the construction below is part of the IR's semantics, not an implementation detail.

The matrix of order n (`hadamard_matrix(n)`)
--------------------------------------------
Write n = o * 2^e with o odd. `factorize(n)` picks the smallest base order b = o * 2^j (j <= e)
that has a construction and returns [b, n // b] (or [n] when n is a power of two, or [b] when
b == n); then

    H_n = H_b (x) H_{n/b}      (Kronecker product, base factor outer, as QuaRot/QuIP# lay it out)

normalised by 1/sqrt(n). The power-of-two factor is Sylvester's H_{2^k}, entry (i, j) =
(-1)^popcount(i & j), which the O(n log n) butterfly computes; the base is applied as a small
dense matmul. Constructions of a base order b, tried in this order:

- Sylvester (J. J. Sylvester, 1867): b a power of two.
- Paley I (R. E. A. C. Paley, "On orthogonal matrices", 1933): b = q + 1, q prime, q = 3 mod 4.
  With the Jacobsthal matrix Q[i, j] = chi(j - i) (chi the quadratic character mod q),
  H = I + [[0, 1^T], [-1, Q]].
- Paley II (same paper): b = 2(q + 1), q prime, q = 1 mod 4. With the symmetric conference matrix
  C = [[0, 1^T], [1, Q]], H = C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]].
- Williamson (J. Williamson, "Hadamard's determinant theorem and the sum of four squares", 1944):
  b = 4m for the tabulated m in `_WILLIAMSON` (13, 23, 25, 29, 39, 43). Four symmetric circulant
  +-1 matrices A, B, C, D of order m with A^2 + B^2 + C^2 + D^2 = 4m I fill the Williamson array.
  The sequences for 39 and 43 are the first rows of the circulant blocks of had.156.will and
  had.172.will in N. J. A. Sloane's library of Hadamard matrices (the matrices QuaRot and QuIP#
  ship); those for 13, 23, 25, 29 were found by an exhaustive meet-in-the-middle search over
  symmetric sequences with a[0] = +1, grouped by row sums s with sum s^2 = 4m. Any valid set gives
  a Hadamard matrix; the tests check each.

Only prime q are handled (no GF(p^k) arithmetic), and base orders stop at `MAX_BASE` = 1024: a
dense base larger than that is no longer a fast transform. The bases up to 172 (P1 = Paley I,
P2 = Paley II, W = Williamson) are 12 (P1, q=11), 20 (P1), 28 (P2, q=13), 36 (P2, q=17), 44 (P1),
52 (W), 60 (P1), 68 (P1), 76 (P2, q=37), 84 (P1), 92 (W), 100 (W), 108 (P1), 116 (W),
124 (P2, q=61), 132 (P1), 140 (P1), 148 (P2, q=73), 156 (W), 164 (P1), 172 (W); so every
n = o * 2^e with o odd <= 43 and e >= 2 is covered (every multiple of 4 up to 172; SmolLM2
576 = 36*16, 1536 = 12*128; LLaMA-2 11008 = 172*64; Qwen2.5 4864 = 76*64), plus larger odd parts
wherever a Paley prime q < MAX_BASE exists (`supported_bases()` lists them). Orders n = 2 mod 4
(n > 2) and odd n > 1 have no Hadamard matrix at all.

Extending the rule must not change the matrix of any order already covered: add constructions
only for base orders that had none, or a saved module would silently change meaning.

Conventions
-----------
Transforms act on the last dim as a right multiplication, y = x @ H (rows are samples, as in
torch.nn.Linear's input). `random_hadamard(n, seed)` returns Q = diag(s) @ H with s random +-1, so
x @ Q = fwht(x * s): the signs act first, on the input channels, and fold into the weight that
produces x, leaving the online op deterministic (QuaRot's random_hadamard_matrix also puts the
signs on the rows of H).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence

import torch

from .core import IRError

logger = logging.getLogger(__name__)

MAX_BASE = 1024

# Williamson sequences: first rows of the symmetric circulant A, B, C, D of order m (base 4m).
_WILLIAMSON: dict[int, tuple[str, str, str, str]] = {
    13: ("+-----++-----", "+-+--++++--+-", "+++-+----+-++", "+-++--++--++-"),
    23: ("+-----++-+-++-+-++-----", "++-+--+++--++--+++--+-+", "+++++----+-++-+----++++",
         "++-+-+++-++--++-+++-+-+"),
    25: ("+++-----+--+--+--+-----++", "+-+---++---+--+---++---+-", "++++-+-+----++----+-+-+++",
         "++--+--+-+++--+++-+--+--+"),
    29: ("+-+----++++--+--+--++++----+-", "+-+-+--+-++-++--++-++-+--+-+-",
         "+++++--++---+-++-+---++--++++", "+---+++-++++++--++++++-+++---"),
    39: ("+++--+-+-----+--++----++--+-----+-+--++", "++++---+--++----+-+--+-+----++--+---+++",
         "+++--++-+---+-+--+----+--+-+---+-++--++", "+---++-+-+-----+++-++-+++-----+-+-++---"),
    43: ("+---++--++++-+-+++-++--++-+++-+-++++--++---",
         "++-++++++----+-+--++-++-++--+-+----++++++-+",
         "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
         "++---++++-+--+--++--------++--+--+-++++---+"),
}


# -- number theory -----------------------------------------------------------------------------

def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    f = 2
    while f * f <= q:
        if q % f == 0:
            return False
        f += 1
    return True


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _construction(b: int) -> str | None:
    """Which construction builds base order b (see the module docstring for the order tried)."""
    if _is_pow2(b):
        return "sylvester"
    if b > MAX_BASE or b % 4:
        return None
    if _is_prime(b - 1) and (b - 1) % 4 == 3:
        return "paley1"
    if _is_prime(b // 2 - 1) and (b // 2 - 1) % 4 == 1:
        return "paley2"
    if b // 4 in _WILLIAMSON:
        return "williamson"
    return None


# -- the +-1 integer matrices ------------------------------------------------------------------

def _sylvester(p: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.int8)
    h2 = torch.tensor([[1, 1], [1, -1]], dtype=torch.int8)
    while h.shape[0] < p:
        h = torch.kron(h2, h)
    return h


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i), chi the quadratic character (Legendre symbol) mod prime q."""
    chi = torch.tensor([0] + [1 if pow(a, (q - 1) // 2, q) == 1 else -1 for a in range(1, q)],
                       dtype=torch.int8)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley1(q: int) -> torch.Tensor:
    s = torch.zeros(q + 1, q + 1, dtype=torch.int8)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return s + torch.eye(q + 1, dtype=torch.int8)


def _paley2(q: int) -> torch.Tensor:
    c = torch.zeros(q + 1, q + 1, dtype=torch.int8)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    # C's zeros are its diagonal: each becomes [[1, -1], [-1, -1]], each +-1 becomes +-H_2
    h2 = torch.tensor([[1, 1], [1, -1]], dtype=torch.int8)
    diag = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int8)
    return torch.kron(c, h2) + torch.kron(torch.eye(q + 1, dtype=torch.int8), diag)


def _williamson(m: int) -> torch.Tensor:
    """The Williamson array [[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]]; its
    off-diagonal block products cancel because symmetric circulants commute."""
    idx = torch.arange(m)
    shift = (idx[None, :] - idx[:, None]) % m

    def circulant(row: str) -> torch.Tensor:
        first = torch.tensor([1 if ch == "+" else -1 for ch in row], dtype=torch.int8)
        return first[shift]

    a, b, c, d = (circulant(r) for r in _WILLIAMSON[m])
    return torch.cat([torch.cat(r, dim=1) for r in (
        (a, b, c, d), (-b, a, -d, c), (-c, d, a, -b), (-d, -c, b, a))], dim=0)


@functools.lru_cache(maxsize=None)
def _base_signs(b: int) -> torch.Tensor:
    """The +-1 int8 matrix of base order b, cached: callers must not modify it."""
    kind = _construction(b)
    if kind == "sylvester":
        return _sylvester(b)
    if kind == "paley1":
        return _paley1(b - 1)
    if kind == "paley2":
        return _paley2(b // 2 - 1)
    if kind == "williamson":
        return _williamson(b // 4)
    raise IRError(f"no Hadamard construction of base order {b}")


# -- factorisation -----------------------------------------------------------------------------

def _check_n(n: int, what: str = "n") -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise IRError(f"Hadamard order {what} must be a positive integer, got {n!r}")


def factorize(n: int) -> list[int] | None:
    """The Kronecker factors [base, 2^k] of `hadamard_matrix(n)` ([n] when n is a power of two or
    itself the base), or None when no construction is known for n."""
    _check_n(n)
    if _is_pow2(n):
        return [n]
    odd, e = n, 0
    while odd % 2 == 0:
        odd, e = odd // 2, e + 1
    for j in range(2, e + 1):
        b = odd << j
        if _construction(b) is not None:
            return [b] if b == n else [b, n // b]
    return None


FACTOR_SPLITS = ("halves", "greedy")


def kronecker_factors(n: int, *, max_factor: int = 64, split: str = "halves") -> list[int] | None:
    """`factorize(n)` with its power of two above `max_factor` split further, or None when no
    matrix of order n exists. Sylvester's H_2^k is a Kronecker power of H_2, so any split into
    powers of two is the same matrix; a backend applying the factors one axis at a time does
    n * sum(factors) multiply-adds. `split`: "halves" cuts it once into two near-equal powers of
    two, the larger first (the ONNX backend's MatMul factors); "greedy" peels off `max_factor`
    while the rest exceeds it, then the rest (the TVM backend's stages)."""
    if split not in FACTOR_SPLITS:
        raise ValueError(f"split={split!r}; accepted: {', '.join(FACTOR_SPLITS)}")
    factors = factorize(n)
    if factors is None:
        return None
    out = []
    for f in factors:
        if f > max_factor and _is_pow2(f):
            if split == "halves":
                hi = 1 << ((f.bit_length() - 1 + 1) // 2)
                out += [hi, f // hi]
                continue
            while f > max_factor:
                out.append(max_factor)
                f //= max_factor
        out.append(f)
    return [f for f in out if f > 1] or [1]


def supported_bases(limit: int = 256) -> list[int]:
    """The base orders up to `limit` that `factorize` can pick: non-powers of two with a
    construction and no smaller base for the same odd part (24 has one, but 12 always wins)."""
    return [b for b in range(12, min(limit, MAX_BASE) + 1, 4)
            if not _is_pow2(b) and factorize(b) == [b]]


def _unsupported(n: int) -> IRError:
    return IRError(
        f"no Hadamard matrix of order {n} can be built: supported are powers of two and "
        f"b * 2^k for base orders b in {supported_bases()} (and larger Paley orders q+1, q prime "
        f"= 3 mod 4, or 2(q+1), q prime = 1 mod 4, up to {MAX_BASE}); orders 2 mod 4 and odd "
        f"orders above 2 have none. Use allow_block=True for a block-diagonal transform, or "
        f"random_orthogonal() for a dense one")


def largest_block(n: int) -> int:
    """n itself when `factorize(n)` succeeds, else the largest divisor of n with a construction:
    the block size of `hadamard_matrix(n, allow_block=True)`. Raises when that is 1 (odd n)."""
    _check_n(n)
    if factorize(n) is not None:
        return n
    divisors = {d for k in range(1, math.isqrt(n) + 1) if n % k == 0 for d in (k, n // k)}
    best = max(d for d in divisors if factorize(d) is not None)
    if best == 1:
        raise IRError(f"no Hadamard block larger than 1 divides {n}: {_unsupported(n)}")
    return best


# -- dense matrices ----------------------------------------------------------------------------

def _signs(n: int) -> torch.Tensor:
    factors = factorize(n)
    if factors is None:
        raise _unsupported(n)
    h = _base_signs(factors[0]) if not _is_pow2(factors[0]) else _sylvester(factors[0])
    for f in factors[1:]:
        h = torch.kron(h, _sylvester(f))
    return h


def hadamard_matrix(n: int, *, allow_block: bool = False,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The orthonormal Hadamard matrix of order n (entries +-1/sqrt(n)) built as the module
    docstring describes. With allow_block, an n without a construction gets the block-diagonal
    I_(n/m) (x) H_m for m = `largest_block(n)` (still orthogonal, entries +-1/sqrt(m))."""
    _check_n(n)
    if not dtype.is_floating_point:
        raise IRError(f"hadamard_matrix: dtype must be floating point, got {dtype}")
    if factorize(n) is None and allow_block:
        m = largest_block(n)
        logger.debug("hadamard_matrix(%d): block-diagonal, %d blocks of %d", n, n // m, m)
        block = _signs(m).to(torch.float64) / math.sqrt(m)
        return torch.block_diag(*([block] * (n // m))).to(dtype)
    return (_signs(n).to(torch.float64) / math.sqrt(n)).to(dtype)


def random_hadamard(n: int, seed: int, *, allow_block: bool = False) -> torch.Tensor:
    """Q = diag(s) @ H in float64, s in {-1, +1}^n drawn from a torch.Generator seeded with `seed`.

    Applied as x @ Q = fwht(x * s) (with allow_block, the block transform of x * s): the signs act
    on the input channels first and fold into the weight producing x, leaving the online op the
    deterministic H. The signs scale the rows of H as in QuaRot's random_hadamard_matrix (after
    QuIP#'s randomised Hadamard transform)."""
    _check_n(n)
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 2, (n,), generator=g, dtype=torch.int64).to(torch.float64) * 2 - 1
    return s[:, None] * hadamard_matrix(n, allow_block=allow_block)


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal matrix in float64 for orders with no Hadamard construction: QR of
    a seeded Gaussian with R's diagonal signs moved into Q (Mezzadri, "How to generate random
    matrices from the classical compact groups", 2007), so the result is unique per seed."""
    _check_n(n)
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    d = torch.sign(torch.diagonal(r))
    d[d == 0] = 1
    return q * d


# -- fast transform ----------------------------------------------------------------------------

def _butterfly_(y: torch.Tensor) -> torch.Tensor:
    """In place: y <- y @ H_p (Sylvester, unnormalised) over the contiguous last dim of size p.
    Each stage applies [[1, 1], [1, -1]] to one bit of the index; O(p log p)."""
    p = y.shape[-1]
    h = 1
    while h < p:
        v = y.view(*y.shape[:-1], p // (2 * h), 2, h)
        a = v[..., 0, :].clone()
        v[..., 0, :] += v[..., 1, :]
        v[..., 1, :].neg_().add_(a)
        h *= 2
    return y


def _check_factors(n: int, factors: Sequence[int] | None) -> list[int]:
    if factors is None:
        found = factorize(n)
        if found is None:
            raise _unsupported(n)
        return found
    factors = list(factors)
    if not all(isinstance(f, int) and not isinstance(f, bool) for f in factors):
        raise IRError(f"fwht: factors must be integers, got {factors!r}")
    if math.prod(factors) != n:
        raise IRError(f"fwht: factors {factors} multiply to {math.prod(factors)}, not the last "
                      f"dim {n}")
    for f in factors:
        if f < 1 or _construction(f) is None:
            raise IRError(f"fwht: factor {f} has no Hadamard construction; {_unsupported(f)}")
    return factors


def fwht(x: torch.Tensor, factors: Sequence[int] | None = None) -> torch.Tensor:
    """x @ H over the last dim, H = kron(H_f for f in factors) / sqrt(n), without forming H.

    `factors` defaults to `factorize(n)`, for which the result equals x @ hadamard_matrix(n).
    Power-of-two factors run the butterfly, other factors a dense matmul with their base matrix,
    each along its own axis of x viewed as [..., f1, f2, ...]. Computes in x's dtype, except that
    float16/bfloat16 accumulate in float32 (thousands of +-1 terms would lose bits and could
    overflow float16), as fast-hadamard-transform kernels do; the result has x's dtype."""
    if not x.is_floating_point() or x.dim() == 0:
        raise IRError(f"fwht: x must be a floating-point tensor with a last dim, got "
                      f"{x.dtype}{list(x.shape)}")
    n = x.shape[-1]
    factors = _check_factors(n, factors)
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    lead = x.shape[:-1]
    y = x.to(compute).reshape(-1, *factors).clone()
    for axis, f in enumerate(factors, start=1):
        if f == 1:
            continue
        y = y.movedim(axis, -1).contiguous()
        if _is_pow2(f):
            _butterfly_(y)
        else:
            y = y @ _base_signs(f).to(compute)
        y = y.movedim(-1, axis)
    y = y.reshape(*lead, n) * (1.0 / math.sqrt(n))
    return y.to(x.dtype)


def hadamard_transform(x: torch.Tensor, size: int, *, block: int = 0, group: int = 0,
                       scale: float = 1.0) -> torch.Tensor:
    """The `hadamard` op's semantics: y = (x @ H) * scale over the last dim, where H is
    hadamard_matrix(size) (block = 0) or I (x) hadamard_matrix(block) (block > 0, dividing size),
    applied to the whole last dim (group = 0, last dim == size) or to each of its `group` runs of
    `size` channels (last dim == group * size; per attention head)."""
    check_hadamard_attrs(x.shape[-1], size, block, group)
    width = block or size
    y = fwht(x.reshape(*x.shape[:-1], x.shape[-1] // width, width))
    if scale != 1.0:
        y = y * torch.tensor(scale, dtype=y.dtype)
    return y.reshape(x.shape)


def check_hadamard_attrs(last_dim: object, size: int, block: int, group: int) -> None:
    """Raise IRError unless the attributes describe a transform that exists for this last dim."""
    if not isinstance(last_dim, int):
        raise IRError(f"hadamard: the last dim must be a known integer, got {last_dim!r}")
    if size < 1:
        raise IRError(f"hadamard: size must be a positive integer, got {size}")
    if group < 0 or block < 0:
        raise IRError(f"hadamard: group and block must be >= 0, got group={group}, block={block}")
    expected = group * size if group else size
    if last_dim != expected:
        raise IRError(f"hadamard: last dim is {last_dim}, expected {expected} "
                      f"(size {size}" + (f" x group {group})" if group else ")"))
    if block:
        if size % block:
            raise IRError(f"hadamard: block {block} does not divide size {size}")
        if factorize(block) is None:
            raise _unsupported(block)
    elif factorize(size) is None:
        hint = (f"set block to {largest_block(size)} for a block-diagonal transform"
                if size % 2 == 0 else "no block-diagonal transform exists either")
        raise IRError(f"hadamard: size {size} has no full construction ({hint}). "
                      f"{_unsupported(size)}")
