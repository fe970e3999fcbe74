"""Fold the scale (gamma) of every pre-norm into the linears that read it.

An RMSNorm computes `normalise(x) * (offset + w)`; a linear after it computes `y @ W.T + b`. When
the norm's output goes only to linears (as their input x), the per-channel scale can move into the
columns of each weight, `W' = W * (offset + w)[None, :]`, and the norm keeps only its
normalisation: `rms_norm(x)` with no weight and offset 0. This is QuaRot's `fuse_layer_norms`
(Ashkboos et al. 2024), also used by SpinQuant: after it, every pre-norm is a pure RMS
normalisation, which commutes with an orthogonal rotation of the residual stream, and the rotation
passes rely on that. In the canonical decoder graph this folds attn_norm into q/k/v, mlp_norm into
gate/up and final_norm into lm_head, with Gemma's (1 + w) norms folded as offset + w.

Left in place, and listed with the reason in the pass report: norms whose output feeds anything
but a linear's x input — Gemma's post norms (attn_post_norm, mlp_post_norm feed the residual add),
Qwen3/Gemma 3's per-head q/k norms (they feed rotary) — and norms with no weight (already folded).

Tied embeddings: when lm_head reads the embedding table, scaling it in place would also scale the
embedding, so the fold unties it: lm_head gets a new weight `lm_head.weight`. When the effective
gamma is all ones there is nothing to scale, and nothing is untied. The same holds for any linear
weight shared with another node.

Exactness: exact in exact arithmetic (the product is reassociated: (n * g) @ W.T = n @ (W * g).T).
The fold is computed in float64 and cast back to the weight's dtype, so on float32 weights it only
changes rounding (one rounding of W * g instead of rounding n * g at run time).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from splice.ir.core import Module, Node, Value, emit
from .infra.base import PassBase, PassContext, PassResult
from .infra.registry import register_pass

logger = logging.getLogger(__name__)


def _label(node: Node) -> str:
    if node.layer is not None:
        return f"layers.{node.layer}.{node.role}"
    return node.role or node.output.name


def _new_weight_name(linear: Node) -> str:
    if linear.role and linear.layer is not None:
        return f"layers.{linear.layer}.{linear.role}.weight"
    if linear.role:
        return f"{linear.role}.weight"
    return f"{linear.inputs[1].name}.folded"


@register_pass
@dataclasses.dataclass(frozen=True)
class FoldNormsPass(PassBase):
    """Fold every pre-norm's gamma (offset + w) into the columns of the linears it feeds.

    Settings: `untie` allows giving a linear that shares its weight (a tied lm_head) its own
    folded copy; with untie=False such a norm is left in place.
    """

    name = "fold_norms"
    exact = True

    untie: bool = True

    def _why_not(self, module: Module, norm: Node) -> str | None:
        """None when `norm` can be folded, else the reason it is left in place."""
        g = module.graph
        w = norm.inputs[1] if len(norm.inputs) > 1 else None
        if w is None:
            return "no weight (nothing to fold)"
        if not w.is_const:
            return f"its weight %{w.name} is computed, not a constant"
        out = norm.output
        if out in g.outputs:
            return "its output is a graph output"
        if not out.uses:
            return "its output is unused"
        for user, index in out.uses:
            if user.op != "linear":
                what = user.role or user.output.name
                return f"its output feeds {user.op} ({what}), not only linears"
            if index != 0:
                return f"its output is the weight or bias of linear {user.role or user.output.name}"
            lw = user.inputs[1]
            if lw is None or not lw.is_const:
                return f"linear {user.role or user.output.name} has a computed weight"
            if not module.weight(lw).is_floating_point():
                return f"linear {user.role or user.output.name} has a non-float weight"
        if not self.untie and not _all_ones(module, norm):
            shared = [u.role or u.output.name for u in out.users() if _shared(u)]
            if shared:
                return f"linear(s) {', '.join(shared)} share their weight and untie=False"
        return None

    def call(self, module: Module, ctx: PassContext) -> PassResult:
        g = module.graph
        folded: list[str] = []
        left: dict[str, str] = {}
        untied: list[str] = []
        candidates: set[str] = set()
        for norm in [n for n in g.nodes if n.op == "rms_norm"]:
            reason = self._why_not(module, norm)
            if reason is not None:
                left[_label(norm)] = reason
                continue
            w = norm.inputs[1]
            assert w is not None and w.const is not None
            candidates.add(w.const)
            if not _all_ones(module, norm):
                gamma = _gamma(module, norm)
                for linear in norm.output.users():
                    lw = linear.inputs[1]
                    assert lw is not None and lw.const is not None
                    t = module.weight(lw)
                    scaled = (t.to(torch.float64) * gamma[None, :]).to(t.dtype)
                    if _shared(linear):
                        new = module.add_weight(_new_weight_name(linear), scaled)
                        linear.replace_input(1, new)
                        candidates.add(lw.const)
                        untied.append(new.name)
                    else:
                        module.set_weight(lw, scaled)
            _drop_norm_weight(module, norm, origin=self.name)
            folded.append(_label(norm))
        dropped = []
        for name in sorted(candidates):
            v = g.consts.get(name)
            if v is not None and not v.uses:
                g.remove_const(name)
                del module.weights[name]
                dropped.append(name)
        if untied and module.config.extra.get("tie_embeddings"):
            module.config = module.config.replace(
                extra={**module.config.extra, "tie_embeddings": False})
        if folded:
            logger.info("fold_norms: folded %d norms, left %d, untied %s", len(folded), len(left),
                        untied or "nothing")
        report: dict[str, Any] = {"folded": folded, "left": left, "untied": untied,
                                  "dropped_weights": dropped}
        return PassResult(module, bool(folded), report)


def _gamma(module: Module, norm: Node) -> torch.Tensor:
    """The effective per-channel scale (offset + w) in float64, tiled over the linear's input
    width for grouped (per-head) norms."""
    w = norm.inputs[1]
    assert w is not None
    gamma = module.weight(w).to(torch.float64) + float(norm.attrs["offset"])
    group = norm.attrs["group"]
    width = norm.output.shape[-1]
    if group and isinstance(width, int) and width != group:
        gamma = gamma.repeat(width // group)
    return gamma


def _all_ones(module: Module, norm: Node) -> bool:
    return bool(torch.all(_gamma(module, norm) == 1.0))


def _shared(linear: Node) -> bool:
    """Whether the linear's weight is also read by another node (a tied embedding)."""
    w = linear.inputs[1]
    return w is not None and any(user is not linear for user, _ in w.uses)


def _drop_norm_weight(module: Module, norm: Node, *, origin: str) -> Value:
    """Replace `norm` by `rms_norm(x)` (no weight, offset 0), keeping its output's name."""
    g = module.graph
    attrs = {**norm.attrs, "offset": 0.0}
    x = norm.inputs[0]
    assert x is not None
    new = emit(g, "rms_norm", [x], attrs, name=norm.output.name + ".folded", layer=norm.layer,
               role=norm.role, origin=origin, before=norm)
    old = norm.output
    name = old.name
    old.replace_all_uses_with(new.output)
    g.remove(norm)
    g.rename(new.output, name)
    return new.output
