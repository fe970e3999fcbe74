"""Remove a contiguous block of decoder layers and reconnect the residual stream across the cut.

Layers [start, start + n) go: every node whose `layer` is in the block, the block's past.{i}.*
graph inputs and present.{i}.* outputs, and the weights only they read. The stream entering
layer `start` then replaces every use of the stream leaving layer start + n - 1 — or, when
`estimate_patch` has left a patch on that stream (a chain of role "patch" nodes reading it whose
output nothing uses yet), the patch's output does: pruning is what puts the patch to work
(LinearPatch, Chen et al. 2025; the cut itself is ShortGPT's, Men et al. 2024).

Later layers are renumbered so that the artefact stays consistent with its layer indices, which
the backends and the runtime rely on (past.{i}.key must be contiguous): node.layer, the value
names that carry the layer index (h.{i}, attn.q_proj.{i}, present.{i}.key, ...), the past.{i}.*
graph inputs and the weights (layers.{i}.* -> layers.{i - n}.*). config.num_layers shrinks by n,
the pending `prune_block` is consumed and config.extra["pruned"] records the cut.

Which block: `start`/`n` as settings, or (start = -1) the block that `select_layers` or
`estimate_patch` recorded in config.extra["prune_block"] = [start, n]. Layer 0 is refused unless
`allow_first` (a recorded block was already vetted by the pass that chose it). A second run with
nothing pending, or with the same explicit request just applied, changes nothing.

Exactness: lossy by design (it removes computation); the numeric check reports the damage. This
module also holds the helpers the other pruning passes share: the residual-stream values and a
calibration run that captures them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from splice.ir.core import Graph, IRError, Module, Node, Value
from splice.ir.interpreter import Interpreter, default_feeds
from .infra.base import PassBase, PassContext, PassError, PassResult
from .infra.registry import register_pass

logger = logging.getLogger(__name__)


# -- the layer structure -------------------------------------------------------------------------

def num_layers(module: Module, pass_name: str) -> int:
    """The number of decoder layers in the graph (the graph is the truth, not the config); the
    layer indices must be 0..L-1."""
    layers = module.graph.layers()
    if not layers:
        raise PassError(f"{pass_name}: the graph has no decoder layers (no node carries a layer "
                        "index); it needs a decoder graph as the frontends build it")
    if layers != list(range(len(layers))):
        raise PassError(f"{pass_name}: layer indices {layers} are not contiguous from 0")
    return len(layers)


def _one(module: Module, role: str, layer: int, pass_name: str) -> Node:
    found = module.graph.find(op="add", role=role, layer=layer)
    if len(found) != 1:
        raise PassError(f"{pass_name}: layer {layer} has {len(found)} '{role}' add nodes, expected "
                        "one; the pass needs the canonical decoder graph (frontend.decoder)")
    return found[0]


def stream_in(module: Module, layer: int, pass_name: str) -> Value:
    """The residual stream entering `layer`: the stream operand of its attention residual add
    (the embedding output for layer 0, h.{layer - 1} or a patch output otherwise)."""
    v = _one(module, "attn.residual", layer, pass_name).inputs[0]
    assert v is not None
    return v


def stream_out(module: Module, layer: int, pass_name: str) -> Value:
    """The residual stream leaving `layer`: its MLP residual add's output (h.{layer})."""
    return _one(module, "mlp.residual", layer, pass_name).output


def stream_values(module: Module, pass_name: str) -> list[Value]:
    """x_0 .. x_L: x_i enters layer i, x_L leaves the last layer."""
    L = num_layers(module, pass_name)
    return [stream_in(module, i, pass_name) for i in range(L)] + [stream_out(module, L - 1,
                                                                             pass_name)]


def resolve_block(module: Module, start: int, n: int, allow_first: bool,
                  pass_name: str) -> tuple[int, int, bool] | None:
    """(start, n, recorded) for a pass's settings: explicit (start >= 0, n), or (start = -1) the
    block in config.extra["prune_block"] (`recorded` True); None when start = -1 and no block is
    recorded. Raises PassError for impossible blocks, naming the accepted range."""
    L = num_layers(module, pass_name)
    recorded = start == -1
    if recorded:
        block = module.config.extra.get("prune_block")
        if block is None:
            return None
        if not (isinstance(block, (list, tuple)) and len(block) == 2
                and all(isinstance(b, int) and not isinstance(b, bool) for b in block)):
            raise PassError(f"{pass_name}: config.extra['prune_block'] is {block!r}; expected "
                            "[start, n] as select_layers writes it")
        if n not in (-1, block[1]):
            raise PassError(f"{pass_name}: n = {n} but the recorded block {list(block)} prunes "
                            f"{block[1]} layers; leave n = -1 or give start too")
        start, n = block
    elif start < -1:
        raise PassError(f"{pass_name}: start = {start}; give a layer index >= 0, or -1 for the "
                        "block recorded by select_layers")
    elif n == -1:
        raise PassError(f"{pass_name}: start = {start} needs n, the number of layers to prune")
    check_block_size(n, L, pass_name)
    if start == 0 and not (allow_first or recorded):
        raise PassError(f"{pass_name}: the block starts at layer 0, the first layer, which reads "
                        "the embedding and is rarely redundant; set allow_first = true to prune "
                        f"it, or start at 1..{L - n}")
    first = 0 if allow_first or recorded else 1
    if not first <= start <= L - n:
        raise PassError(f"{pass_name}: a block of n = {n} layers starting at layer {start} does "
                        f"not fit a model of {L} layers; start must be in {first}..{L - n}")
    return start, n, recorded


def check_block_size(n: int, L: int, pass_name: str) -> None:
    if n < 1:
        raise PassError(f"{pass_name}: n = {n}; the number of layers to prune must be at least 1")
    if n >= L:
        raise PassError(f"{pass_name}: n = {n} would prune every layer of a {L}-layer model; "
                        f"n must be in 1..{L - 1}")


def dangling_patch(graph: Graph, x_in: Value) -> list[Node] | None:
    """The patch waiting on `x_in` (what estimate_patch leaves): from a role "patch" reader of
    x_in, the role "patch" nodes reached through role "patch" nodes (a chain, or a dense patch
    and the MLP block after it), in graph order, whose values nothing else reads and whose last
    output nothing reads yet."""
    for first in x_in.users():
        if first.role != "patch":
            continue
        region, seen, frontier = [first], {id(first)}, list(first.outputs)
        while frontier:
            for user in frontier.pop().users():
                if user.role == "patch" and id(user) not in seen:
                    seen.add(id(user))
                    region.append(user)
                    frontier.extend(user.outputs)
        region.sort(key=graph.nodes.index)
        last = region[-1].outputs[0]
        inner = [v for n in region for v in n.outputs if v is not last]
        if not last.uses and last not in graph.outputs and all(
                v.uses and v not in graph.outputs and all(id(u) in seen for u in v.users())
                for v in inner):
            return region
    return None


# -- calibration -------------------------------------------------------------------------------

class _Collected(Exception):
    """Raised by the capture hook once every wanted value is in: the rest of the graph is not
    needed, so the run stops there."""


def check_calibration(module: Module, ctx: PassContext, pass_name: str,
                      min_tokens: int = 1) -> torch.Tensor:
    """The calibration ids as int64 [batch, seq], checked against the vocabulary."""
    calib = ctx.require_calibration(pass_name, min_tokens)
    if calib.dim() == 1:
        calib = calib[None]
    if calib.dim() != 2 or calib.is_floating_point() or calib.dtype == torch.bool:
        raise PassError(f"{pass_name}: calibration must be integer token ids [batch, seq], got "
                        f"{calib.dtype}{list(calib.shape)}")
    vocab = module.config.vocab_size
    if int(calib.min()) < 0 or int(calib.max()) >= vocab:
        raise PassError(f"{pass_name}: calibration holds token ids {int(calib.min())}.."
                        f"{int(calib.max())}; the model's vocabulary is 0..{vocab - 1}")
    return calib.to(torch.int64)


def row_chunks(calib: torch.Tensor, chunk_tokens: int = 2048) -> Iterator[torch.Tensor]:
    """Whole calibration rows, about `chunk_tokens` tokens at a time (bounded memory: the
    attention scores of one chunk are rows * heads * seq^2 numbers)."""
    rows = max(1, chunk_tokens // calib.shape[1])
    for i in range(0, calib.shape[0], rows):
        yield calib[i:i + rows]


def walk_calibration(module: Module, ctx: PassContext, values: Sequence[Value], pass_name: str,
                     visit: Callable[[int, torch.Tensor], None], *,
                     min_tokens: int = 1) -> Iterator[None]:
    """Run the calibration batches through the reference interpreter in ctx.precision, chunk by
    chunk, calling visit(k, x) with `values[k]` as a [tokens, width] tensor as soon as its node
    computes it; yields after each chunk. Only what `visit` keeps stays in memory (the run keeps
    no graph output), and a chunk's run stops after the last wanted value. Non-finite
    activations raise PassError naming the value."""
    calib = check_calibration(module, ctx, pass_name, min_tokens)
    g = module.graph
    wanted = {id(v): k for k, v in enumerate(values)}
    for v in values:
        if v.producer is None:
            raise PassError(f"{pass_name}: %{v.name} is not computed by a node")
    stop = max((g.nodes.index(v.producer) for v in values), default=-1)  # type: ignore[arg-type]
    stop_node = g.nodes[stop]
    interp = Interpreter(module, ctx.precision)

    def hook(node: Node, outs: tuple) -> None:
        for v, t in zip(node.outputs, outs):
            k = wanted.get(id(v))
            if k is not None:
                visit(k, _finite(v, t, pass_name).reshape(-1, t.shape[-1]))
        if node is stop_node:
            raise _Collected

    for chunk in row_chunks(calib):
        try:
            interp.run(default_feeds(module, chunk, None, ctx.precision), hook=hook, outputs=())
        except _Collected:
            pass
        yield


def _finite(v: Value, t: torch.Tensor, pass_name: str) -> torch.Tensor:
    if not torch.isfinite(t).all():
        bad = "NaN" if torch.isnan(t).any() else "inf"
        where = f" (layer {v.producer.layer})" if v.producer and v.producer.layer is not None \
            else ""
        raise PassError(f"{pass_name}: calibration activation %{v.name}{where} holds {bad}; the "
                        "model or its calibration data is broken (check the weights and the "
                        "token ids)")
    return t


def iter_calibration(module: Module, ctx: PassContext, values: Sequence[Value], pass_name: str,
                     *, min_tokens: int = 1) -> Iterator[list[torch.Tensor]]:
    """`values` of each calibration chunk as [tokens, width] tensors (walk_calibration)."""
    got: list[torch.Tensor | None] = [None] * len(values)
    for _ in walk_calibration(module, ctx, values, pass_name, got.__setitem__,
                              min_tokens=min_tokens):
        out = list(got)
        assert all(t is not None for t in out)
        yield out  # type: ignore[misc]


def capture(module: Module, ctx: PassContext, values: Sequence[Value], pass_name: str,
            *, min_tokens: int = 1) -> list[torch.Tensor]:
    """`values` over all calibration tokens, each [tokens, width] in ctx.precision."""
    parts = list(iter_calibration(module, ctx, values, pass_name, min_tokens=min_tokens))
    return [torch.cat([p[k] for p in parts]) for k in range(len(values))]


# -- the pass ----------------------------------------------------------------------------------

@register_pass
@dataclasses.dataclass(frozen=True)
class PruneLayersPass(PassBase):
    """Remove layers [start, start + n) and bridge the cut with the waiting patch, if any.

    Settings: `start` (-1: the block recorded in config.extra["prune_block"]), `n` (-1: the
    recorded one), `allow_first` (permit a block starting at layer 0).
    """

    name = "prune_layers"
    exact = False

    start: int = -1
    n: int = -1
    allow_first: bool = False

    def call(self, module: Module, ctx: PassContext) -> PassResult:
        block = resolve_block(module, self.start, self.n, self.allow_first, self.name)
        history = list(module.config.extra.get("pruned", []))
        if block is None:
            if history:
                return PassResult(module, False, {"skipped": "no block pending (already pruned: "
                                                  f"{history})"})
            raise PassError(f"{self.name}: no block to prune: give start and n, or run "
                            "select_layers first (it records config.extra['prune_block'])")
        start, n, recorded = block
        L = num_layers(module, self.name)
        last = history[-1] if history else {}
        if not recorded and (last.get("start"), last.get("n"), last.get("layers")) == (start, n,
                                                                                      L + n):
            return PassResult(module, False, {"skipped": f"layers [{start}, {start + n}) of the "
                                              f"{L + n}-layer model were pruned already"})
        report = prune(module, start, n, self.name)
        entry = {"start": start, "n": n, "layers": L, "patch": report["patch"]}
        extra = {k: v for k, v in module.config.extra.items() if k != "prune_block"}
        extra["pruned"] = history + [entry]
        module.config = module.config.replace(num_layers=L - n, extra=extra)
        logger.info("prune_layers: removed layers [%d, %d) of %d (%s), %d -> %d parameters",
                    start, start + n, L, "patched" if report["patch"] else "no patch",
                    report["parameters_before"], report["parameters_after"])
        return PassResult(module, True, report)


def prune(module: Module, start: int, n: int, pass_name: str) -> dict[str, Any]:
    """Remove layers [start, start + n) in place (no config bookkeeping); returns the report."""
    g = module.graph
    L = num_layers(module, pass_name)
    block = range(start, start + n)
    x_in = stream_in(module, start, pass_name)
    x_out = stream_out(module, start + n - 1, pass_name)
    inside = [node for node in g.nodes if node.layer in block]
    _check_clean_cut(g, inside, x_out, pass_name)
    params_before = module.num_parameters()
    patch = dangling_patch(g, x_in)
    bridge = patch[-1].outputs[0] if patch else x_in
    x_out.replace_all_uses_with(bridge)
    g.outputs = [bridge if v is x_out else v for v in g.outputs]
    removed_outputs = [v.name for v in g.outputs if v.producer is not None and v.producer in inside]
    g.outputs = [v for v in g.outputs if v.name not in removed_outputs]
    for node in reversed(inside):
        g.remove(node)
    removed_inputs = []
    for v in list(g.inputs):
        if not v.uses and _layer_of_name(v.name) in block:
            _remove_input(g, v)
            removed_inputs.append(v.name)
    dropped = module.drop_dead_weights()
    renamed = _renumber(module, start + n, n)
    return {"block": [start, start + n], "layers_before": L, "layers_after": L - n,
            "patch": patch[-1].outputs[0].name if patch else None,
            "removed_nodes": len(inside), "removed_inputs": removed_inputs,
            "removed_outputs": removed_outputs, "dropped_weights": dropped,
            "renamed_weights": renamed, "parameters_before": params_before,
            "parameters_after": module.num_parameters()}


def _check_clean_cut(g: Graph, inside: list[Node], x_out: Value, pass_name: str) -> None:
    """Only x_out (and the present KV outputs) may carry the block's results out of it."""
    ids = {id(n) for n in inside}
    for node in inside:
        for v in node.outputs:
            if v is x_out:
                continue
            leaks = [u for u in v.users() if id(u) not in ids]
            if leaks:
                raise PassError(f"{pass_name}: %{v.name} (layer {node.layer}) is read outside "
                                f"the block by {leaks[0].op} ({leaks[0].role or 'no role'}); "
                                "only the residual stream may cross a pruned block")


def _layer_of_name(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) == 3 and parts[0] in ("past", "present") and parts[1].isdigit():
        return int(parts[1])
    return None


def _remove_input(g: Graph, v: Value) -> None:
    """Drop an unused graph input and free its name. The Graph has no public method for this
    (graph inputs are otherwise fixed by the frontend), so the pass does it here."""
    assert not v.uses
    g.inputs.remove(v)
    g._names.discard(v.name)


def _renumbered(name: str, old: int, new: int) -> str | None:
    """`name` with its one dot-separated component equal to `old` replaced by `new`."""
    parts = name.split(".")
    hits = [i for i, p in enumerate(parts) if p == str(old)]
    if len(hits) != 1:
        return None
    parts[hits[0]] = str(new)
    return ".".join(parts)


def _renumber(module: Module, first: int, n: int) -> dict[str, str]:
    """Shift layers >= `first` down by n: node metadata, layer-indexed value names, past inputs
    and layers.{i}.* weights. Increasing order, so each new name was freed before it is taken
    (by the removal of the block, or by the previous layer's shift)."""
    g = module.graph
    top = max((node.layer for node in g.nodes if node.layer is not None), default=-1)
    renamed: dict[str, str] = {}
    for old in range(first, top + 1):
        new = old - n
        for node in g.nodes:
            if node.layer != old:
                continue
            node.layer = new
            for v in node.outputs:
                _rename_value(g, v, old, new)
        for v in g.inputs:
            if _layer_of_name(v.name) == old:
                _rename_value(g, v, old, new)
        prefix = f"layers.{old}."
        for wname in [w for w in g.consts if w.startswith(prefix)]:
            target = f"layers.{new}." + wname[len(prefix):]
            _rename_weight(module, wname, target)
            renamed[wname] = target
    return renamed


def _rename_value(g: Graph, v: Value, old: int, new: int) -> None:
    target = _renumbered(v.name, old, new)
    if target is not None and g.free_name(target) == target:
        g.rename(v, target)
    elif target is not None:
        logger.debug("prune_layers: %s keeps its name (%s is taken)", v.name, target)


def _rename_weight(module: Module, old: str, new: str) -> None:
    try:
        module.rename_weight(old, new)  # moved, not read: a lazy model's weights stay on disk
    except IRError:
        raise PassError(f"prune_layers: cannot rename weight {old} to {new}: the name is taken") \
            from None
