"""Lowering strategies for the `hadamard` op, and the choice between them by size.

Four ways to compute y = (x @ H) * scale in standard ONNX, all exactly splice.ir.hadamard's H:

- "matmul": one MatMul by the dense orthonormal matrix (an initializer of order `block or size`,
  normalisation and scale folded in); a block-diagonal or per-head transform reshapes x into its
  runs first, so the initializer stays [width, width] rather than a mostly-zero [size, size].
- "two_sided": H = H_a (x) H_b with b a power of two of at most 256 and a at most 256
  (`two_sided_split`); x's runs viewed as X [..., a, b] give y = A^T X B', B' = B * scale /
  sqrt(width): a Reshape, a MatMul on the last axis, one by A^T from the left (broadcast over the
  leading dims) and a Reshape back, no transpose. Widths with no such split take "kron".
- "kron": the Kronecker factors of H as small MatMuls, one per axis of x viewed as [f1, .., fm]
  (`lower_hadamard_kron`, factors of at most 64), each followed by a Transpose that cycles the
  axes.
- "fwht": the fast Walsh-Hadamard transform: x viewed as [..., base, 2, 2, .., 2]; each of the
  log2(2^k) butterfly stages splits one axis of size 2 into a and b and concatenates a + b and
  a - b back; the non-power-of-two base factor is one broadcast MatMul from the left
  (x @ (A (x) B) = A^T X B for X the [base, 2^k] view).

`choose_strategy` is what `lower_hadamard` picks. Measured with ONNX Runtime 1.32's CPU provider,
one intra-op thread, all graph optimisations on, float32, on the project's shared 2-core x86-64
build machine (`python -m benchmarks.hadamard`): the fastest of 7 batches of 60 calls of a graph
holding only the op, microseconds a call (x of shape [1, tokens, width]):

     width tokens   matmul two_sided    kron    fwht
        16      1      3.2       4.0     4.0    10.7
        64      1      3.4       4.1     4.1    15.0
       128      1      3.6       4.5     4.9    17.5
       128     64     10.7      14.3    12.1    54.6
       256      1      5.1       4.4     4.9    21.2
       256     64     33.1      15.1    16.4    95.7
       576      1     15.1       4.6     5.3    14.0
       576     64    159.1      28.8    36.4   162.8
      1536      1     94.5       6.1     6.6    25.4
      1536     64   1145.5     120.6    85.1   500.7
      2048      1    179.0       6.1     6.9    37.7
      2048     64   2371.0     122.6   142.1   772.6
      4096      1   1439.7       8.5     9.7    52.0
      4096     64  10528.6     287.4   333.0  1636.1
     11008      1        -      23.9    28.4    76.9
     11008     64        -    1305.2  1573.0  4077.8

The dense MatMul wins up to width 128 (one kernel, normalisation folded in); from 256 on the
factored forms do n * sum(f_i) multiply-adds instead of n^2, and the two-sided one does it in
two MatMuls where "kron" needs a MatMul and a Transpose per factor. One token (a decode step)
is the case that repeats, and there two_sided is the fastest everywhere from 256 on; inside a
whole model the difference is larger than alone (every node also costs the executor's
dispatch): in SmolLM2-135M pruned to 26 layers with R4 (1536 = 12 x 128), a decode step took
0.14 ms more with two-sided transforms than with none, 0.26 ms more with "kron". The exception
is a 64-token prefill at 1536, where the left MatMul by the 12 x 12 factor runs as 64 tiny
products (121 against 85 us); a prefill is once a prompt. The butterfly never wins in ONNX
Runtime: each of its log2(n) stages is four nodes and a full pass over the tensor; it is kept as
an explicit strategy (`hadamard_rule("fwht")`) for runtimes without a fast small MatMul.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from splice.backends.common import hadamard_factors, hadamard_signs
from splice.ir.core import Node
from splice.ir.hadamard import factorize, hadamard_matrix
from .context import LoweringContext, LoweringError, Rule

STRATEGIES = ("matmul", "two_sided", "kron", "fwht")

# widths (block or size) up to this take the dense MatMul, larger ones the two-sided product
DENSE_MAX = 128
# a power-of-two Hadamard factor above this is split in two near-equal powers of two (Sylvester's
# H_2^k is the Kronecker product of smaller ones), so each dense factor of "kron" costs at most
# this many multiply-adds per element
MAX_DENSE_FACTOR = 64


def _keep(rank: int) -> list[int]:
    return [0] * rank


def _width(node: Node) -> int:
    return node.attrs["block"] or node.attrs["size"]


def choose_strategy(width: int) -> str:
    """The strategy `lower_hadamard` uses for a transform of order `width` (see the module
    docstring for the measurement behind it)."""
    if width <= DENSE_MAX:
        return "matmul"
    return "two_sided" if two_sided_split(width) is not None else "kron"


def _runs(ctx: LoweringContext, node: Node, width: int) -> tuple[ir.Value, int]:
    """x viewed as [..., runs, width] (x itself when the last dim is one run), and x's rank."""
    rank = len(node.inputs[0].shape)
    x = ctx.input(node, 0)
    if node.inputs[0].shape[-1] == width:
        return x, rank
    return ctx.op("Reshape", [x, ctx.ints(*_keep(rank - 1), -1, width)]), rank


def _back(ctx: LoweringContext, node: Node, y: ir.Value, rank: int) -> ir.Value:
    if node.inputs[0].shape[-1] == _width(node):
        return y
    return ctx.op("Reshape", [y, ctx.ints(*_keep(rank - 1), -1)])


def lower_hadamard_matmul(ctx: LoweringContext, node: Node) -> Sequence[ir.Value]:
    """One MatMul by the dense [width, width] matrix H * scale (float32, rounded once)."""
    width = _width(node)
    scale = node.attrs["scale"]
    key = ("hadamard_dense", width, scale)
    if key not in ctx.cache:
        h = (hadamard_matrix(width).numpy() * scale).astype(np.float32)
        ctx.cache[key] = ctx.const(h)
    x, rank = _runs(ctx, node, width)
    return [_back(ctx, node, ctx.op("MatMul", [x, ctx.cache[key]]), rank)]


def lower_hadamard_fwht(ctx: LoweringContext, node: Node) -> Sequence[ir.Value]:
    """Butterfly stages of Split/Add/Sub/Concat over x viewed as [..., base, 2, .., 2], the base
    factor as one MatMul by its +-1 matrix from the left, then 1/sqrt(width) * scale."""
    width = _width(node)
    factors = factorize(width)
    if factors is None:
        raise LoweringError(f"no Hadamard matrix of order {width}")
    base = factors[0] if len(factors) > 1 or factors[0] & (factors[0] - 1) else 1
    p = width // base
    k = p.bit_length() - 1
    rank = len(node.inputs[0].shape)
    lead = rank - 1
    y = ctx.op("Reshape", [ctx.input(node, 0), ctx.ints(*_keep(lead), -1, base, *([2] * k))])
    axes0 = lead + 2  # the first axis of size 2 (after the runs axis and the base axis)
    for j in range(k):
        a, b = ctx.op("Split", [y, ctx.ints(1, 1)], {"axis": axes0 + j}, outputs=2)
        y = ctx.op("Concat", [ctx.op("Add", [a, b]), ctx.op("Sub", [a, b])], {"axis": axes0 + j})
    if base > 1:
        key = ("hadamard_base_T", base)
        if key not in ctx.cache:
            ctx.cache[key] = ctx.const(np.ascontiguousarray(hadamard_signs(base).T))
        y = ctx.op("Reshape", [y, ctx.ints(*_keep(lead), -1, base, p)])
        y = ctx.op("MatMul", [ctx.cache[key], y])
    y = ctx.op("Reshape", [y, ctx.ints(*_keep(lead), -1)])
    y = ctx.op("Mul", [y, ctx.const(1.0 / np.sqrt(width))])
    if node.attrs["scale"] != 1.0:
        y = ctx.op("Mul", [y, ctx.const(node.attrs["scale"])])
    return [y]


# the two-sided form's right factor is a dense MatMul of at most this order, its left one of at
# most TWO_SIDED_MAX_LEFT (larger widths take the Kronecker factors)
TWO_SIDED_MAX_RIGHT = 256
TWO_SIDED_MAX_LEFT = 256


def two_sided_split(width: int) -> tuple[int, int] | None:
    """(a, b) with width = a * b, H = H_a (x) H_b, b the largest power of two of at most
    TWO_SIDED_MAX_RIGHT made of trailing Kronecker factors; None when a would exceed
    TWO_SIDED_MAX_LEFT or when width is a single factor (the dense MatMul's case)."""
    factors = hadamard_factors(width, max_factor=MAX_DENSE_FACTOR)
    b = 1
    while len(factors) > 1 and b * factors[-1] <= TWO_SIDED_MAX_RIGHT:
        b *= factors.pop()
    a = width // b
    if b == 1 or a == 1 or a > TWO_SIDED_MAX_LEFT:
        return None
    return a, b


def _signs_kron(order: int) -> np.ndarray:
    """The +-1 matrix of hadamard_matrix(order) as the Kronecker product of its factors'."""
    m = np.ones((1, 1), np.float32)
    for f in hadamard_factors(order, max_factor=MAX_DENSE_FACTOR):
        m = np.kron(m, hadamard_signs(f))
    return m


def lower_hadamard_two_sided(ctx: LoweringContext, node: Node) -> Sequence[ir.Value]:
    """x's runs viewed as X [..., a, b]: y = A^T X (B * scale / sqrt(width)), two MatMuls (the
    left one broadcast over the leading dims) and no transpose. Falls back to the Kronecker
    factors when the width has no such split."""
    width = _width(node)
    split = two_sided_split(width)
    if split is None:
        return lower_hadamard_kron(ctx, node)
    a, b = split
    scale = node.attrs["scale"]
    key = ("hadamard_two_sided", width, scale)
    if key not in ctx.cache:
        right = (_signs_kron(b) * (scale / np.sqrt(width))).astype(np.float32)
        left_t = np.ascontiguousarray(_signs_kron(a).T)
        ctx.cache[key] = (ctx.const(left_t), ctx.const(right))
    left_t, right = ctx.cache[key]
    rank = len(node.inputs[0].shape)
    y = ctx.op("Reshape", [ctx.input(node, 0), ctx.ints(*_keep(rank - 1), -1, a, b)])
    y = ctx.op("MatMul", [left_t, ctx.op("MatMul", [y, right])])
    return [ctx.op("Reshape", [y, ctx.ints(*_keep(rank - 1), -1)])]


def lower_hadamard_kron(ctx: LoweringContext, node: Node) -> Sequence[ir.Value]:
    """y = (x @ H) * scale without forming H: x's runs of `width` channels are viewed as
    [f1, .., fm] and each axis is multiplied by its +-1 factor (x @ (A (x) B) = A^T X B), cycling
    the factor axes so every product is a MatMul on the last axis; 1/sqrt(width) is applied at the
    end as the reference does."""
    a = node.attrs
    width = a["block"] or a["size"]
    rank = len(node.inputs[0].shape)
    factors = hadamard_factors(width, max_factor=MAX_DENSE_FACTOR)
    y = ctx.op("Reshape", [ctx.input(node, 0), ctx.ints(*_keep(rank - 1), -1, *factors)])
    dims = rank + len(factors)
    cycle = [*range(rank), dims - 1, *range(rank, dims - 1)]
    for f in reversed(factors):
        key = ("hadamard_signs", f)
        if key not in ctx.cache:
            ctx.cache[key] = ctx.const(hadamard_signs(f))
        y = ctx.op("MatMul", [y, ctx.cache[key]])
        if len(factors) > 1:
            y = ctx.op("Transpose", [y], {"perm": cycle})
    y = ctx.op("Reshape", [y, ctx.ints(*_keep(rank - 1), -1)])
    y = ctx.op("Mul", [y, ctx.const(1.0 / np.sqrt(width))])
    if a["scale"] != 1.0:
        y = ctx.op("Mul", [y, ctx.const(a["scale"])])
    return [y]


_BY_NAME: dict[str, Rule] = {"matmul": lower_hadamard_matmul, "two_sided": lower_hadamard_two_sided,
                             "kron": lower_hadamard_kron, "fwht": lower_hadamard_fwht}


def lower_hadamard(ctx: LoweringContext, node: Node) -> Sequence[ir.Value]:
    """The `hadamard` rule: the strategy `choose_strategy` picks for this width."""
    return _BY_NAME[choose_strategy(_width(node))](ctx, node)


def hadamard_rule(strategy: str = "auto") -> Rule:
    """The rule for one strategy ("auto" = by width); an unknown name raises listing them."""
    if strategy == "auto":
        return lower_hadamard
    if strategy not in _BY_NAME:
        raise LoweringError(f"unknown hadamard strategy {strategy!r}; accepted: auto, "
                            f"{', '.join(STRATEGIES)}")
    return _BY_NAME[strategy]


def with_hadamard(rules: Mapping[str, Rule], strategy: str) -> dict[str, Rule]:
    """A copy of a rule table whose `hadamard` rule uses `strategy`."""
    return {**rules, "hadamard": hadamard_rule(strategy)}

