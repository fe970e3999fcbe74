"""Bisect a recipe: the first pass, then the first layer inside it, at which a metric crosses a
tolerance.

Pass level: the recipe runs through a PassManager with the verifier and a measuring instrument.
After each pass the instrument compares the logits on the pinned batch with the original model's
and caches the module (a Module.clone() in memory, or save_module into a cache directory for
models too big to hold n copies of); it stops the run at the first pass that crosses the
tolerance: the culprit. `kl` is KL(original || current) averaged over tokens, `ppl` the relative
increase of the batch's perplexity (ppl_current / ppl_original − 1). The metric is measured
against the original, not the previous step, so a slow drift is caught where it adds up, as a
user sees it. Errors name the failing pass and its step as in any PassManager run.

Layer level: the culprit pass is re-run from the cached module before it (a second run also shows
that the pass is deterministic), and hybrids keep its changes for layers ≤ L only. For a pass that
only changed weights (the IR text is unchanged) a hybrid is the post-pass module with the weights
of layers > L (named `layers.{i}.*`) put back to their pre-pass values. For a pass that changed the
graph, a hybrid takes each layer's nodes from the post-pass graph (layers ≤ L) or the pre-pass
one, with the weights they read; that works when the pass kept the layers' boundary values and names
(fold_norms, rotations), and is refused with the reason otherwise (a pass that removes layers). A
binary search over L (assuming a change's damage does not shrink as more layers keep it) finds the
first layer whose changes cross the tolerance; changes outside the layers (embedding, head) are
always kept, and when they alone cross, the report says so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from splice.errors import InputError
from splice.ir.core import Module
from splice.ir.interpreter import run_logits
from splice.ir.parser import parse_graph
from splice.ir.printer import format_type
from splice.ir.serialize import load_module, save_module
from splice.ir.verify import verify
from .base import PassBase, PassContext
from .instruments import Instrument, VerifyInstrument, compare_logits
from .manager import PassFailure, PassManager

if TYPE_CHECKING:  # only annotated: the recipe (splice/) is above the pass infrastructure
    from splice.recipe import Recipe

log = logging.getLogger(__name__)

METRICS = ("kl", "ppl")
_LAYER = re.compile(r"^layers\.(\d+)\.")


class LayerSpliceError(InputError):
    """A pass's changes cannot be split by layer (the message says why)."""


def metric_value(metric: str, reference: torch.Tensor, logits: torch.Tensor,
                 batch: torch.Tensor) -> float:
    """`kl`: mean KL(reference || logits) per token; `ppl`: relative perplexity increase."""
    stats = compare_logits(reference, logits, batch)
    if metric == "kl":
        return float(stats["kl"])
    if metric == "ppl":
        return float(stats["ppl_ratio"]) - 1.0
    raise InputError(f"unknown metric {metric!r}; accepted: {', '.join(METRICS)}")


def _logits(module: Module, batch: torch.Tensor) -> torch.Tensor:
    outs = run_logits(module, batch, torch.float64)
    return outs["logits"] if "logits" in outs else outs[module.graph.outputs[0].name]


class ModuleCache:
    """The module before each step: clones in memory, or saved modules under `directory`."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = None if directory is None else Path(directory)
        self._memory: dict[int, Module] = {}

    def put(self, step: int, module: Module) -> None:
        if self.directory is None:
            self._memory[step] = module.clone()
        else:
            save_module(module, self.directory / f"{step:03d}")

    def get(self, step: int) -> Module:
        """A fresh copy (the caller may hand it to a pass that edits in place)."""
        if self.directory is None:
            return self._memory[step].clone()
        return load_module(self.directory / f"{step:03d}")


def layer_of(weight_name: str) -> int | None:
    m = _LAYER.match(weight_name)
    return int(m.group(1)) if m else None


def _line(node, rename: dict[str, str]) -> str:
    """A node in the text form, with constants renamed by `rename` (parser.py reads it)."""
    outs = ", ".join(f"%{v.name}: {format_type(v)}" for v in node.outputs)
    ins = ", ".join("none" if v is None else
                    f"%{rename.get(v.name, v.name) if v.is_const else v.name}"
                    for v in node.inputs)
    meta = json.dumps({"layer": node.layer, "role": node.role, "origin": node.origin})
    return f"  {outs} = {node.op}({ins}) {json.dumps(node.attrs, sort_keys=True)} {meta}"


def splice_layers(pre: Module, post: Module, keep_upto: int) -> Module:
    """`post` with its changes kept for layers ≤ `keep_upto` and undone above (see the module
    docstring). Raises LayerSpliceError when the change cannot be split by layer."""
    if str(pre.graph) == str(post.graph):
        hybrid = post.clone()
        for name, t in pre.weights.items():
            layer = layer_of(name)
            if layer is not None and layer > keep_upto:
                hybrid.set_weight(hybrid.graph.consts[name], t.clone())
        return hybrid
    gp, gq = pre.graph, post.graph
    if gp.layers() != gq.layers():
        raise LayerSpliceError(f"the pass changed the set of layers ({gp.layers()} -> "
                               f"{gq.layers()}), so its changes have no per-layer split")
    if [(v.name, format_type(v)) for v in gp.inputs] != [(v.name, format_type(v))
                                                          for v in gq.inputs]:
        raise LayerSpliceError("the pass changed the graph inputs")
    by_layer: dict[int, list] = {}
    for n in gp.nodes:
        if n.layer is not None:
            by_layer.setdefault(n.layer, []).append(n)
    chosen: list[tuple[Any, Module]] = []
    done: set[int] = set()
    for n in gq.nodes:
        if n.layer is not None and n.layer > keep_upto:
            if n.layer not in done:
                done.add(n.layer)
                chosen += [(m, pre) for m in by_layer.get(n.layer, [])]
            continue
        chosen.append((n, post))
    used_post = {v.name for n, side in chosen if side is post for v in n.inputs
                 if v is not None and v.is_const}
    weights: dict[str, torch.Tensor] = {}
    rename: dict[str, str] = {}
    consts: list[str] = []
    for n, side in chosen:
        for v in n.inputs:
            if v is None or not v.is_const:
                continue
            t = side.weights[v.name]
            name = v.name
            if side is pre and name in used_post and not torch.equal(t, post.weights[name]):
                name = rename.setdefault(v.name, f"{v.name}.before")
            if name not in weights:
                weights[name] = t.clone()
                consts.append(f"  const %{name}: {format_type(v)}")
    lines = ["graph(" + ", ".join(f"%{v.name}: {format_type(v)}" for v in gq.inputs) + ") {"]
    lines += consts
    lines += [_line(n, rename if side is pre else {}) for n, side in chosen]
    lines += ["  return " + ", ".join(f"%{v.name}" for v in gq.outputs), "}"]
    try:
        hybrid = Module(parse_graph("\n".join(lines) + "\n"), weights, post.config,
                        post.tokenizer)
        verify(hybrid)
    except InputError as e:
        raise LayerSpliceError(f"the pass changed the values between layers, so its layers do "
                               f"not recombine: {e}") from None
    return hybrid


@dataclasses.dataclass
class BisectResult:
    """What the bisection found. `steps`: the metric after each pass run (up to the culprit);
    `layer`: the first layer whose changes cross (None when not found or not splittable;
    `layer_note` says why); `layer_probes`: each hybrid measured."""

    found: bool
    metric: str
    tolerance: float
    steps: list[dict[str, Any]]
    culprit_step: int | None = None
    culprit_name: str | None = None
    layer: int | None = None
    layer_note: str = ""
    layer_probes: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    report: str | None = None

    @property
    def summary(self) -> str:
        if not self.found:
            worst = max(self.steps, key=lambda s: s["value"], default=None)
            where = f"; largest {self.metric} {worst['value']:.4g} after {worst['name']} (step " \
                    f"{worst['step']})" if worst else ""
            return f"no pass crosses the tolerance {self.metric} > {self.tolerance:g}{where}"
        value = self.steps[-1]["value"]
        layer = "none" if self.layer is None else str(self.layer)
        return (f"first bad pass: {self.culprit_name} (step {self.culprit_step}), first bad "
                f"layer: {layer}; metric {self.metric} {value:.4g} > tolerance {self.tolerance:g}")

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "summary": self.summary}


def _layer_search(p: PassBase, pre: Module, ctx: PassContext, metric: str, tol: float,
                  ref: torch.Tensor, batch: torch.Tensor,
                  result: BisectResult, stage: Callable[[str], None]) -> None:
    stage(f"layer search: {p.name} again")
    post, _ = PassManager([p], [VerifyInstrument()]).run(pre.clone(), ctx)
    again = metric_value(metric, ref, _logits(post, batch), batch)
    cached = result.steps[-1]["value"]
    if not again > tol:
        result.layer_note = (f"re-running {result.culprit_name} from the module before it gave "
                             f"{metric} {again:.4g} (first run {cached:.4g}): the pass is not "
                             "deterministic here, so no layer search")
        return
    layers = post.graph.layers()
    if not layers:
        result.layer_note = "the graph has no layers"
        return

    def probe(keep: int) -> bool:
        stage(f"layer search: changes of layers <= {keep}")
        value = metric_value(metric, ref, _logits(splice_layers(pre, post, keep), batch), batch)
        crosses = value > tol
        result.layer_probes.append({"layers_kept": keep, "value": value, "crosses": crosses})
        log.info("bisect: %s changes kept for layers <= %d: %s %.4g", result.culprit_name, keep,
                 metric, value)
        return crosses

    try:
        if probe(layers[0] - 1):
            result.layer_note = ("the pass's changes outside the decoder layers (embedding, "
                                 "final norm, head) already cross the tolerance on their own")
            return
        lo, hi = 0, len(layers) - 1   # indexes into `layers`: lo..hi holds the answer
        while lo < hi:
            mid = (lo + hi) // 2
            if probe(layers[mid]):
                hi = mid
            else:
                lo = mid + 1
    except LayerSpliceError as e:
        result.layer_note = f"no layer search: {e}"
        return
    result.layer = layers[lo]
    result.layer_note = (f"changes of layers ≤ {layers[lo]} cross the tolerance, of layers ≤ "
                         f"{layers[lo] - 1} do not")


class _Crossed(Exception):
    """Raised by the bisection's instrument to stop the run at the first crossing (the manager
    wraps it in a PassFailure, whose cause it stays)."""


class _MeasureInstrument(Instrument):
    """After each pass: the metric against the original, then the module cached for the next
    step; stops the run at the first pass that crosses the tolerance."""

    def __init__(self, cache: ModuleCache, result: BisectResult, ref: torch.Tensor,
                 batch: torch.Tensor, stage: Callable[[str], None]):
        self.cache, self.result, self.ref, self.batch = cache, result, ref, batch
        self.stage = stage

    def before_pass(self, module: Module, pass_: PassBase, ctx: PassContext) -> None:
        self.stage(f"pass {pass_.name}")

    def after_pass(self, module: Module, pass_: PassBase, ctx: PassContext, res: Any,
                   record: dict[str, Any]) -> None:
        r = self.result
        k = record["step"]
        value = metric_value(r.metric, self.ref, _logits(module, self.batch), self.batch)
        crosses = value > r.tolerance
        r.steps.append({"step": k, "name": pass_.name, "exact": bool(pass_.exact),
                        "value": value, "crosses": crosses})
        record["bisect"] = {"metric": r.metric, "value": value}
        log.info("bisect: after %s (step %d) %s = %.4g", pass_.name, k, r.metric, value)
        if crosses:
            raise _Crossed(k)
        self.cache.put(k + 1, module)


def bisect(module: Module, recipe: Recipe, *, metric: str, tolerance: float,
           batch: torch.Tensor, calibration: torch.Tensor | None = None,
           seed: int | None = None, cache_dir: str | Path | None = None,
           progress: Callable[[str], None] | None = None) -> BisectResult:
    """Find the first pass of `recipe` (then the first layer in it) whose result crosses
    `tolerance` in `metric` ("kl" or "ppl") on the pinned `batch`. `module` is left as it was.
    `progress` is given the name of each step as it starts (splice.progress.Progress.stage)."""
    if metric not in METRICS:
        raise InputError(f"unknown metric {metric!r}; accepted: {', '.join(METRICS)}")
    if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) \
            or not tolerance >= 0:
        raise InputError(f"tolerance must be a number >= 0, got {tolerance!r}")
    if batch.dim() != 2 or batch.shape[1] < 2:
        raise InputError("the bisection batch needs rows of at least 2 tokens")
    # `module` stays as it was: the reference of both runs (the recipe's, the layer search's)
    ctx = PassContext(calibration=calibration, seed=recipe.seed if seed is None else seed,
                      reference=module,
                      precision=recipe.precision)
    stage = progress or (lambda name: None)
    cache = ModuleCache(cache_dir)
    start = module.clone()
    stage("reference logits")
    ref = _logits(start, batch)
    cache.put(0, start)
    result = BisectResult(False, metric, float(tolerance), [])
    measure = _MeasureInstrument(cache, result, ref, batch, stage)
    try:
        PassManager(recipe.build(), [VerifyInstrument(), measure]).run(start, ctx)
    except PassFailure as e:
        if not isinstance(e.__cause__, _Crossed):
            raise
        k = e.step
        p = recipe.passes[k]
        result.found, result.culprit_step, result.culprit_name = True, k, p.name
        _layer_search(p, cache.get(k), ctx, metric, float(tolerance), ref, batch, result,
                      stage)
    return result
