"""A networkx view of a graph, for analysis and drawing. The IR is never stored in networkx."""

from __future__ import annotations

import networkx as nx

from .core import Graph


def to_networkx(graph: Graph, *, include_consts: bool = False) -> nx.MultiDiGraph:
    """Nodes are node indices (and "in:NAME" / "const:NAME" for graph inputs and constants);
    edges carry the value name, dtype and shape."""
    g = nx.MultiDiGraph()
    where: dict[int, str | int] = {}
    for v in graph.inputs:
        g.add_node(f"in:{v.name}", kind="input", op="input", label=v.name)
        where[id(v)] = f"in:{v.name}"
    if include_consts:
        for v in graph.consts.values():
            g.add_node(f"const:{v.name}", kind="const", op="const", label=v.name)
            where[id(v)] = f"const:{v.name}"
    for i, n in enumerate(graph.nodes):
        g.add_node(i, kind="node", op=n.op, layer=n.layer, role=n.role, origin=n.origin,
                   label=f"{n.op}:{n.role}" if n.role else n.op)
        for v in n.outputs:
            where[id(v)] = i
        for v in n.inputs:
            if v is not None and id(v) in where:
                g.add_edge(where[id(v)], i, value=v.name, dtype=v.dtype, shape=tuple(v.shape))
    return g
