"""Shape-rule helpers shared by the op declarations (ops.py, qops.py): symbolic dim arithmetic,
broadcasting, an operand by position, and the common rules."""

from __future__ import annotations

from .core import Dim, Node, Shape, Value
from .errors import IRError


def dim_add(a: Dim, b: Dim) -> Dim:
    if isinstance(a, int) and isinstance(b, int):
        return a + b
    if a == 0:
        return b
    if b == 0:
        return a
    return f"{a}+{b}"


def dims_equal(a: Dim, b: Dim) -> bool:
    return a == b


def broadcast(a: Shape, b: Shape) -> Shape:
    out: list[Dim] = []
    for i in range(max(len(a), len(b))):
        da = a[len(a) - 1 - i] if i < len(a) else 1
        db = b[len(b) - 1 - i] if i < len(b) else 1
        if da == 1:
            out.append(db)
        elif db == 1 or da == db:
            out.append(da)
        else:
            raise IRError(f"shapes {list(a)} and {list(b)} do not broadcast")
    return tuple(reversed(out))


def operand(node: Node, i: int) -> Value:
    v = node.inputs[i]
    assert v is not None
    return v


def same_as_first(node: Node) -> list[tuple[str, Shape]]:
    x = operand(node, 0)
    return [(x.dtype, x.shape)]


def broadcast_rule(node: Node) -> list[tuple[str, Shape]]:
    a, b = operand(node, 0), operand(node, 1)
    return [(a.dtype, broadcast(a.shape, b.shape))]


def check_last_dim(x: Value, n: Dim, what: str) -> None:
    if x.shape[-1] != n:
        raise IRError(f"{what}: last dim of %{x.name} is {x.shape[-1]}, expected {n}")
