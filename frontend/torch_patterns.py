"""Pattern rules for the torch.export frontend: hand-written forms of the IR's coarse ops.

torch.export's training IR keeps nn.RMSNorm, F.silu, F.linear whole, but a module that spells them
out (HF's LlamaRMSNorm, `x * torch.sigmoid(x)`, `x @ W.T`, Gemma's `tanh(x / c) * c`) arrives as
a chain of small aten ops that the IR does not have. Each rule here matches such a chain anchored
at its last node and names the IR op it becomes:
    norm           x * rsqrt(mean(x^2 or x*x, [-1], keepdim) + eps)            -> rms_norm
    weighted_norm  norm(x) * w   or   norm(x) * (w + c)                         -> rms_norm(offset c)
    silu           x * sigmoid(x)                                               -> silu
    softcap        tanh(x / c) * c   or   tanh(x * (1/c)) * c                   -> softcap(cap c)
    linear_t       x @ W.T  (t, numpy_T, transpose, permute, mT of a 2-D weight) -> linear(x, W)
Shape-keeping identities (casts between float dtypes, clones, views that keep the shape) may sit
anywhere in a chain. A match is fused only when no inner value is used outside it (the check), so
fusing never drops a value something else needs; `find_fusions` logs the rules that matched but
failed the check.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Container
from typing import Any

import torch
from torch import fx

log = logging.getLogger(__name__)

IDENTITY = {"aten.clone.default", "aten.alias.default", "aten.detach.default",
            "aten.contiguous.default", "aten.lift_fresh_copy.default", "aten._to_copy.default",
            "aten.to.dtype", "aten.to.dtype_layout", "aten.to.device", "aten.type_as.default",
            "aten.view.default", "aten.reshape.default", "aten._unsafe_view.default",
            "aten.expand.default", "aten.dropout.default"}
TRANSPOSES = {"aten.t.default", "aten.numpy_T.default", "aten.transpose.int",
              "aten.permute.default", "aten.mT.default"}
MULS = {"aten.mul.Tensor", "aten.mul.Scalar"}
ADDS = {"aten.add.Tensor", "aten.add.Scalar"}
DIVS = {"aten.div.Tensor", "aten.div.Scalar"}


@dataclasses.dataclass
class Fusion:
    """A matched rule: the IR op its anchor becomes, the FX operands, the attributes, and the
    inner FX nodes it absorbs (the translation skips them)."""

    rule: str
    op: str
    operands: list[Any]
    attrs: dict[str, Any]
    interior: list[fx.Node]


def target(node: fx.Node) -> str:
    t = node.target
    return str(t) if isinstance(t, torch._ops.OpOverload) else getattr(t, "__name__", str(t))


def val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def shape_key(node: Any) -> list[str] | None:
    """The node's shape with symbolic sizes as their names, comparable without making guards."""
    v = val(node)
    return [str(d) for d in v.shape] if isinstance(v, torch.Tensor) else None


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def is_check(node: fx.Node) -> bool:
    """Runtime assertions export inserts (dtype/device metadata, symbolic ranges): they produce
    nothing, so a rule may absorb the values they look at."""
    return target(node).startswith(("aten._assert", "aten.sym_constrain_range")) and not node.users


def strip(arg: Any, interior: list[fx.Node] | None = None) -> Any:
    """`arg` with shape-keeping identity nodes skipped; they join `interior` when given."""
    while isinstance(arg, fx.Node) and target(arg) in IDENTITY \
            and target(arg) != "aten.dropout.default" and shape_key(arg) == shape_key(arg.args[0]):
        if interior is not None:
            interior.append(arg)
        arg = arg.args[0]
    return arg


def _inner(arg: Any, targets: set[str], interior: list[fx.Node]) -> fx.Node | None:
    node = strip(arg, interior)
    if isinstance(node, fx.Node) and target(node) in targets:
        interior.append(node)
        return node
    return None


def _both_orders(node: fx.Node) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    a, b = node.args[0], node.args[1]
    return (a, b), (b, a)


class Rules:
    """The rules over one exported graph; `weights` are the placeholder nodes that hold
    parameters, buffers and constants (a norm's weight and a linear's W must be one of them)."""

    def __init__(self, weights: Container[fx.Node]):
        self.weights = weights
        self.rules: tuple[tuple[str, Callable[[fx.Node], Fusion | None]], ...] = (
            ("weighted_norm", self.weighted_norm), ("norm", self.norm),
            ("softcap", self.softcap), ("silu", self.silu), ("linear_t", self.linear_t))

    def find_fusions(self, graph: fx.Graph) -> dict[fx.Node, Fusion]:
        """Rules tried from the last node backwards, so a larger pattern (a weighted norm) claims
        its nodes before the smaller one inside it (the unweighted norm)."""
        fusions: dict[fx.Node, Fusion] = {}
        absorbed: set[fx.Node] = set()
        for node in reversed(list(graph.nodes)):
            if node.op != "call_function" or node in absorbed:
                continue
            for name, rule in self.rules:
                fusion = rule(node)
                if fusion is None:
                    continue
                inner = set(fusion.interior)
                escaped = [u.name for n in inner for u in n.users
                           if u not in inner and u is not node and not is_check(u)]
                if not escaped and not inner & absorbed:
                    fusions[node] = fusion
                    absorbed |= inner
                    break
                log.debug("rule %s matched at %s but was not fused: inner values are used by %s",
                          name, node.name, escaped or "another fused pattern")
        return fusions

    def is_transpose_of_weight(self, node: fx.Node) -> bool:
        t = target(node)
        if t not in TRANSPOSES or node.args[0] not in self.weights:
            return False
        if len(val(node.args[0]).shape) != 2:
            return False
        if t == "aten.permute.default":
            return list(node.args[1]) == [1, 0]
        if t == "aten.transpose.int":
            return {d % 2 for d in node.args[1:3]} == {0, 1}
        return True

    # -- the rules -----------------------------------------------------------------------------
    def norm(self, node: fx.Node) -> Fusion | None:
        if target(node) not in MULS:
            return None
        for x, r in _both_orders(node):
            inner: list[fx.Node] = []
            rs = _inner(r, {"aten.rsqrt.default"}, inner)
            add = _inner(rs.args[0], ADDS, inner) if rs is not None else None
            if add is None or len(add.args) != 2 or add.kwargs:
                continue
            if is_number(add.args[1]):
                mean_arg, eps = add.args
            elif is_number(add.args[0]):
                eps, mean_arg = add.args
            else:
                continue
            mean = _inner(mean_arg, {"aten.mean.dim"}, inner)
            if mean is None:
                continue
            rank = len(val(mean.args[0]).shape)
            keep = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
            if [d % rank for d in mean.args[1]] != [rank - 1] or not keep \
                    or mean.kwargs.get("dtype") is not None:
                continue
            sq = _inner(mean.args[0], {"aten.pow.Tensor_Scalar"} | MULS, inner)
            if sq is None:
                continue
            root = strip(x)
            if target(sq) == "aten.pow.Tensor_Scalar":
                ok = sq.args[1] == 2 and strip(sq.args[0]) is root
            else:
                ok = strip(sq.args[0]) is root and strip(sq.args[1]) is root
            if ok:
                return Fusion("norm", "rms_norm", [root], {"eps": float(eps)}, inner)
        return None

    def weighted_norm(self, node: fx.Node) -> Fusion | None:
        if target(node) not in MULS:
            return None
        for n, w in _both_orders(node):
            inner: list[fx.Node] = []
            w, offset = strip(w), 0.0
            if isinstance(w, fx.Node) and target(w) in ADDS and len(w.args) == 2 \
                    and is_number(w.args[1]) and not w.kwargs:
                inner.append(w)
                w, offset = strip(w.args[0]), float(w.args[1])
            if w not in self.weights or len(val(w).shape) != 1:
                continue
            normed = strip(n, inner)
            norm = self.norm(normed) if isinstance(normed, fx.Node) else None
            if norm is not None:
                return Fusion("weighted_norm", "rms_norm", [norm.operands[0], w],
                              {**norm.attrs, "offset": offset}, inner + [normed] + norm.interior)
        return None

    def silu(self, node: fx.Node) -> Fusion | None:
        if target(node) not in MULS:
            return None
        for x, s in _both_orders(node):
            inner: list[fx.Node] = []
            sig = _inner(s, {"aten.sigmoid.default"}, inner)
            if sig is not None and strip(sig.args[0]) is strip(x):
                return Fusion("silu", "silu", [strip(x)], {}, inner)
        return None

    def softcap(self, node: fx.Node) -> Fusion | None:
        if target(node) not in MULS:
            return None
        for t, c in _both_orders(node):
            if not is_number(c) or c == 0:
                continue
            inner: list[fx.Node] = []
            tanh = _inner(t, {"aten.tanh.default"}, inner)
            scaled = _inner(tanh.args[0], DIVS | MULS, inner) if tanh is not None else None
            if scaled is None or not is_number(scaled.args[1]) or scaled.kwargs:
                continue
            k = scaled.args[1]
            ok = k == c if target(scaled) in DIVS else math.isclose(k * c, 1.0, rel_tol=1e-6)
            if ok:
                return Fusion("softcap", "softcap", [scaled.args[0]], {"cap": float(c)}, inner)
        return None

    def linear_t(self, node: fx.Node) -> Fusion | None:
        if target(node) != "aten.matmul.default":
            return None
        inner: list[fx.Node] = []
        t = strip(node.args[1], inner)
        if isinstance(t, fx.Node) and self.is_transpose_of_weight(t):
            return Fusion("linear_t", "linear", [node.args[0], t.args[0]], {}, inner + [t])
        return None
