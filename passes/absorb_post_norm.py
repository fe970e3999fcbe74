"""Absorb sandwich post-norms (Gemma 2/3's attn_post_norm and mlp_post_norm) into the linear
before them, replacing each token's RMS by its mean over calibration tokens.

A post-norm computes y = o / rms(o) * gamma with o = x W^T + b the output of o_proj or down_proj
and gamma = offset + w. When rms(o) hardly varies from token to token it can be replaced by its
mean r over calibration tokens, and then y = x (diag(gamma / r) W)^T + b * gamma / r: the norm
disappears into the rows of the linear. This is Pangu Light's "absorbing Post-RMSNorm" (Chen et
al., "Pangu Light: Weight Re-Initialization for Pruning and Accelerating LLMs", 2025). Without the
post-norms the residual stream is written by plain linears again, so R1 of the rotate pass (which
refuses per-channel post-norm scales) can run on Gemma.

Which norms: an rms_norm over the whole last dim whose input is made by a linear with a constant,
unshared weight that feeds nothing else, and whose output goes only to residual adds. Per norm the
pass measures, on ctx.calibration in the reference interpreter (at ctx.precision), each token's
rms sqrt(mean(o^2) + eps), its mean r and its relative spread std / r, and absorbs the norm when
the spread is at most `max_spread`; a norm whose rms varies more is left in place, with the
spread in the report. All statistics come from one run of the unmodified model.

Exactness: lossy (exact only if every token's rms equals r). The report gives per layer the
spread and the decision, and the calibration batch's perplexity and KL before and after; the
NumericCheckInstrument reports the same on its pinned batch.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from splice.ir.core import Module, Node
from splice.ir.interpreter import Interpreter, default_feeds
from .infra.base import PassBase, PassContext, PassError, PassResult
from .infra.instruments import compare_logits
from .infra.registry import register_pass

logger = logging.getLogger(__name__)


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


@register_pass
@dataclasses.dataclass(frozen=True)
class AbsorbPostNormPass(PassBase):
    """Fold each sandwich post-norm into the linear before it, dividing by the mean calibration
    RMS (Pangu Light). Lossy.

    Settings: `max_spread` is the largest relative spread (std / mean) of a norm's input RMS over
    the calibration tokens at which it is still absorbed; `min_tokens` the fewest calibration
    tokens the pass accepts.
    """

    name = "absorb_post_norm"
    exact = False

    max_spread: float = 0.1
    min_tokens: int = 64

    def call(self, module: Module, ctx: PassContext) -> PassResult:
        if not self.max_spread >= 0:
            raise PassError(f"absorb_post_norm: max_spread must be a number >= 0 (inf absorbs "
                            f"every post-norm), got {self.max_spread!r}")
        if self.min_tokens < 1:
            raise PassError(f"absorb_post_norm: min_tokens must be >= 1, got {self.min_tokens}")
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

        # one run of the unmodified model: each candidate's per-token rms, and the logits
        dtype = ctx.precision
        watched = {id(lin): norm for norm, lin in candidates}
        rms: dict[int, torch.Tensor] = {}

        def hook(node: Node, outs: tuple[torch.Tensor, ...]) -> None:
            norm = watched.get(id(node))
            if norm is not None:
                o = outs[0].to(torch.float64)
                rms[id(norm)] = torch.sqrt(o.pow(2).mean(-1) + norm.attrs["eps"]).flatten()

        feeds = default_feeds(module, calib, None, dtype)
        before = _logits(module, Interpreter(module, dtype), feeds, hook)

        g = module.graph
        dropped = []
        for norm, lin in candidates:
            r = rms[id(norm)]
            mean = r.mean().item()
            spread = (r.std(unbiased=False) / r.mean()).item()
            label = _label(norm)
            entry: dict[str, Any] = {"rms_mean": mean, "spread": spread}
            report["layers"][label] = entry
            if not spread <= self.max_spread:
                entry["decision"] = "left"
                report["left"][label] = (f"rms spread {spread:.3g} over {r.numel()} tokens > "
                                         f"max_spread {self.max_spread:g}")
                continue
            entry["decision"] = "absorbed"
            nw = norm.inputs[1] if len(norm.inputs) > 1 else None
            width = lin.inputs[1].shape[0]
            gamma = (module.weight(nw).to(torch.float64) + float(norm.attrs["offset"])
                     if nw is not None else torch.ones(width, dtype=torch.float64))
            scale = gamma / mean
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
            logger.debug("absorb_post_norm: %s (was %%%s) rms %.4g spread %.3g", label, name,
                         mean, spread)
        report["dropped_weights"] = dropped
        report["calibration_tokens"] = int(calib.numel())
        if report["absorbed"]:
            after = _logits(module, Interpreter(module, dtype), feeds)
            stats = compare_logits(before, after, calib)
            report["calibration"] = stats
            if "ppl_ratio" in stats:
                logger.info("absorb_post_norm: absorbed %d, left %d; calibration perplexity "
                            "%.4g -> %.4g", len(report["absorbed"]), len(report["left"]),
                            stats["ppl_before"], stats["ppl_after"])
        return PassResult(module, bool(report["absorbed"]), report)

