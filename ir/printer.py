"""The IR's one text form. Stable (sorted attributes, values in graph order) and parsed back by
parser.py, so dumps diff cleanly and golden tests can be written by hand.

    graph(%input_ids: i64[batch, seq], ...) {
      const %model.norm.weight: f32[64]
      %x: f32[batch, seq, 64] = rms_norm(%h, %model.norm.weight) {"eps": 1e-05, ...} {"layer": null, ...}
      return %logits, ...
    }

Attributes and metadata are JSON objects, so every float round-trips exactly.

This module reads Values, Nodes and Graphs by their attributes and imports nothing of the IR, so
core.py (`str(graph)`) uses it without an import circle.
"""

from __future__ import annotations

import json


def format_type(v) -> str:
    """`dtype[dims]` of a Value."""
    return f"{v.dtype}[{', '.join(str(d) for d in v.shape)}]"


def format_node(node) -> str:
    """One Node as its line of the text form (without indentation)."""
    outs = ", ".join(f"%{v.name}: {format_type(v)}" for v in node.outputs)
    ins = ", ".join("none" if v is None else f"%{v.name}" for v in node.inputs)
    attrs = json.dumps(node.attrs, sort_keys=True)
    meta = json.dumps({"layer": node.layer, "role": node.role, "origin": node.origin})
    return f"{outs} = {node.op}({ins}) {attrs} {meta}"


def print_graph(graph) -> str:
    """A Graph in the text form that parser.parse_graph reads back."""
    lines = ["graph(" + ", ".join(f"%{v.name}: {format_type(v)}" for v in graph.inputs) + ") {"]
    lines += [f"  const %{v.name}: {format_type(v)}" for v in graph.consts.values()]
    lines += [f"  {format_node(n)}" for n in graph.nodes]
    lines.append("  return " + ", ".join(f"%{v.name}" for v in graph.outputs))
    lines.append("}")
    return "\n".join(lines) + "\n"
