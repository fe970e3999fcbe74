"""Absorb sandwich post-norms (Gemma 2/3's attn_post_norm and mlp_post_norm) into the linear
before them, replacing each token's division by its RMS with a scale fitted on calibration tokens.

A post-norm computes y = o / rms(o) * gamma with o = x W^T + b the output of o_proj or down_proj
and gamma = offset + w. When rms(o) hardly varies from token to token it can be replaced by its
mean r over calibration tokens, and then y = x (diag(gamma / r) W)^T + b * gamma / r: the norm
disappears into the rows of the linear. This is Pangu Light's "absorbing Post-RMSNorm" (Chen et
al., "Pangu Light: Weight Re-Initialization for Pruning and Accelerating LLMs", 2025). Without the
post-norms the residual stream is written by plain linears again, so rotate's R1 needs no online
Hadamard after them (it rotates after a post-norm it finds; an absorbed one costs nothing at run
time).

The fit: "mean" is Pangu Light's gamma / r; "lsq" (the default) fits each channel's scale c_j
by least squares against the norm's own outputs on the calibration tokens, c_j = gamma_j
sum(o_j^2 / rms) / sum(o_j^2), which is never further from them than gamma / r (equal when the
rms is constant). What absorbing costs is measured per norm in the same run: the stream error
sum ||y - c o||^2 / sum ||h||^2, the squared error put into the residual stream h relative to the
stream itself; `max_error` leaves a norm whose error is above it, so that the cheap ones are
absorbed and the rest stay exact (rotated online by rotate).

Which norms: an rms_norm over the whole last dim whose input is made by a linear with a constant,
unshared weight that feeds nothing else, and whose output goes only to residual adds. Per norm the
pass measures, on ctx.calibration in the reference interpreter (at ctx.precision), each token's
rms sqrt(mean(o^2) + eps), its mean r and its relative spread std / r, and absorbs the norm when
the spread is at most `max_spread` and the stream error at most `max_error`; another is left in
place, with its figures in the report. All statistics come from one run of the unmodified model,
as running sums, `chunk_tokens` tokens (whole sequences, at least one) at a time, and no more
sequences than hold LOGITS_BYTES of logits; the before and after comparison runs both models on
the same chunks. Peak memory is one chunk's activations and logits, whatever the calibration size
and the vocabulary (a 262k vocabulary held 4.3 GB per float64 logits tensor of 2,048 tokens: the
default chunk alone was killed at 22 GB on Gemma 3 270M before the logits bound).

Exactness: lossy (exact only if every token's rms equals r). The report gives per layer the
spread and the decision, and the calibration batch's perplexity and KL before and after; the
NumericCheckInstrument reports the same on its pinned batch.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch

from splice.ir.core import Module, Node
from splice.ir.interpreter import Interpreter, default_feeds
from splice.ir.parser import parse_graph
from splice.ir.printer import print_graph
from .infra.base import PassBase, PassContext, PassError, PassResult
from .infra.instruments import compare_logits
from .infra.registry import register_pass

logger = logging.getLogger(__name__)
FITS = ("lsq", "mean")
LOGITS_BYTES = 1 << 30  # the logits one chunk may hold, per model (one sequence at least)


def _label(node: Node) -> str:
    if node.layer is not None:
        return f"layers.{node.layer}.{node.role or node.op}"
    return node.role or node.output.name


def post_norms(module: Module) -> list[tuple[Node, Node]]:
    """(norm, linear) for every post-norm as the module docstring defines it."""
    found = []
    for norm in module.graph.find(op="rms_norm"):
        x = norm.inputs[0]
        lin = x.producer if x is not None else None
        if norm.attrs["group"] or lin is None or lin.op != "linear":
            continue
        users = norm.output.users()
        if not users or any(u.op != "add" for u in users):
            continue
        found.append((norm, lin))
    return found


def _why_not(module: Module, norm: Node, lin: Node) -> str | None:
    """None when the post-norm can be absorbed into `lin`, else the reason it cannot."""
    w = lin.inputs[1]
    if w is None or not w.is_const:
        return f"{_label(lin)} has a computed weight"
    if not module.weight(w).is_floating_point():
        return f"{_label(lin)} has a non-float weight"
    for v in lin.inputs[1:]:
        if v is not None and any(u is not lin for u in v.users()):
            return f"%{v.name} of {_label(lin)} is shared with another node"
    if lin.output.users() != [norm]:
        return f"the output of {_label(lin)} feeds more than the norm"
    nw = norm.inputs[1] if len(norm.inputs) > 1 else None
    if nw is not None and not nw.is_const:
        return "its weight is computed, not a constant"
    if norm.output in module.graph.outputs:
        return "its output is a graph output"
    return None


def _check_batch(module: Module, calib: torch.Tensor) -> torch.Tensor:
    if calib.dim() == 1:
        calib = calib[None]
    if calib.dim() != 2 or calib.is_floating_point() or calib.dtype == torch.bool:
        raise PassError(f"absorb_post_norm: calibration must be integer token ids [batch, seq], "
                        f"got {calib.dtype} {list(calib.shape)}")
    vocab = module.config.vocab_size
    if int(calib.min()) < 0 or int(calib.max()) >= vocab:
        raise PassError(f"absorb_post_norm: calibration token ids must lie in 0..{vocab - 1} "
                        f"(the model's vocabulary), got {int(calib.min())}..{int(calib.max())}")
    return calib.to(torch.int64)


def _logits(module: Module, run: Interpreter, feeds: dict[str, torch.Tensor],
            hook=None) -> torch.Tensor:
    """The logits of one interpreter run (no other output kept)."""
    names = [v.name for v in module.graph.outputs]
    name = "logits" if "logits" in names else names[0]
    return run.run(feeds, hook=hook, outputs=[name])[name]


class _Sums:
    """Running sums over calibration tokens for one post-norm y = gamma * o / r (r the token's
    rms): r's mean and sum of squared deviations (spread), per channel of o^2, o^2 / r and
    o^2 / r^2 (the fitted scale and the error it leaves) and of the residual stream's squared
    norm after the add."""

    def __init__(self, norm: Node, lin: Node, module: Module):
        nw = norm.inputs[1] if len(norm.inputs) > 1 else None
        width = lin.inputs[1].shape[0]
        self.gamma = (module.weight(nw).to(torch.float64) + float(norm.attrs["offset"])
                      if nw is not None else torch.ones(width, dtype=torch.float64))
        self.eps = float(norm.attrs["eps"])
        self.tokens, self.mean, self.m2, self.stream = 0, 0.0, 0.0, 0.0
        self.s0, self.s1, self.s2 = (torch.zeros(width, dtype=torch.float64) for _ in range(3))

    def add_input(self, o: torch.Tensor) -> None:
        o = o.detach().to(torch.float64).reshape(-1, o.shape[-1])
        r = torch.sqrt(o.pow(2).mean(-1) + self.eps)
        o2 = o.pow(2)
        n, mean = r.numel(), r.mean().item()
        total = self.tokens + n  # Chan et al.'s pairwise update of the mean and the M2 sum
        delta = mean - self.mean
        self.m2 += (r - mean).pow(2).sum().item() + delta * delta * self.tokens * n / total
        self.mean += delta * n / total
        self.tokens = total
        self.s0 += o2.sum(0)
        self.s1 += (o2 / r[:, None]).sum(0)
        self.s2 += (o2 / r[:, None].pow(2)).sum(0)

    def add_stream(self, h: torch.Tensor) -> None:
        self.stream += h.detach().to(torch.float64).pow(2).sum().item()

    def fit(self, how: str) -> tuple[torch.Tensor, dict[str, Any]]:
        """The scale c that replaces gamma / r, and the report entry. "mean": gamma / mean(r)
        (Pangu Light); "lsq": per channel the least-squares c_j = gamma_j sum(o_j^2 / r) /
        sum(o_j^2), which minimises the squared difference to the norm's outputs. The stream
        error is sum ||y - c o||^2 over sum ||h||^2 (h the residual stream after the add)."""
        mean, var = self.mean, self.m2 / self.tokens
        g = self.gamma
        if how == "mean":
            c = g / mean
        else:
            c = torch.where(self.s0 > 0, g * self.s1 / self.s0.clamp_min(1e-300), g / mean)
        err = (g.pow(2) * self.s2 - 2 * g * c * self.s1 + c.pow(2) * self.s0).sum().item()
        return c, {"rms_mean": mean, "spread": math.sqrt(var) / mean,
                   "stream_error": max(err, 0.0) / max(self.stream, 1e-300)}


def _shallow_copy(module: Module) -> Module:
    """The module as it is, sharing its weight tensors (set_weight replaces a tensor, never
    writes into it), so the comparison after absorbing costs no copy of the weights."""
    return Module(parse_graph(print_graph(module.graph)), dict(module.weights), module.config,
                  module.tokenizer)


def _compare(before: Module, after: Module, calib: torch.Tensor, rows: int,
             dtype: torch.dtype) -> dict[str, Any]:
    """compare_logits over the calibration batch, `rows` sequences at a time (one chunk's logits
    of each model in memory), combined: means weighted by tokens, the largest difference
    relative to the largest |logit| over all chunks."""
    runs = (Interpreter(before, dtype), Interpreter(after, dtype))
    tot: dict[str, float] = {"kl": 0.0, "top1": 0.0, "nll_b": 0.0, "nll_a": 0.0, "diff": 0.0,
                             "scale": 0.0}
    tokens = pairs = 0
    with torch.no_grad():
        for i in range(0, calib.shape[0], rows):
            ids = calib[i:i + rows]
            b, a = (_logits(m, r, default_feeds(m, ids, None, dtype))
                    for m, r in zip((before, after), runs))
            st = compare_logits(b, a, ids)
            n, scale = ids.numel(), b.abs().max().item()
            tot["kl"] += st["kl"] * n
            tot["top1"] += st["top1_agreement"] * n
            tot["diff"] = max(tot["diff"], st["max_rel_diff"] * (scale or 1.0))
            tot["scale"] = max(tot["scale"], scale)
            tokens += n
            if "ppl_ratio" in st:
                k = ids.shape[0] * (ids.shape[1] - 1)
                tot["nll_b"] += math.log(st["ppl_before"]) * k
                tot["nll_a"] += math.log(st["ppl_after"]) * k
                pairs += k
            del b, a
    stats: dict[str, Any] = {"max_rel_diff": tot["diff"] / (tot["scale"] or 1.0),
                             "kl": tot["kl"] / tokens, "top1_agreement": tot["top1"] / tokens,
                             "tokens": tokens}
    if pairs:
        nb, na = tot["nll_b"] / pairs, tot["nll_a"] / pairs
        stats.update(ppl_before=math.exp(nb), ppl_after=math.exp(na), ppl_ratio=math.exp(na - nb))
    return stats


@register_pass
@dataclasses.dataclass(frozen=True)
class AbsorbPostNormPass(PassBase):
    """Fold each sandwich post-norm into the linear before it, its per-token RMS replaced by a
    fitted scale (Pangu Light's mean RMS, or per-channel least squares). Lossy.

    Settings: `max_spread` is the largest relative spread (std / mean) of a norm's input RMS over
    the calibration tokens at which it is still absorbed, `max_error` the largest stream error;
    `fit` "lsq" | "mean"; `min_tokens` the fewest calibration tokens the pass accepts;
    `chunk_tokens` the tokens run at once.
    """

    name = "absorb_post_norm"
    exact = False

    max_spread: float = 0.1
    min_tokens: int = 64
    fit: str = "lsq"
    max_error: float = math.inf
    chunk_tokens: int = 2048

    def call(self, module: Module, ctx: PassContext) -> PassResult:
        if not self.max_spread >= 0:
            raise PassError(f"absorb_post_norm: max_spread must be a number >= 0 (inf absorbs "
                            f"every post-norm), got {self.max_spread!r}")
        if self.min_tokens < 1:
            raise PassError(f"absorb_post_norm: min_tokens must be >= 1, got {self.min_tokens}")
        if self.fit not in FITS:
            raise PassError(f"absorb_post_norm: fit {self.fit!r}; accepted: {', '.join(FITS)}")
        if not self.max_error >= 0:
            raise PassError(f"absorb_post_norm: max_error must be a number >= 0 (inf: no limit), "
                            f"got {self.max_error!r}")
        if self.chunk_tokens < 1:
            raise PassError(f"absorb_post_norm: chunk_tokens must be >= 1, got "
                            f"{self.chunk_tokens}")
        found = post_norms(module)
        report: dict[str, Any] = {"absorbed": [], "left": {}, "layers": {}}
        if not found:
            report["note"] = ("no post-norms found (an rms_norm between a linear and a residual "
                              "add, as Gemma 2/3's sandwich norms): nothing to absorb")
            return PassResult(module, False, report)
        calib = _check_batch(module, ctx.require_calibration(self.name, self.min_tokens))
        candidates = []
        for norm, lin in found:
            reason = _why_not(module, norm, lin)
            if reason is None:
                candidates.append((norm, lin))
            else:
                report["left"][_label(norm)] = reason
        if not candidates:
            return PassResult(module, False, report)

        # one run of the unmodified model, a chunk of sequences at a time: per candidate the
        # sums that give its rms mean and spread, the fitted scale and the error it leaves
        dtype = ctx.precision
        sums = {id(norm): _Sums(norm, lin, module) for norm, lin in candidates}
        by_lin = {id(lin): sums[id(norm)] for norm, lin in candidates}
        by_add = {id(norm.output.users()[0]): sums[id(norm)] for norm, _ in candidates}

        def hook(node: Node, outs: tuple[torch.Tensor, ...]) -> None:
            if id(node) in by_lin:
                by_lin[id(node)].add_input(outs[0])
            elif id(node) in by_add:
                by_add[id(node)].add_stream(outs[0])

        seq = calib.shape[1]
        per_row = seq * int(module.config.vocab_size) * (torch.finfo(dtype).bits // 8)
        rows = max(1, min(self.chunk_tokens // seq, LOGITS_BYTES // per_row))
        report["chunk_rows"] = rows
        run = Interpreter(module, dtype)
        with torch.no_grad():
            for i in range(0, calib.shape[0], rows):
                _logits(module, run, default_feeds(module, calib[i:i + rows], None, dtype), hook)
        before = _shallow_copy(module)

        g = module.graph
        dropped = []
        for norm, lin in candidates:
            st = sums[id(norm)]
            label = _label(norm)
            scale, entry = st.fit(self.fit)
            report["layers"][label] = entry
            why = []
            if not entry["spread"] <= self.max_spread:
                why.append(f"rms spread {entry['spread']:.3g} over {st.tokens} tokens > "
                           f"max_spread {self.max_spread:g}")
            if not entry["stream_error"] <= self.max_error:
                why.append(f"stream error {entry['stream_error']:.3g} > max_error "
                           f"{self.max_error:g}")
            if why:
                entry["decision"] = "left"
                report["left"][label] = "; ".join(why)
                continue
            entry["decision"] = "absorbed"
            nw = norm.inputs[1] if len(norm.inputs) > 1 else None
            for index in (1, 2):
                v = lin.inputs[index] if index < len(lin.inputs) else None
                if v is None:
                    continue
                t = module.weight(v)
                scaled = t.to(torch.float64) * (scale[:, None] if index == 1 else scale)
                module.set_weight(v, scaled.to(t.dtype))
            name = norm.output.name
            norm.output.replace_all_uses_with(lin.output)
            g.remove(norm)
            if nw is not None and nw.is_const and not nw.uses:
                g.remove_const(nw.const)
                module.weights.pop(nw.const, None)
                dropped.append(nw.const)
            report["absorbed"].append(label)
            logger.debug("absorb_post_norm: %s (was %%%s) rms %.4g spread %.3g stream error "
                         "%.3g", label, name, entry["rms_mean"], entry["spread"],
                         entry["stream_error"])
        report["dropped_weights"] = dropped
        report["calibration_tokens"] = int(calib.numel())
        report["fit"] = self.fit
        if report["absorbed"]:
            stats = _compare(before, module, calib, rows, dtype)
            report["calibration"] = stats
            if "ppl_ratio" in stats:
                logger.info("absorb_post_norm: absorbed %d, left %d; calibration perplexity "
                            "%.4g -> %.4g", len(report["absorbed"]), len(report["left"]),
                            stats["ppl_before"], stats["ppl_after"])
        return PassResult(module, bool(report["absorbed"]), report)

