"""Parser for the text form written by printer.py. Errors name the line and what was expected."""

from __future__ import annotations

import json
import re

from .core import Dim, Graph, IRError, Node, Value
from .opdef import get_op

_NAME = r"%([A-Za-z0-9_.\-/:+]+)"
_TYPE = r"([a-z0-9]+)\[([^\]]*)\]"
_TYPED = re.compile(_NAME + r":\s*" + _TYPE)
_NODE = re.compile(r"^(?P<outs>.+?)\s=\s(?P<op>[a-z_0-9]+)\((?P<ins>[^)]*)\)\s(?P<rest>\{.*)$")


class ParseError(IRError):
    pass


def _dims(text: str, where: str) -> tuple[Dim, ...]:
    if not text.strip():
        return ()
    out: list[Dim] = []
    for d in text.split(","):
        d = d.strip()
        if not d:
            raise ParseError(f"{where}: empty dim")
        out.append(int(d) if re.fullmatch(r"-?\d+", d) else d)
    return tuple(out)


def _typed_list(text: str, where: str) -> list[tuple[str, str, tuple[Dim, ...]]]:
    items = _TYPED.findall(text)
    rebuilt = ", ".join(f"%{n}: {t}[{d}]" for n, t, d in items)
    if re.sub(r"\s+", "", rebuilt) != re.sub(r"\s+", "", text):
        raise ParseError(f"{where}: expected '%name: dtype[dims], ...', got {text!r}")
    return [(n, t, _dims(d, where)) for n, t, d in items]


def parse_graph(text: str) -> Graph:
    lines = [ln.strip() for ln in text.strip().splitlines()]
    if not lines or not lines[0].startswith("graph(") or not lines[0].endswith(") {"):
        raise ParseError("line 1: expected 'graph(%inputs...) {'")
    if lines[-1] != "}":
        raise ParseError(f"line {len(lines)}: expected '}}'")
    g = Graph()
    env: dict[str, Value] = {}

    def define(v: Value) -> None:
        if v.name in env:
            raise ParseError(f"value %{v.name} defined twice")
        env[v.name] = v

    for name, dtype, shape in _typed_list(lines[0][len("graph("):-len(") {")], "line 1"):
        define(g.add_input(name, dtype, shape))
    returned = False
    for lineno, line in enumerate(lines[1:-1], start=2):
        where = f"line {lineno}"
        if not line or line.startswith("#"):
            continue
        if returned:
            raise ParseError(f"{where}: text after 'return'")
        if line.startswith("const "):
            (name, dtype, shape), *extra = _typed_list(line[len("const "):], where) or [(None,) * 3]
            if name is None or extra:
                raise ParseError(f"{where}: expected 'const %name: dtype[dims]'")
            define(g.const(name, dtype, shape))
            continue
        if line.startswith("return"):
            names = [s.strip() for s in line[len("return"):].split(",") if s.strip()]
            for s in names:
                if not s.startswith("%") or s[1:] not in env:
                    raise ParseError(f"{where}: return of undefined value {s}")
                g.outputs.append(env[s[1:]])
            returned = True
            continue
        m = _NODE.match(line)
        if not m:
            raise ParseError(f"{where}: expected '%out: type = op(%in, ...) {{attrs}} {{meta}}'")
        opdef = get_op(m["op"])
        dec = json.JSONDecoder()
        rest = m["rest"]
        try:
            attrs, end = dec.raw_decode(rest)
            meta, end2 = dec.raw_decode(rest[end:].lstrip())
        except json.JSONDecodeError as e:
            raise ParseError(f"{where}: bad attribute or metadata object: {e.msg}") from None
        if rest[end:].lstrip()[end2:].strip():
            raise ParseError(f"{where}: unexpected text after metadata")
        if not isinstance(attrs, dict) or not isinstance(meta, dict):
            raise ParseError(f"{where}: attributes and metadata must be JSON objects")
        inputs: list[Value | None] = []
        for s in [s.strip() for s in m["ins"].split(",")] if m["ins"].strip() else []:
            if s == "none":
                inputs.append(None)
            elif s.startswith("%") and s[1:] in env:
                inputs.append(env[s[1:]])
            else:
                raise ParseError(f"{where}: use of undefined value {s}")
        outs = []
        for name, dtype, shape in _typed_list(m["outs"], where):
            g.claim_name(name)
            outs.append(Value(name, dtype, shape))
        if len(outs) != len(opdef.outputs):
            raise ParseError(f"{where}: {opdef.name} has {len(opdef.outputs)} outputs, got {len(outs)}")
        layer = meta.get("layer")
        if layer is not None and not isinstance(layer, int):
            raise ParseError(f"{where}: metadata layer must be an integer or null")
        node = Node(opdef.name, inputs, outs, opdef.check_attrs(attrs), layer=layer,
                    role=str(meta.get("role", "")), origin=str(meta.get("origin", "")))
        g.append(node)
        for v in outs:
            define(v)
    if not returned:
        raise ParseError("missing 'return' line")
    return g
