"""Draw an IR graph as inline SVG: one decoder layer expanded, every other layer one box.

A whole model drawn node by node is a wall of boxes; what a reader wants is one layer in full (to
see what a pass did to it) and the shape of the rest. So the nodes of every layer but
`expand_layer` collapse into one box per layer, labelled with its node count and a bar of the
passes that made its nodes. Constants (weights) are not drawn: they are edges' sources with no
structure of their own.

Layout is the classic layered (Sugiyama-style) one, written small: ranks by longest path from the
sources (networkx's topological generations), graph inputs moved down to sit just above their first
user (so position_ids or a layer's past KV do not draw an edge the height of the model), then two
barycenter sweeps to order each rank, then the rows centred. An edge that spans several ranks is
routed through a thin dummy box in each (Sugiyama's long-edge dummies), so skip connections run
beside the boxes rather than through them; edges are cubic curves between those points.

Nodes are coloured by `node.origin`, the pass or frontend that made them, so a pass's work stands
out; the legend lists every origin with its node count. Every node has a <title> tooltip (op,
role, layer, origin, output type). The SVG uses no external reference (no xmlns is needed inline
in HTML), so the report opens offline.
"""

from __future__ import annotations

import html
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from splice.errors import InputError
from splice.ir.core import Graph, Node
from splice.ir.printer import format_type

# Tableau 10, then greys: distinct on screen and in print
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948",
           "#ff9da7", "#9c755f", "#bab0ac", "#8cd17d", "#d37295")
INPUT_COLOUR = "#e8e8e8"
ROW = 62          # vertical distance between ranks
GAP = 18          # horizontal gap between boxes of one rank
MARGIN = 20
CHAR_W = 6.6      # width of a character at the 11px label font
DUMMY_W = 6.0     # width a long edge takes in each rank it crosses


@dataclass
class Box:
    key: Any
    kind: str                 # "node", "layer", "input", "output", "dummy"
    title: str
    subtitle: str = ""
    tooltip: str = ""
    origin: str = ""
    origins: Counter = field(default_factory=Counter)
    width: float = 0.0
    height: float = 30.0
    x: float = 0.0
    y: float = 0.0


def origin_colours(origins: list[str]) -> dict[str, str]:
    """A colour per origin, in order of first appearance; the palette repeats past 12."""
    return {o: PALETTE[i % len(PALETTE)] for i, o in enumerate(dict.fromkeys(origins))}


def _node_box(i: int, node: Node) -> Box:
    outs = ", ".join(f"%{v.name}: {format_type(v)}" for v in node.outputs)
    tip = (f"{node.op}  role={node.role or '-'}  layer={node.layer}  origin={node.origin or '-'}"
           f"\n{outs}")
    return Box(i, "node", node.op, node.role, tip, node.origin or "?")


def _build(graph: Graph, expand: int | None) -> tuple[nx.DiGraph, dict[Any, Box]]:
    """The drawn DAG: node boxes, one box per collapsed layer, the graph inputs and outputs that
    touch drawn (non-collapsed) parts."""
    dag = nx.DiGraph()
    boxes: dict[Any, Box] = {}
    owner: dict[int, Any] = {}          # id(Value) -> drawn key producing it
    for v in graph.inputs:
        owner[id(v)] = ("in", v.name)
    for i, node in enumerate(graph.nodes):
        if node.layer is not None and node.layer != expand:
            key = ("layer", node.layer)
            box = boxes.get(key)
            if box is None:
                box = boxes[key] = Box(key, "layer", f"layer {node.layer}", "", "", "")
            box.origins[node.origin or "?"] += 1
        else:
            key = i
            boxes[key] = _node_box(i, node)
        dag.add_node(key)
        for v in node.outputs:
            owner[id(v)] = key
        for v in node.inputs:
            if v is None or v.is_const:
                continue
            src = owner.get(id(v))
            if src is None or src == key:
                continue
            if isinstance(src, tuple) and src[0] == "in":
                if boxes[key].kind == "layer":
                    continue  # a collapsed layer's own inputs (its past KV, positions) stay hidden
                if src not in boxes:
                    boxes[src] = Box(src, "input", src[1], "input", f"graph input %{src[1]}: "
                                     f"{format_type(v)}", "")
                    dag.add_node(src)
            dag.add_edge(src, key)
    for v in graph.outputs:
        src = owner.get(id(v))
        if src is None or (isinstance(src, tuple) and src[0] == "layer"):
            continue
        key = ("out", v.name)
        boxes[key] = Box(key, "output", v.name, "output", f"graph output %{v.name}: "
                         f"{format_type(v)}", "")
        dag.add_edge(src, key)
    for box in boxes.values():
        if box.kind == "layer":
            n = sum(box.origins.values())
            box.subtitle = f"{n} nodes (collapsed)"
            box.origin = box.origins.most_common(1)[0][0]
            box.tooltip = f"layer {box.key[1]}: {n} nodes; made by " + ", ".join(
                f"{o} {c}" for o, c in box.origins.most_common())
            box.height = 40.0
        box.width = max(len(box.title), len(box.subtitle)) * CHAR_W + 16
        if box.kind == "layer":
            box.width = max(box.width, 170.0)
    return dag, boxes


def _ranks(dag: nx.DiGraph, boxes: dict[Any, Box]) -> tuple[list[list[Any]], list[list[Any]]]:
    """Rows of keys by rank, and each edge as a chain of keys: an edge spanning several ranks
    gets one thin dummy box per rank it crosses, so it is routed between boxes, not through them
    (Sugiyama's long-edge dummies)."""
    rank = {}
    for r, gen in enumerate(nx.topological_generations(dag)):
        for k in gen:
            rank[k] = r
    for k, box in boxes.items():
        if box.kind == "input":
            users = [rank[s] for s in dag.successors(k)]
            if users:
                rank[k] = max(0, min(users) - 1)
    rows: list[list[Any]] = [[] for _ in range(max(rank.values(), default=-1) + 1)]
    for k in dag.nodes:  # graph order: a stable first ordering
        rows[rank[k]].append(k)
    chains = []
    for a, b in dag.edges:
        chain = [a]
        for r in range(rank[a] + 1, rank[b]):
            d = ("dummy", a, b, r)
            boxes[d] = Box(d, "dummy", "", width=DUMMY_W)
            rows[r].append(d)
            chain.append(d)
        chains.append(chain + [b])
    return rows, chains


def _order(rows: list[list[Any]], chains: list[list[Any]], boxes: dict[Any, Box]) -> None:
    """Barycenter ordering (two downward sweeps over the chain edges), then rows centred."""
    preds: dict[Any, list[Any]] = {}
    for chain in chains:
        for a, b in zip(chain, chain[1:]):
            preds.setdefault(b, []).append(a)
    pos: dict[Any, float] = {}
    for sweep in range(2):
        for r, row in enumerate(rows):
            if r or sweep:
                keys = {}
                for i, k in enumerate(row):
                    xs = [pos[p] for p in preds.get(k, ()) if p in pos]
                    keys[k] = sum(xs) / len(xs) if xs else pos.get(k, i * GAP)
                row.sort(key=keys.__getitem__)
            x = 0.0
            for k in row:
                pos[k] = x + boxes[k].width / 2
                x += boxes[k].width + GAP
    widths = [sum(boxes[k].width for k in row) + GAP * (len(row) - 1) for row in rows]
    full = max(widths, default=0.0)
    for row, w, r in zip(rows, widths, range(len(rows))):
        x = MARGIN + (full - w) / 2
        for k in row:
            box = boxes[k]
            box.x, box.y = x, MARGIN + r * ROW
            x += box.width + GAP


def _edge_path(chain: list[Any], boxes: dict[Any, Box]) -> str:
    """A cubic curve from the producer's bottom through each dummy to the consumer's top."""
    first = boxes[chain[0]]
    x, y = first.x + first.width / 2, first.y + first.height
    d = [f"M{x:.1f},{y:.1f}"]
    for k in chain[1:]:
        box = boxes[k]
        nx_, ny = box.x + box.width / 2, box.y
        dy = max(12.0, (ny - y) / 2)
        d.append(f"C{x:.1f},{y + dy:.1f} {nx_:.1f},{ny - dy:.1f} {nx_:.1f},{ny:.1f}")
        x, y = nx_, ny
        if box.kind == "dummy":
            y = box.y + box.height
            d.append(f"L{x:.1f},{y:.1f}")
    return " ".join(d)


def draw_graph(graph: Graph, *, expand_layer: int | None = None,
               colours: dict[str, str] | None = None) -> dict[str, Any]:
    """The SVG drawing of `graph` and its legend data: {"svg", "expanded_layer", "origins"
    (origin -> node count), "colours" (origin -> colour)}. `expand_layer` defaults to the first
    layer; a graph without layers is drawn node by node."""
    layers = graph.layers()
    if expand_layer is None:
        expand_layer = layers[0] if layers else None
    elif expand_layer not in layers:
        raise InputError(f"expand_layer {expand_layer} is not a layer of this graph; layers: "
                         f"{layers}")
    counts = Counter(n.origin or "?" for n in graph.nodes)
    colours = dict(colours or {})
    for o in counts:  # Counter keeps first-appearance order
        if o not in colours:
            colours[o] = PALETTE[len(colours) % len(PALETTE)]
    dag, boxes = _build(graph, expand_layer)
    rows, chains = _ranks(dag, boxes)
    _order(rows, chains, boxes)
    width = max((b.x + b.width for b in boxes.values()), default=0) + MARGIN
    height = max((b.y + b.height for b in boxes.values()), default=0) + MARGIN
    parts = [f'<svg class="graph" width="{width:.0f}" height="{height:.0f}" '
             f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" '
             f'aria-label="IR graph, layer {expand_layer} expanded">',
             '<defs><marker id="arrow" viewBox="0 0 8 8" refX="8" refY="4" markerWidth="7" '
             'markerHeight="7" orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#777"/></marker>'
             '</defs>', '<g class="edges">']
    for chain in chains:
        parts.append(f'<path d="{_edge_path(chain, boxes)}" marker-end="url(#arrow)"/>')
    parts.append("</g>")
    for box in boxes.values():
        if box.kind != "dummy":
            parts.append(_box_svg(box, colours))
    parts.append("</svg>")
    return {"svg": "\n".join(parts), "expanded_layer": expand_layer, "layers": layers,
            "origins": dict(counts.most_common()), "colours": colours,
            "drawn_boxes": sum(b.kind != "dummy" for b in boxes.values())}


def _box_svg(box: Box, colours: dict[str, str]) -> str:
    esc = html.escape
    if box.kind in ("input", "output"):
        fill, cls, origin = INPUT_COLOUR, "io", ""
    else:
        fill, cls, origin = colours.get(box.origin, "#ccc"), "n", box.origin
    origins = " ".join(sorted(box.origins)) if box.kind == "layer" else origin
    out = [f'<g class="{cls} {box.kind}" data-origin="{esc(origins)}">',
           f"<title>{esc(box.tooltip)}</title>",
           f'<rect x="{box.x:.1f}" y="{box.y:.1f}" width="{box.width:.1f}" '
           f'height="{box.height:.1f}" rx="5" fill="{fill}"/>']
    if box.kind == "layer":
        # a stacked bar of the origins of the layer's nodes, under its label
        total = sum(box.origins.values())
        x = box.x + 6
        span = box.width - 12
        for o, c in box.origins.most_common():
            w = span * c / total
            out.append(f'<rect class="bar" x="{x:.1f}" y="{box.y + box.height - 9:.1f}" '
                       f'width="{w:.1f}" height="5" fill="{colours.get(o, "#ccc")}"/>')
            x += w
    cx = box.x + box.width / 2
    if box.subtitle:
        out.append(f'<text x="{cx:.1f}" y="{box.y + 13:.1f}" class="t">{esc(box.title)}</text>')
        out.append(f'<text x="{cx:.1f}" y="{box.y + 25:.1f}" class="s">{esc(box.subtitle)}</text>')
    else:
        out.append(f'<text x="{cx:.1f}" y="{box.y + 19:.1f}" class="t">{esc(box.title)}</text>')
    out.append("</g>")
    return "\n".join(out)
