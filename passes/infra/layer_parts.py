"""The graph side of layer-by-layer compilation (passes/infra/layerwise.py, whose docstring gives the
design): cut a decoder into one-layer sub-Modules with stubs at their ends, and stitch the
transformed sub-Modules' own nodes back into one graph over the weights they wrote."""

from __future__ import annotations

from collections.abc import Callable

import torch

from splice.errors import InputError
from splice.frontend.lazy import LazyWeights
from splice.ir.core import Graph, Module, Node, Value, emit
from splice.ir.verify import verify_graph

STUB_TABLE = "layerwise.stream"
STUB_HEAD = "layerwise.head"


class LayerwiseError(InputError):
    """The recipe or the graph cannot be compiled layer by layer."""


def split_stages(graph: Graph) -> tuple[list[Node], list[list[Node]], list[Node]]:
    """(nodes before the layers, each layer's nodes, nodes after); layers must be contiguous
    and numbered 0..L-1 in order, as the canonical decoder builds them. A patch between two
    layers (the role "patch" chain that estimate_patch fits and prune_layers wires into the cut)
    belongs to the layer after it: it transforms the stream that layer reads."""
    pre: list[Node] = []
    layers: list[list[Node]] = []
    between: list[Node] = []  # layer-less nodes after a layer: a patch, or the tail
    for node in graph.nodes:
        if node.layer is None:
            (between if layers else pre).append(node)
        elif node.layer == len(layers) and all(is_patch(n) for n in between):
            layers.append(between + [node])
            between = []
        elif node.layer == len(layers) - 1 and not between:
            layers[-1].append(node)
        else:
            raise LayerwiseError(f"layer-by-layer mode needs the decoder's layers in order, each "
                                 f"contiguous, with nothing but a patch between two; {node.op} of "
                                 f"layer {node.layer} breaks that")
    if not layers:
        raise LayerwiseError("layer-by-layer mode needs a decoder with layers; this graph has none")
    return pre, layers, between


def is_patch(node: Node) -> bool:
    """A node of a linear patch on the residual stream (estimate_patch's chain, or what
    fuse_patch and rotate made of it)."""
    return node.role == "patch" and node.layer is None and node.origin != "layerwise"


def part_nodes(sub: Module, i: int) -> list[Node]:
    """Layer i's part of its sub-module: the layer's nodes, after the patch that feeds it if any
    (the nodes split_stages gives layer i)."""
    nodes = sub.graph.nodes
    first = next(k for k, n in enumerate(nodes) if n.layer == i)
    start = first
    while start > 0 and is_patch(nodes[start - 1]):
        start -= 1
    return nodes[start:first] + [n for n in nodes[first:] if n.layer == i]


def consts(nodes: list[Node]) -> set[str]:
    return {v.const for n in nodes for v in n.inputs if v is not None and v.is_const}


def tied_table(pre: list[Node], post: list[Node]) -> str | None:
    """The embedding table that the head also reads (tied embeddings), or None; refuses any
    other weight shared by the nodes before and after the layers."""
    shared = consts(pre) & consts(post)
    tables = {n.inputs[1].const for n in pre if n.op == "embedding" and n.inputs[1] is not None}
    if shared - tables or len(shared) > 1:
        raise LayerwiseError(f"layer-by-layer mode: the head and the embedding share "
                             f"{', '.join(sorted(shared))}; it handles a shared float embedding "
                             "table (tied embeddings) only; compile in memory (layerwise=False)")
    return next(iter(shared), None)


def boundary(inner: list[Node], graph: Graph, what: str) -> tuple[Value | None, Value | None]:
    """(the one non-input value `inner` reads from before it, the one value it hands on after)."""
    made = {id(v) for n in inner for v in n.outputs}
    inputs = {id(v) for v in graph.inputs}
    outs = {id(v) for v in graph.outputs}
    ins = {id(v): v for n in inner for v in n.inputs
           if v is not None and not v.is_const and id(v) not in made and id(v) not in inputs}
    handed = {id(v): v for n in inner for v in n.outputs
              if any(u not in inner for u in v.users()) and id(v) not in outs}
    if len(ins) > 1 or len(handed) > 1:
        raise LayerwiseError(f"{what} reads {len(ins)} and hands on {len(handed)} values; layer-"
                             "by-layer mode needs one residual stream in and one out")
    return next(iter(ins.values()), None), next(iter(handed.values()), None)


def copy_nodes(nodes: list[Node], g: Graph, vmap: dict[int, Value],
               const: Callable[[str], str] = lambda name: name) -> None:
    """Append copies of `nodes` to g (same ops, attributes, names, metadata), their inputs mapped
    through `vmap` and their constants renamed by `const`; vmap learns the copies' outputs."""
    for n in nodes:
        ins = [None if v is None else g.const(const(v.const), v.dtype, v.shape) if v.is_const
               else vmap[id(v)] for v in n.inputs]
        outs = []
        for v in n.outputs:
            g.claim_name(v.name)
            outs.append(Value(v.name, v.dtype, v.shape))
        g.append(Node(n.op, ins, outs, dict(n.attrs), layer=n.layer, role=n.role, origin=n.origin))
        for old, new in zip(n.outputs, outs):
            vmap[id(old)] = new


def _copy(nodes: list[Node], g: Graph, vmap: dict[int, Value], weights: dict, source) -> None:
    """copy_nodes, reading the constants' weights from `source` into `weights`."""
    def take(name: str) -> str:
        if name not in weights:
            weights[name] = source[name]
        return name
    copy_nodes(nodes, g, vmap, take)


def _input(g: Graph, vmap: dict[int, Value], v: Value) -> None:
    if id(v) not in vmap:
        vmap[id(v)] = g.add_input(v.name, v.dtype, v.shape)


def layer_module(module: Module, i: int, parts, tied: str | None = None) -> Module:
    """The sub-module of layer i: [head] -> layer i -> [tail], stubs where the model's own
    head/tail belong to another layer (see the module docstring); with a `tied` table the last
    layer's stub embedding reads that table."""
    pre, layers, post = parts
    graph = module.graph
    g = Graph()
    vmap: dict[int, Value] = {}
    weights: dict[str, torch.Tensor] = {}
    last = len(layers) - 1
    by_name = {v.name: v for v in graph.inputs}
    wanted = [by_name["input_ids"]] + [v for n in layers[i] for v in n.inputs
                                       if v is not None and v in graph.inputs]
    for v in wanted:
        _input(g, vmap, v)
    stream_in, stream_out = boundary(layers[i], graph, f"layer {i}")
    if stream_in is None or stream_out is None:
        raise LayerwiseError(f"layer {i} does not read and write a residual stream")
    hidden = stream_in.shape[-1]
    if i == 0:
        for v in graph.inputs:
            if any(v in n.inputs for n in pre):
                _input(g, vmap, v)
        _copy(pre, g, vmap, weights, module.weights)
    else:
        if tied is not None and i == last:
            v = graph.consts[tied]
            weights[tied] = module.weights[tied]
            table = g.const(tied, v.dtype, v.shape)
        else:
            weights[STUB_TABLE] = torch.zeros(1, hidden, dtype=torch.float32)
            table = g.const(STUB_TABLE, "f32", (1, hidden))
        stub = emit(g, "embedding", [vmap[id(by_name["input_ids"])], table], {"scale": 1.0},
                    name="layerwise.stream_in", role="embed", origin="layerwise")
        vmap[id(stream_in)] = stub.output
    _copy(layers[i], g, vmap, weights, module.weights)
    if i == last:
        _copy(post, g, vmap, weights, module.weights)
        outs = [vmap[id(v)] for v in graph.outputs if id(v) in vmap]
    else:
        x = vmap[id(stream_out)]
        eps = float(module.config.extra.get("rms_eps", 1e-6))
        n = emit(g, "rms_norm", [x], {"eps": eps, "offset": 0.0}, name="layerwise.norm",
                 role="final_norm", origin="layerwise").output
        weights[STUB_HEAD] = torch.zeros(1, hidden, dtype=torch.float32)
        head = g.const(STUB_HEAD, "f32", (1, hidden))
        logits = emit(g, "linear", [n, head], name="layerwise.logits", role="lm_head",
                      origin="layerwise").output
        outs = [logits] + [vmap[id(v)] for v in graph.outputs if id(v) in vmap]
    g.outputs = outs
    return Module(g, weights, module.config, module.tokenizer)


def stream_source(sub: Module, i: int) -> Node | None:
    """The node making the stream that enters layer i's part: the embedding, or the stub
    standing for it (after quantize_weights, possibly a qembedding in its place)."""
    v = boundary(part_nodes(sub, i), sub.graph, f"layer {i}")[0]
    return v.producer if v is not None else None


def kept(sub: Module, i: int, n_layers: int) -> list[Node]:
    """The nodes of sub-module i that belong to the model: layer i's part, plus the real head
    (i = 0) and tail (last layer)."""
    part = {id(n) for n in part_nodes(sub, i)}
    return [n for n in sub.graph.nodes if id(n) in part
            or (n.layer is None and n.origin != "layerwise"
                and ((i == 0 and _before_layer(sub, n)) or (i == n_layers - 1
                                                            and not _before_layer(sub, n))))]


def _before_layer(sub: Module, node: Node) -> bool:
    first = next(k for k, n in enumerate(sub.graph.nodes) if n.layer is not None)
    return sub.graph.nodes.index(node) < first


def merge(module: Module, subs: list[Module], refs: dict) -> Module:
    """Stitch the parts' kept nodes into one graph over lazily read weights."""
    alias = _head_shares(subs, refs)
    g = Graph()
    vmap: dict[int, Value] = {}
    by_name: dict[str, Value] = {}
    for v in module.graph.inputs:
        by_name[v.name] = g.add_input(v.name, v.dtype, v.shape)
    prev_out: Value | None = None
    n = len(subs)
    for i, sub in enumerate(subs):
        for v in sub.graph.inputs:
            vmap[id(v)] = by_name[v.name]
        own = kept(sub, i, n)
        s_in, s_out = boundary(part_nodes(sub, i), sub.graph, f"layer {i}")
        if i > 0:
            vmap[id(s_in)] = prev_out
        copy_nodes(own, g, vmap, lambda name: alias.get(name, name))
        prev_out = vmap[id(s_out)]
    names = {v.name: vmap[id(v)] for sub in subs for v in sub.graph.outputs if id(v) in vmap}
    g.outputs = [names[v.name] for v in module.graph.outputs]
    verify_graph(g)
    weights = LazyWeights({name: refs[name] for name in g.consts})
    return Module(g, weights, subs[-1].config, module.tokenizer)


def _head_shares(subs: list[Module], refs: dict) -> dict[str, str]:
    """{weight of layer 0's embedding: the head's weight} where the whole model's embedding reads
    the head's weight but layer 0 made its own copy: the packed table that quantize_weights
    shares between a tied int8 lm_head and the qembedding. The last sub-module's stub embedding
    shows the sharing (it reads what the head reads there); each copy is checked equal bit for
    bit to the head's before the merged embedding reads the head's."""
    n = len(subs)
    if n < 2:
        return {}
    first, stub = stream_source(subs[0], 0), stream_source(subs[-1], n - 1)
    if first is None or stub is None or first.op != stub.op \
            or len(first.inputs) != len(stub.inputs):
        return {}
    head = consts(kept(subs[-1], n - 1, n))
    alias = {}
    for a, b in zip(first.inputs, stub.inputs):
        if a is None or b is None or not (a.is_const and b.is_const) or b.const not in head \
                or a.const == b.const:
            continue
        ta, tb = refs[a.const].load(), refs[b.const].load()
        if ta.dtype != tb.dtype or not torch.equal(ta, tb):
            raise LayerwiseError(f"layer-by-layer mode: the whole model's embedding reads the "
                                 f"head's {b.const}, but layer 0's own copy {a.const} differs "
                                 "from it; compile in memory (layerwise=False)")
        alias[a.const] = b.const
    return alias
