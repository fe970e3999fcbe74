"""Layer-by-layer compilation: run a recipe's passes one decoder layer at a time.

A model larger than memory (frontend/lazy.py binds its weights to the graph without reading
them) is compiled by `run_layerwise`, which never holds more than one decoder layer's weights,
the embedding and head where they take part, and the calibration stream at one layer boundary.

Design: the existing passes run unchanged on one-layer sub-Modules. For layer i the driver
builds a small but complete decoder graph and runs the recipe's passes on it with the ordinary
PassManager:

    input_ids -> [head] -> layer i (the model's own nodes, weights, names) -> [tail] -> logits

The head is the model's embedding for layer 0, else a stub: an `embedding` over a one-row
table. The tail is the model's final_norm/lm_head for the last layer, else a stub: a weightless
rms_norm and a one-row linear. With the stubs the sub-module is a decoder that every pass accepts
(rotate traces the residual stream from an embedding to a head), and each pass transforms layer
i's weights exactly as it would in the whole model, because every per-layer transform of these
passes depends only on that layer's weights and the model's sizes and seeds: R1's Q1 (hidden size,
seed), R2's per head, R4's per down_proj, norm folding per norm, RTN per weight. The model's
global parts (the embedding with R1 on it, the final norm folded into the head) are transformed
once, in the sub-modules of the first and last layer.

Calibration. A calibrated pass (quantize_weights with GPTQ, or RTN given calibration tokens)
needs layer i's inputs. The driver keeps the residual stream X_i [tokens, hidden] entering layer
i (ctx.precision; in memory, or spilled to a .safetensors file per boundary with `spill=True`)
and, for i > 0, runs the pass with the stub table replaced by X_i and the calibration ids
replaced by arange(tokens) in the calibration's [batch, seq] shape: the stub embedding looks up
exactly X_i, token by token, so the pass's StageRunner sees the chunks, positions and values the
whole-model run sees, and its Hessians are equal bit for bit. After the pass the quantized layer
is run on X_i (the same StageRunner) to give X_(i+1), so later layers see earlier layers'
quantization error, as GPTQ's sequential scheme wants.

Supported passes (others are refused with an InputError naming them): fold_norms, rotate and
quantize_weights (RTN or GPTQ; at most one calibrated pass; with calibration its embeddings must
stay "keep", since the whole-model pass calibrates on the float table it then replaces).
Tied embeddings (a head that reads the embedding table) are refused for now: the head and the
embedding then sit in different sub-modules, and fold_norms/rotate treat a shared table
differently from two unshared ones. Passes
that look across layers (select_layers, estimate_patch, prune_layers, fuse_patch, distill_patch)
or collect whole-model statistics in one interpreter run (quantize_activations,
absorb_post_norm) are not supported layer by layer yet.

Output. Each layer's transformed weights are written to one safetensors file in `work_dir` and
freed; the merged Module's weights are a LazyWeights over those files, and the ONNX backend
streams them into its external-data file (backends/onnx/lower.py makes lazy initializers), so no
step holds the whole model. The merged graph is the layer graphs stitched in order (the stub
nodes dropped); a test checks it equals the whole-model compile bit for bit. The pass report is
one entry per pass with each layer's report under "layers"; config.extra (rotation and
quantization records) comes from the last layer's sub-module.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..frontend.lazy import LazyWeights, file_refs
from ..ir.core import Graph, Module, Node, Value, emit
from ..ir.verify import verify_graph
from .base import PassBase, PassContext
from .manager import PassManager

logger = logging.getLogger(__name__)

SUPPORTED = ("fold_norms", "rotate", "quantize_weights")
STUB_TABLE = "layerwise.stream"
STUB_HEAD = "layerwise.head"


class LayerwiseError(InputError):
    """The recipe or the graph cannot be compiled layer by layer."""


def calibrated(p: PassBase, ctx: PassContext) -> bool:
    """Whether pass `p` reads activations (and so needs the stream entering each layer)."""
    return p.name == "quantize_weights" and (getattr(p, "method", "") == "gptq"
                                             or ctx.calibration is not None)


def check_supported(passes: Sequence[PassBase]) -> None:
    """Refuse a recipe with passes layer-by-layer mode cannot run (before any model is loaded)."""
    bad = [p.name for p in passes if p.name not in SUPPORTED]
    if bad:
        raise LayerwiseError(f"layer-by-layer mode supports the passes {', '.join(SUPPORTED)}; "
                             f"this recipe also has {', '.join(bad)}; compile it in memory "
                             "(layerwise=False) on a machine that holds the model")


def check_recipe(passes: Sequence[PassBase], ctx: PassContext) -> int | None:
    """Refuse what layer-by-layer mode cannot run; the index of the calibrated pass, if any."""
    check_supported(passes)
    cal = [i for i, p in enumerate(passes) if calibrated(p, ctx)]
    if len(cal) > 1:
        raise LayerwiseError("layer-by-layer mode runs at most one calibrated pass "
                             f"(quantize_weights with calibration); this recipe has {len(cal)}")
    if cal and getattr(passes[cal[0]], "embeddings", "keep") != "keep":
        raise LayerwiseError("layer-by-layer mode calibrates quantize_weights with embeddings = "
                             "'keep' only; quantize the embeddings with RTN in a separate, "
                             "uncalibrated quantize_weights pass")
    return cal[0] if cal else None


# -- the graph's parts -----------------------------------------------------------------------------

def split_stages(graph: Graph) -> tuple[list[Node], list[list[Node]], list[Node]]:
    """(nodes before the layers, each layer's nodes, nodes after); layers must be contiguous
    and numbered 0..L-1 in order, as the canonical decoder builds them."""
    pre: list[Node] = []
    layers: list[list[Node]] = []
    post: list[Node] = []
    for node in graph.nodes:
        if node.layer is None:
            (post if layers else pre).append(node)
        elif post or node.layer not in (len(layers) - 1, len(layers)):
            raise LayerwiseError(f"layer-by-layer mode needs the decoder's layers in order, each "
                                 f"contiguous; {node.op} of layer {node.layer} breaks that")
        else:
            if node.layer == len(layers):
                layers.append([])
            layers[-1].append(node)
    if not layers:
        raise LayerwiseError("layer-by-layer mode needs a decoder with layers; this graph has none")
    return pre, layers, post


def _boundary(inner: list[Node], graph: Graph, what: str) -> tuple[Value | None, Value | None]:
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


def _copy(nodes: list[Node], g: Graph, vmap: dict[int, Value], weights: dict, source) -> None:
    """Copy `nodes` into g (same ops, attributes, names, metadata), reading their constants'
    weights from `source` into `weights`."""
    for n in nodes:
        ins: list[Value | None] = []
        for v in n.inputs:
            if v is None:
                ins.append(None)
            elif v.is_const:
                if v.const not in weights:
                    weights[v.const] = source[v.const]
                ins.append(g.const(v.const, v.dtype, v.shape))
            else:
                ins.append(vmap[id(v)])
        outs = []
        for v in n.outputs:
            g.claim_name(v.name)
            outs.append(Value(v.name, v.dtype, v.shape))
        node = Node(n.op, ins, outs, dict(n.attrs), layer=n.layer, role=n.role, origin=n.origin)
        g.append(node)
        for old, new in zip(n.outputs, outs):
            vmap[id(old)] = new


def _input(g: Graph, vmap: dict[int, Value], v: Value) -> None:
    if id(v) not in vmap:
        vmap[id(v)] = g.add_input(v.name, v.dtype, v.shape)


def layer_module(module: Module, i: int, parts) -> Module:
    """The sub-module of layer i: [head] -> layer i -> [tail], stubs where the model's own
    head/tail belong to another layer (see the module docstring)."""
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
    stream_in, stream_out = _boundary(layers[i], graph, f"layer {i}")
    if stream_in is None or stream_out is None:
        raise LayerwiseError(f"layer {i} does not read and write a residual stream")
    hidden = stream_in.shape[-1]
    if i == 0:
        for v in graph.inputs:
            if any(v in n.inputs for n in pre):
                _input(g, vmap, v)
        _copy(pre, g, vmap, weights, module.weights)
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


# -- the driver ------------------------------------------------------------------------------------

def _stream_through(sub: Module, ids: torch.Tensor, dtype: torch.dtype, out: Value) -> torch.Tensor:
    """Run the head and layer stages of `sub` on ids; the stream `out` [tokens, hidden]."""
    from .quantize_weights import StageRunner

    runner = StageRunner(sub, ids, dtype)
    layer_stage = next(s for s, nodes in enumerate(runner.stages) if nodes[0].layer is not None)
    for s in range(layer_stage + 1):
        runner.run(s)
    x = torch.cat([env[id(out)] for env in runner.envs])
    return x.reshape(-1, x.shape[-1])


def _layer_out(sub: Module, i: int) -> Value:
    nodes = [n for n in sub.graph.nodes if n.layer == i]
    return _boundary(nodes, sub.graph, f"layer {i}")[1]


class _Stream:
    """The calibration stream at one layer boundary, in memory or spilled to a file."""

    def __init__(self, spill_dir: Path | None):
        self.spill_dir = spill_dir
        self._x: torch.Tensor | None = None
        self._file: Path | None = None

    def put(self, x: torch.Tensor, i: int) -> None:
        if self.spill_dir is None:
            self._x = x
            return
        from safetensors.torch import save_file

        path = self.spill_dir / f"stream_{i:05d}.safetensors"
        save_file({"x": x.contiguous()}, str(path))
        if self._file is not None:
            self._file.unlink(missing_ok=True)
        self._file, self._x = path, None

    def get(self) -> torch.Tensor:
        if self._x is not None:
            return self._x
        assert self._file is not None
        return file_refs(self._file)["x"].load()


def run_layerwise(module: Module, passes: Sequence[PassBase], ctx: PassContext,
                  work_dir: str | Path, *, instruments=(), spill: bool = False) -> tuple[Module, list[dict[str, Any]]]:
    """Run `passes` on `module` one decoder layer at a time (see the module docstring); the
    transformed weights go to safetensors files in `work_dir`, which must outlive the returned
    Module (its weights are read from there)."""
    passes = list(passes)
    cal = check_recipe(passes, ctx)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    parts = split_stages(module.graph)
    pre, layers, post = parts
    shared = {v.const for n in pre for v in n.inputs if v is not None and v.is_const} & \
        {v.const for n in post for v in n.inputs if v is not None and v.is_const}
    if shared and len(layers) > 1:
        raise LayerwiseError(f"layer-by-layer mode: the head and the embedding share "
                             f"{', '.join(sorted(shared))} (tied embeddings), which the passes "
                             "treat as one weight; it is not supported yet: compile in memory")
    calib = ctx.calibration
    if calib is not None and calib.dim() == 1:
        calib = calib[None]
    if cal is not None:
        calib = ctx.require_calibration(passes[cal].name)
        calib = calib[None] if calib.dim() == 1 else calib
    stream = _Stream(work if spill else None)
    refs: dict = {}
    subs: list[Module] = []
    reports: list[list[dict]] = []
    before = passes if cal is None else passes[:cal]
    after = [] if cal is None else passes[cal + 1:]
    t0 = time.perf_counter()
    for i in range(len(layers)):
        sub = layer_module(module, i, parts)
        plain = PassContext(calibration=None, seed=ctx.seed, precision=ctx.precision,
                            options=ctx.options, reducer=ctx.reducer)
        sub, rep = PassManager(before, instruments=instruments).run(sub, plain)
        if cal is not None:
            sub, entry = _calibrated_step(sub, i, cal, passes[cal], ctx, calib, stream,
                                          last=i == len(layers) - 1)
            rep.append(entry)
        if after:
            sub, more = PassManager(after, instruments=instruments).run(sub, plain)
            rep += more
        _write_part(sub, i, len(layers), work, refs)
        sub.weights = {}
        subs.append(sub)
        reports.append(rep)
        gc.collect()
        logger.info("layerwise: layer %d/%d done (%.1f s)", i + 1, len(layers),
                    time.perf_counter() - t0)
    merged = _merge(module, subs, refs)
    return merged, _merge_reports(passes, reports)


def _calibrated_step(sub: Module, i: int, step: int, p: PassBase, ctx: PassContext,
                     calib: torch.Tensor,
                     stream: _Stream, *, last: bool) -> tuple[Module, dict]:
    """Run the calibrated pass on layer i's sub-module fed with the stream X_i, and advance the
    stream to X_(i+1). Called directly (not through the manager): while the stub table holds the
    float64 stream its declared dtype is off, so the sub-module is verified after it is restored."""
    t0 = time.perf_counter()
    ids = calib
    if i > 0:
        ids = torch.arange(calib.numel(), dtype=torch.int64).reshape(calib.shape)
        sub.weights[STUB_TABLE] = stream.get()
    sub_ctx = PassContext(calibration=ids, seed=ctx.seed, precision=ctx.precision,
                          options=ctx.options, reducer=ctx.reducer)
    result = p.call(sub, sub_ctx)
    sub = result.module
    if not last:
        stream.put(_stream_through(sub, ids, ctx.precision, _layer_out(sub, i)), i + 1)
    if i > 0:
        sub.weights[STUB_TABLE] = torch.zeros(1, sub.graph.consts[STUB_TABLE].shape[1])
    verify_graph(sub.graph)
    from .manager import jsonable

    return sub, jsonable({"step": step, "name": p.name,
                          "settings": p.settings(), "modified": result.modified,
                          "time_s": round(time.perf_counter() - t0, 4), "report": result.report})


def _kept(sub: Module, i: int, n_layers: int) -> list[Node]:
    """The nodes of sub-module i that belong to the model: layer i's, plus the real head (i = 0)
    and tail (last layer)."""
    return [n for n in sub.graph.nodes if n.layer == i
            or (n.layer is None and n.origin != "layerwise"
                and ((i == 0 and _before_layer(sub, n)) or (i == n_layers - 1
                                                            and not _before_layer(sub, n))))]


def _before_layer(sub: Module, node: Node) -> bool:
    first = next(k for k, n in enumerate(sub.graph.nodes) if n.layer is not None)
    return sub.graph.nodes.index(node) < first


def _write_part(sub: Module, i: int, n_layers: int, work: Path, refs: dict) -> None:
    """Write the weights of sub-module i's kept nodes to one safetensors file; a weight another
    part already wrote (rotary frequencies, a tied table) must be equal to it."""
    from safetensors.torch import save_file

    names = {v.const for n in _kept(sub, i, n_layers) for v in n.inputs
             if v is not None and v.is_const}
    fresh = {}
    for name in sorted(names):
        t = sub.weights[name]
        if name in refs:
            if not torch.equal(refs[name].load(), t):
                raise LayerwiseError(f"layer-by-layer mode: weight {name} is shared between "
                                     "layers but the passes transformed it differently")
            continue
        fresh[name] = t.contiguous()
    path = work / f"part_{i:05d}.safetensors"
    save_file(fresh, str(path))
    refs.update(file_refs(path))


def _merge(module: Module, subs: list[Module], refs: dict) -> Module:
    """Stitch the parts' kept nodes into one graph over lazily read weights."""
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
        kept = _kept(sub, i, n)
        layer_nodes = [k for k in kept if k.layer == i]
        s_in, s_out = _boundary(layer_nodes, sub.graph, f"layer {i}")
        if i > 0:
            vmap[id(s_in)] = prev_out
        for node in kept:
            ins = []
            for v in node.inputs:
                if v is None:
                    ins.append(None)
                elif v.is_const:
                    ins.append(g.const(v.const, v.dtype, v.shape))
                else:
                    ins.append(vmap[id(v)])
            outs = []
            for v in node.outputs:
                g.claim_name(v.name)
                outs.append(Value(v.name, v.dtype, v.shape))
            g.append(Node(node.op, ins, outs, dict(node.attrs), layer=node.layer, role=node.role,
                          origin=node.origin))
            for old, new in zip(node.outputs, outs):
                vmap[id(old)] = new
        prev_out = vmap[id(s_out)]
    names = {v.name: vmap[id(v)] for sub in subs for v in sub.graph.outputs if id(v) in vmap}
    g.outputs = [names[v.name] for v in module.graph.outputs]
    verify_graph(g)
    weights = LazyWeights({name: refs[name] for name in g.consts})
    return Module(g, weights, subs[-1].config, module.tokenizer)


def _merge_reports(passes: Sequence[PassBase], reports: list[list[dict]]) -> list[dict]:
    """One entry per pass: modified if any layer's run modified, times summed, each layer's own
    report under "layers"."""
    merged = []
    for k, p in enumerate(passes):
        runs = [rep[k] for rep in reports]
        merged.append({"step": k, "name": p.name, "settings": runs[0].get("settings"),
                       "modified": any(r.get("modified") for r in runs),
                       "time_s": round(sum(r.get("time_s", 0.0) for r in runs), 3),
                       "layerwise": True,
                       "report": {"layers": {str(i): r.get("report") for i, r in enumerate(runs)}}})
    return merged
