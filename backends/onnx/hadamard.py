"""Lowering strategies for the `hadamard` op, and the choice between them by size.

Three ways to compute y = (x @ H) * scale in standard ONNX, all exactly splice.ir.hadamard's H:

- "matmul": one MatMul by the dense orthonormal matrix (an initializer of order `block or size`,
  normalisation and scale folded in); a block-diagonal or per-head transform reshapes x into its
  runs first, so the initializer stays [width, width] rather than a mostly-zero [size, size].
- "kron": the Kronecker factors of H as small MatMuls, one per axis of x viewed as [f1, .., fm]
  (rules.lower_hadamard, factors of at most 64).
- "fwht": the fast Walsh-Hadamard transform: x viewed as [..., base, 2, 2, .., 2]; each of the
  log2(2^k) butterfly stages splits one axis of size 2 into a and b and concatenates a + b and
  a - b back; the non-power-of-two base factor is one broadcast MatMul from the left
  (x @ (A (x) B) = A^T X B for X the [base, 2^k] view).

`choose_strategy` is what `lower_hadamard` picks. Measured with ONNX Runtime 1.32's CPU provider,
one intra-op thread, all graph optimisations on, float32, on the project's shared 2-core x86-64
build machine: the fastest of 60-300 runs of a graph holding only the op (microseconds per call,
x of shape [1, tokens, width]):

    width  tokens    matmul     kron     fwht   |  width  tokens    matmul     kron     fwht
       16       1       3.9      4.8     12.9   |   1024       1      49.7      6.8     36.3
       16      64       4.1      5.1     17.9   |   1024      64     597.7     67.6    462.6
       64       1       4.1      4.9     18.2   |   1536       1     114.6      7.8     31.5
       64      64       6.3      7.5     40.5   |   1536      64    1364.4    100.6    649.8
      128       1       4.4      5.9     21.1   |   2048       1     208.5      8.2     45.9
      128      64      13.1     14.8     66.8   |   2048      64    3064.1    170.3   1000.5
      256       1       6.2      5.9     25.6   |   4096       1    1609.0     11.7     63.2
      256      64      40.5     19.8    118.6   |   4096      64   13288.1    423.3   2102.0
      576       1      17.3      6.3     17.2   |  11008       1         -     34.5     99.4
      576      64     188.5     42.8    209.7   |  11008      64         -   1985.8   5678.1

The crossover is the same at 1 and at 64 tokens: the dense MatMul wins up to width 128 (one
kernel, normalisation folded in), the Kronecker factors from 256 on (n * sum(f_i) multiply-adds
instead of n^2, still few nodes). The butterfly never wins in ONNX Runtime: each of its log2(n)
stages is four nodes and a full pass over the tensor, which costs more than radix-64 MatMuls; it
is kept as an explicit strategy (`hadamard_rule("fwht")`) for runtimes without a fast small MatMul.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from ...ir.core import Node
from .lower import LoweringContext, LoweringError, Rule

STRATEGIES = ("matmul", "kron", "fwht")

# widths (block or size) up to this take the dense MatMul, larger ones the Kronecker factors
DENSE_MAX = 128


def _keep(rank: int) -> list[int]:
    return [0] * rank


def _width(node: Node) -> int:
    return node.attrs["block"] or node.attrs["size"]


def choose_strategy(width: int) -> str:
    """The strategy `lower_hadamard` uses for a transform of order `width` (see the module
    docstring for the measurement behind it)."""
    return "matmul" if width <= DENSE_MAX else "kron"


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
    from ...ir.hadamard import hadamard_matrix

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
    from ...ir.hadamard import factorize, hadamard_matrix

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
            signs = np.rint(hadamard_matrix(base).numpy() * np.sqrt(base)).astype(np.float32)
            ctx.cache[key] = ctx.const(np.ascontiguousarray(signs.T))
        y = ctx.op("Reshape", [y, ctx.ints(*_keep(lead), -1, base, p)])
        y = ctx.op("MatMul", [ctx.cache[key], y])
    y = ctx.op("Reshape", [y, ctx.ints(*_keep(lead), -1)])
    y = ctx.op("Mul", [y, ctx.const(1.0 / np.sqrt(width))])
    if node.attrs["scale"] != 1.0:
        y = ctx.op("Mul", [y, ctx.const(node.attrs["scale"])])
    return [y]


def lower_hadamard_kron(ctx: LoweringContext, node: Node) -> Sequence[ir.Value]:
    """The Kronecker-factored MatMuls of rules.lower_hadamard."""
    from .rules import lower_hadamard as kron

    return kron(ctx, node)


_BY_NAME: dict[str, Rule] = {"matmul": lower_hadamard_matmul, "kron": lower_hadamard_kron,
                             "fwht": lower_hadamard_fwht}


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

