"""Layer-by-layer compilation: run a recipe's passes one decoder layer at a time.

A model larger than memory (frontend/lazy.py binds its weights to the graph without reading
them) is compiled by `run_layerwise`, which never holds more than one decoder layer's weights,
the embedding and head where they take part, and each calibrated pass's stream at one layer
boundary.

Design: the existing passes run unchanged on one-layer sub-Modules. For layer i the driver
builds a small but complete decoder graph (passes/infra/layer_parts.py cuts and stitches them) and
runs the recipe's passes on it with the ordinary PassManager:

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

Calibration. A calibrated pass (quantize_weights with GPTQ, or RTN given calibration tokens;
quantize_activations in a static mode; quantize_kv_cache static_per_head) needs layer i's inputs.
The driver keeps, for each calibrated pass, the residual stream X_i [tokens, hidden] entering
layer i (in memory, or spilled to a .safetensors file per boundary with `spill=True`) and, for
i > 0, runs the pass with the stub table replaced by X_i and the calibration ids replaced by
arange(tokens) in the calibration's [batch, seq] shape: the stub embedding looks up exactly X_i,
token by token, so the pass sees the chunks, positions and values the whole-model run sees, and
its statistics are equal bit for bit. Each pass's stream is advanced through layer i as that
pass's whole-model run computes it: quantize_weights runs its StageRunner in ctx.precision on
the layer after the pass (GPTQ's sequential scheme: later layers see earlier layers'
quantization error); the static ranges run the reference interpreter in float32 on the layer
before the pass (calibrate_ranges calibrates every layer before it adds any quantize node, so
no range sees an earlier layer's activation quantization). Every pass before the calibrated one
has run on the layer, so a stream sees what the model holds when the pass runs: static ranges
after GPTQ see the GPTQ-quantized layers, GPTQ after static ranges their quantize nodes. So
any number of calibrated passes run layer by layer, in recipe order, each exact.

Tied embeddings (the head reads the embedding table E). The passes treat a table with two
readers differently from one with one: fold_norms unties the head (lm_head.weight = E * gamma,
and config.extra["tie_embeddings"] = False) instead of scaling E in place, rotate gives both
readers one E Q1, quantize_weights packs E once for an int8 lm_head and a qembedding. So the
last layer's sub-module, which holds the real head, gets a stub embedding that reads E itself:
there E has an embedding and the head as readers, as in the model, and the head's weights and
config.extra come out as in the whole model. No pass transforms E itself by way of the head, so
layer 0's sub-module (the real embedding, a stub head) gives the model's E. Where both sub-modules
still read E at the end (rotate without untying: a final norm of ones) both write it, and
`_write_part` checks the two equal bit for bit; the packed table that the model shares between
an int8 lm_head and the qembedding, layer 0 packs for itself, and the merge points the embedding
at the head's copy after checking the two equal (layer_parts._head_shares). A calibrated pass
sees the last layer's stub pointed at the stream table, and E again after it (unless the pass
quantized the head and dropped E, which the model then reads from the embedding alone). The
cost: E is transformed in two sub-modules (rotated twice, for one), the whole model does it once.

Supported passes (others are refused with an InputError naming them): fold_norms,
rotate_inputs, rotate, quantize_weights (RTN or GPTQ; with calibration its embeddings must stay
"keep", since the whole-model pass calibrates on the float table it then replaces),
quantize_activations and
quantize_kv_cache (every mode). The dynamic modes are per-node rewrites, run like fold_norms;
they and the static ones put quantize nodes on layer i's linears and attention only (the stub
head is no decoder linear, so its input stays float unless `roles` names lm_head; the stub's
node is then dropped with the stub), and write the same config.extra record in every
sub-module. rotate_inputs rotates the readers of a layer's own norms (the stub's it leaves) and
decides per sub-module whether it acts (some norm keeps a per-channel scale): every layer must
decide alike, or the compile is refused at the first that does not (a layer that took R1 online
beside one that rotates the stream would make another model); its R1 record lists the norms of
every sub-module. In this mode fold_norms measures no gain and folds every norm it can, so on a
model like Gemma 3 rotate_inputs finds nothing left and rotate applies R1 to the stream.

Whole-model passes. select_layers, estimate_patch, prune_layers, fuse_patch and absorb_post_norm
look across layers (a block's score compares streams n layers apart, a patch spans the cut,
pruning renumbers every later layer), so they run on the whole module, first, before the
per-layer passes (a recipe with one after a per-layer pass is refused). The module's weights
stay where they are: on a lazy module (frontend/lazy.py) the reference interpreter reads each
weight from disk at the node that uses it and drops it after (ir/interpreter.py), so their
calibration runs stream the model from disk once per calibration chunk and hold one weight and
one chunk's activations; prune_layers renames weights by moving their references; a weight a
pass writes (a patch, fuse_patch's folded down_proj, absorb_post_norm's scaled linears) of at
least SPILL_MIN_BYTES goes to its own file in work_dir (LazyWeights.spill_to). The same
interpreter runs the same nodes on the same chunks as in memory, so their results are equal
bit for bit. A patch left between two layers belongs to the layer after it
(layer_parts.split_stages): its sub-module is stub -> patch -> layer i, so rotate rotates the
patch (or collapses a signed one into a channel scale) as in the whole model. distill_patch
is refused: it trains the patch through every later layer at each step.

Output. Each layer's transformed weights are written to one safetensors file in `work_dir` and
freed; the merged Module's weights are a LazyWeights over those files, and the ONNX backend
streams them into its external-data file (backends/onnx/lower.py makes lazy initializers), so no
step holds the whole model. The merged graph is the layer graphs stitched in order (the stub
nodes dropped); a test checks it equals the whole-model compile bit for bit. The pass report is
one entry per pass (the whole-model passes' own), with each layer's report under "layers"
for the per-layer passes; config.extra comes from the last layer's sub-module, but for the
rotation record, whose counts are summed over the sub-modules (`_merged_rotation`).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from splice.frontend.lazy import LazyWeights, file_refs
from splice.ir.core import Module, Node, Value
from splice.ir.verify import verify_graph
from .base import PassBase, PassContext
from .layer_parts import (STUB_TABLE, LayerwiseError, boundary, consts, kept, layer_module, merge,
                          part_nodes, split_stages, stream_source, tied_table)
from .manager import PassManager

logger = logging.getLogger(__name__)

WHOLE_MODEL = ("select_layers", "estimate_patch", "prune_layers", "fuse_patch",
               "absorb_post_norm")
PER_LAYER = ("fold_norms", "rotate_inputs", "rotate", "quantize_weights", "quantize_activations",
             "quantize_kv_cache")
SUPPORTED = WHOLE_MODEL + PER_LAYER
SPILL_MIN_BYTES = 1 << 20  # a whole-model pass's new weights from this size on go to disk


def calibrated(p: PassBase, ctx: PassContext) -> bool:
    """Whether pass `p` reads activations (and so needs the stream entering each layer)."""
    if p.name == "quantize_weights":
        return getattr(p, "method", "") == "gptq" or (ctx.calibration is not None
                                                      and getattr(p, "output_error", True))
    if p.name == "quantize_activations":
        return getattr(p, "mode", "") != "dynamic_per_token"
    return p.name == "quantize_kv_cache" and getattr(p, "mode", "") == "static_per_head"


def sequential(p: PassBase) -> bool:
    """Whether calibrated pass `p` calibrates layer i on the earlier layers as it transformed
    them (GPTQ's sequential scheme, in ctx.precision through a StageRunner), rather than on the
    model as it found it (the static activation and KV-cache ranges: calibrate_ranges runs the
    reference interpreter in float32, CALIB_ROWS sequences at a time, before adding a node)."""
    return p.name == "quantize_weights"


def check_supported(passes: Sequence[PassBase]) -> None:
    """Refuse a recipe with passes layer-by-layer mode cannot run, or in an order it cannot run
    them (before any model is loaded)."""
    bad = [p.name for p in passes if p.name not in SUPPORTED]
    if bad:
        why = (" (distill_patch trains the patch through every layer after the cut at each "
               "step, so it needs them all at once)" if "distill_patch" in bad else "")
        raise LayerwiseError(f"layer-by-layer mode supports the passes {', '.join(SUPPORTED)}; "
                             f"this recipe also has {', '.join(bad)}{why}; compile it in memory "
                             "(layerwise=False) on a machine that holds the model")
    first = next((i for i, p in enumerate(passes) if p.name in PER_LAYER), len(passes))
    late = [p.name for p in passes[first:] if p.name in WHOLE_MODEL]
    if late:
        raise LayerwiseError(f"layer-by-layer mode runs the whole-model passes "
                             f"({', '.join(WHOLE_MODEL)}) first, then the per-layer ones; this "
                             f"recipe has {', '.join(late)} after {passes[first].name}: put it "
                             "before")


def check_recipe(passes: Sequence[PassBase], ctx: PassContext) -> list[int]:
    """Refuse what layer-by-layer mode cannot run; the indices of the calibrated passes."""
    check_supported(passes)
    if any(getattr(p, "tune_steps", 0) for p in passes):
        raise LayerwiseError("layer-by-layer mode cannot tune the quantized scales end to end "
                             "(quantize_weights tune_steps > 0 trains through the whole model "
                             "at each step); set tune_steps = 0, or compile in memory")
    cal = [i for i, p in enumerate(passes) if calibrated(p, ctx)]
    for i in cal:
        if getattr(passes[i], "embeddings", "keep") != "keep":
            raise LayerwiseError("layer-by-layer mode calibrates quantize_weights with embeddings "
                                 "= 'keep' only; quantize the embeddings with RTN in a separate, "
                                 "uncalibrated quantize_weights pass")
    return cal


# -- the driver ------------------------------------------------------------------------------------

def _stream_through(sub: Module, ids: torch.Tensor, dtype: torch.dtype, out: Value) -> torch.Tensor:
    """Run the head and layer stages of `sub` on ids; the stream `out` [tokens, hidden]."""
    from ..numerics.stages import StageRunner

    runner = StageRunner(sub, ids, dtype)
    layer_stage = next(s for s, nodes in enumerate(runner.stages) if nodes[0].layer is not None)
    for s in range(layer_stage + 1):
        runner.run(s)
    x = torch.cat([env[id(out)] for env in runner.envs])
    return x.reshape(-1, x.shape[-1])


def _stream_interpreted(sub: Module, ids: torch.Tensor, out: Value) -> torch.Tensor:
    """Run `sub` as calibrate_ranges runs the whole model (the reference interpreter in float32,
    CALIB_ROWS sequences at a time); the stream `out` [tokens, hidden]."""
    from splice.ir.interpreter import Interpreter, default_feeds
    from ..quantize_activations import CALIB_ROWS

    interp = Interpreter(sub, torch.float32)
    xs = [interp.run(default_feeds(sub, chunk, None, torch.float32), capture=[out.name])[out.name]
          for chunk in ids.split(CALIB_ROWS)]
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])


def _layer_out(sub: Module, i: int) -> Value:
    return boundary(part_nodes(sub, i), sub.graph, f"layer {i}")[1]


class _Stream:
    """One calibrated pass's stream at one layer boundary, in memory or spilled to a file."""

    def __init__(self, spill_dir: Path | None, step: int = 0):
        self.spill_dir = spill_dir
        self.step = step
        self._x: torch.Tensor | None = None
        self._file: Path | None = None

    def put(self, x: torch.Tensor, i: int) -> None:
        if self.spill_dir is None:
            self._x = x
            return
        from safetensors.torch import save_file

        path = self.spill_dir / f"stream_{self.step:03d}_{i:05d}.safetensors"
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
                  work_dir: str | Path, *, instruments=(),
                  spill: bool = False) -> tuple[Module, list[dict[str, Any]]]:
    """Run `passes` on `module` one decoder layer at a time (see the module docstring); the
    transformed weights go to safetensors files in `work_dir`, which must outlive the returned
    Module (its weights are read from there)."""
    passes = list(passes)
    check_supported(passes)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    whole = [p for p in passes if p.name in WHOLE_MODEL]  # a prefix (check_supported)
    passes = passes[len(whole):]
    module, first = _run_whole_model(module, whole, ctx, work, instruments)
    if not passes:
        return module, first
    cal = check_recipe(passes, ctx)
    parts = split_stages(module.graph)
    pre, layers, post = parts
    tied = tied_table(pre, post) if len(layers) > 1 else None  # one part holds both ends
    calib = ctx.calibration
    if cal:
        calib = ctx.require_calibration(passes[cal[0]].name)
    if calib is not None and calib.dim() == 1:
        calib = calib[None]
    streams = {k: _Stream(work if spill else None, k) for k in cal}
    refs: dict = {}
    subs: list[Module] = []
    reports: list[list[dict]] = []
    plain = PassContext(calibration=None, seed=ctx.seed, precision=ctx.precision,
                        options=ctx.options, reducer=ctx.reducer)
    t0 = time.perf_counter()
    for i in range(len(layers)):
        sub = layer_module(module, i, parts, tied)
        rep: list[dict] = []
        start = 0
        for k in cal + [len(passes)]:  # the plain passes up to each calibrated one, then it
            if passes[start:k]:
                sub, more = PassManager(passes[start:k], instruments=instruments).run(sub, plain)
                rep += more
            if k < len(passes):
                sub, entry = _calibrated_step(sub, i, k, passes[k], ctx, calib, streams[k],
                                              last=i == len(layers) - 1)
                rep.append(entry)
            start = k + 1
        _same_decisions(passes, rep, reports[0] if reports else rep, i)
        _write_part(sub, i, len(layers), work, refs)
        sub.weights = {}
        subs.append(sub)
        reports.append(rep)
        gc.collect()
        logger.info("layerwise: layer %d/%d done (%.1f s)", i + 1, len(layers),
                    time.perf_counter() - t0)
    merged = merge(module, subs, refs)
    rotation = _merged_rotation(module, subs)
    if rotation is not None:
        merged.config = merged.config.replace(extra={**merged.config.extra,
                                                     "rotation": rotation})
    return merged, first + _merge_reports(passes, reports, len(first))


def _merged_rotation(module: Module, subs: list[Module]) -> dict[str, Any] | None:
    """The whole model's config.extra["rotation"] from the sub-modules' records (the config
    otherwise comes from the last one): a rotation applied here has the model's sizes, factors
    and seeds in every sub-module, and its counts are sums over them (less the stub head that
    each sub-module but the last adds to R1's readers), its collapsed patches all of theirs; a
    rotation the model already had stays as it was."""
    records = [sub.config.extra.get("rotation", {}) for sub in subs]
    if not records[-1]:
        return None
    before = module.config.extra.get("rotation", {})
    merged = {}
    for key, last in records[-1].items():
        if key in before:
            merged[key] = before[key]
            continue
        parts = [r.get(key, {}) for r in records]
        rec = dict(last)
        for count in ("layers", "readers", "writers"):
            if count in rec:
                rec[count] = sum(p.get(count, 0) for p in parts)
        if "readers" in rec:
            rec["readers"] -= len(subs) - 1
        for listed in ("patches_to_channel_scale", "online_after_norms"):
            names = [name for p in parts for name in p.get(listed, [])]
            if names:
                rec[listed] = names
        merged[key] = rec
    return merged


def _same_decisions(passes: Sequence[PassBase], rep: list[dict], first: list[dict],
                    i: int) -> None:
    """Refuse layer i where rotate_inputs decided otherwise than in layer 0: it takes over R1
    (online, the stream unrotated) where some norm keeps a per-channel scale, and a layer that
    did beside one that did not (rotate then rotates the stream there) would not be one model."""
    for k, p in enumerate(passes):
        here, there = bool(rep[k].get("modified")), bool(first[k].get("modified"))
        if p.name == "rotate_inputs" and here != there:
            did, didnt = (i, 0) if here else (0, i)
            raise LayerwiseError(f"layer-by-layer mode: rotate_inputs rotated the norms' readers "
                                 f"online in layer {did} but not in layer {didnt} (it acts where "
                                 "a norm keeps a per-channel scale); compile in memory "
                                 "(layerwise=False)")


def _run_whole_model(module: Module, passes: Sequence[PassBase], ctx: PassContext, work: Path,
                     instruments) -> tuple[Module, list[dict[str, Any]]]:
    """Run the whole-model passes on the whole module, weights still on disk where they are
    lazy: the reference interpreter reads each weight at the node that uses it and drops it
    after (ir/interpreter.py), and a weight a pass writes goes to its own file in `work`
    (LazyWeights.spill_to), so memory holds one weight and one calibration chunk's activations.
    Their results equal the in-memory run's bit for bit: the same interpreter runs the same
    nodes on the same chunks, only the weights come from disk each time."""
    if not passes:
        return module, []
    lazy = [module.weights] if isinstance(module.weights, LazyWeights) else []
    for w in lazy:
        w.spill_to(work / "whole_model", SPILL_MIN_BYTES)
    t0 = time.perf_counter()
    try:
        module, report = PassManager(passes, instruments=instruments).run(module, ctx)
    finally:
        for w in lazy + [module.weights]:
            if isinstance(w, LazyWeights):
                w.spill_to(None)
    logger.info("layerwise: whole-model passes %s done (%.1f s)",
                ", ".join(p.name for p in passes), time.perf_counter() - t0)
    return module, report


def _calibrated_step(sub: Module, i: int, step: int, p: PassBase, ctx: PassContext,
                     calib: torch.Tensor,
                     stream: _Stream, *, last: bool) -> tuple[Module, dict]:
    """Run the calibrated pass on layer i's sub-module fed with its stream X_i, and advance the
    stream to X_(i+1): through the layer after the pass where the pass is `sequential`, else
    before it. Called directly (not through the manager): while the stub table holds the stream
    its declared dtype and shape are off, so the sub-module is verified after it is restored."""
    t0 = time.perf_counter()
    ids = calib
    fed = None
    if i > 0:
        ids = torch.arange(calib.numel(), dtype=torch.int64).reshape(calib.shape)
        fed = _feed_stream(sub, i, stream.get())
    sub_ctx = PassContext(calibration=ids, seed=ctx.seed, precision=ctx.precision,
                          options=ctx.options, reducer=ctx.reducer)
    ahead = None
    if not last and not sequential(p):
        ahead = _stream_interpreted(sub, ids, _layer_out(sub, i))
    result = p.call(sub, sub_ctx)
    sub = result.module
    if not last and sequential(p):
        ahead = _stream_through(sub, ids, ctx.precision, _layer_out(sub, i))
    if ahead is not None:
        stream.put(ahead, i + 1)
    if fed is not None:
        _unfeed_stream(sub, *fed)
    verify_graph(sub.graph)
    from .manager import jsonable

    return sub, jsonable({"step": step, "name": p.name,
                          "settings": p.settings(), "modified": result.modified,
                          "time_s": round(time.perf_counter() - t0, 4), "report": result.report})


def _feed_stream(sub: Module, i: int, x: torch.Tensor) -> tuple[Node, Value]:
    """Make layer i's stub embedding look up the stream x (tokens as rows) in STUB_TABLE; returns
    the stub and the table it read before (the tied table in the last layer's sub-module)."""
    stub = stream_source(sub, i)
    if stub is None or stub.op != "embedding" or stub.origin != "layerwise":
        raise LayerwiseError(f"layer-by-layer mode: layer {i}'s stream no longer comes from its "
                             "stub embedding, so the calibrated pass cannot be fed")
    table = stub.inputs[1]
    assert table is not None
    if table.const != STUB_TABLE:
        stub.replace_input(1, sub.graph.const(STUB_TABLE, "f32", (1, x.shape[-1])))
    sub.weights[STUB_TABLE] = x
    return stub, table


def _unfeed_stream(sub: Module, stub: Node, table: Value) -> None:
    """Undo _feed_stream: the stub reads its own table again, or a one-row zero STUB_TABLE where
    the pass dropped the tied table (it quantized the head, the table's other reader)."""
    g = sub.graph
    if table.const != STUB_TABLE and g.consts.get(table.const or "") is table:
        stub.replace_input(1, table)
        g.remove_const(STUB_TABLE)
        del sub.weights[STUB_TABLE]
    else:
        sub.weights[STUB_TABLE] = torch.zeros(1, g.consts[STUB_TABLE].shape[1])


def _write_part(sub: Module, i: int, n_layers: int, work: Path, refs: dict) -> None:
    """Write the weights of sub-module i's kept nodes to one safetensors file; a weight another
    part already wrote (rotary frequencies, a tied table) must be equal to it bit for bit."""
    from safetensors.torch import save_file

    fresh = {}
    for name in sorted(consts(kept(sub, i, n_layers))):
        t = sub.weights[name]
        if name in refs:
            old = refs[name].load()
            if old.dtype != t.dtype or not torch.equal(old, t):
                raise LayerwiseError(f"layer-by-layer mode: weight {name} (one weight in the "
                                     f"whole model) came out of layer {i}'s sub-module different "
                                     f"from what an earlier one wrote to {refs[name].path.name}; "
                                     "compile in memory (layerwise=False)")
            continue
        fresh[name] = t.contiguous()
    path = work / f"part_{i:05d}.safetensors"
    save_file(fresh, str(path))
    refs.update(file_refs(path))


def _merge_reports(passes: Sequence[PassBase], reports: list[list[dict]],
                   first_step: int = 0) -> list[dict]:
    """One entry per pass: modified if any layer's run modified, times summed, each layer's own
    report under "layers"."""
    merged = []
    for k, p in enumerate(passes):
        runs = [rep[k] for rep in reports]
        merged.append({"step": first_step + k, "name": p.name, "settings": runs[0].get("settings"),
                       "modified": any(r.get("modified") for r in runs),
                       "time_s": round(sum(r.get("time_s", 0.0) for r in runs), 3),
                       "layerwise": True,
                       "report": {"layers": {str(i): r.get("report") for i, r in enumerate(runs)}}})
    return merged
