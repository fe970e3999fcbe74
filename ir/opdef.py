"""The op-definition module: the table every op declaration registers into (`OPS`), what a
declaration holds (`OpDef`: attributes, arity, shape rule, reference implementation) and the
`op` decorator that declares one. The bottom of the IR's op files: ops.py and qops.py declare into
it, core.py (emit), the parser, the verifier and the interpreter look ops up in it, and it imports
nothing of the IR but its error type, so imports run one way. The package's __init__ imports
ops.py and qops.py, so the table is full whenever any part of splice.ir has been imported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .errors import IRError


_REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class Attr:
    type: type | tuple[type, ...]
    default: Any = _REQUIRED

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


@dataclasses.dataclass(frozen=True)
class OpDef:
    """An op: `inputs` names the operands (a trailing "?" marks an optional one), `outputs` names
    the results; `shape(node) -> [(dtype, shape)]` and `reference(attrs, *tensors) -> tensors`."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Attr]
    shape: Callable[[Any], list[tuple[str, tuple]]]  # (node) -> [(dtype, shape)] per output
    reference: Callable[..., tuple[torch.Tensor, ...]]
    doc: str = ""

    @property
    def min_inputs(self) -> int:
        return sum(1 for i in self.inputs if not i.endswith("?"))

    def check_attrs(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """Attributes with defaults filled in; an unknown, missing or mistyped one raises."""
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise IRError(f"{self.name}: unknown attributes {sorted(unknown)}; "
                          f"accepted: {sorted(self.attrs)}")
        out = {}
        for name, spec in self.attrs.items():
            if name in attrs:
                v = attrs[name]
                if isinstance(v, bool) and spec.type is not bool and not (
                        isinstance(spec.type, tuple) and bool in spec.type):
                    raise IRError(f"{self.name}.{name}: expected {spec.type}, got bool")
                if spec.type is float and isinstance(v, int):
                    v = float(v)
                if not isinstance(v, spec.type):
                    raise IRError(f"{self.name}.{name}: expected {spec.type}, got {type(v).__name__}")
                out[name] = v
            elif spec.required:
                raise IRError(f"{self.name}: missing attribute {name!r}")
            else:
                out[name] = spec.default
        return out


OPS: dict[str, OpDef] = {}


def op(name: str, inputs: Sequence[str], outputs: Sequence[str], attrs: dict[str, Attr] | None = None,
       *, shape: Callable, doc: str = "") -> Callable:
    def register(fn: Callable) -> Callable:
        if name in OPS:
            raise IRError(f"op {name!r} declared twice")
        OPS[name] = OpDef(name, tuple(inputs), tuple(outputs), dict(attrs or {}), shape, fn, doc)
        return fn
    return register


def get_op(name: str) -> OpDef:
    try:
        return OPS[name]
    except KeyError:
        raise IRError(f"unknown op {name!r}; known ops: {', '.join(sorted(OPS))}") from None
