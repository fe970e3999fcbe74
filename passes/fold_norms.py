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

Norms whose fold would hurt a quantizer are left in place too (`max_gain`). Folding turns the
linear's input from `n * g` into `n` (n the normalised stream) and its weight from W into
W * g. When the norm scales down the channels that carry the stream's energy — massive activations
(Sun et al. 2024): in Gemma 3 270M, 1-4 channels hold 80-98% of n's energy and their g is 0-2
against a median of 3-30 — the folded weight's scale follows the large g while its input's energy
sits on the small ones, so a quantizer's error (a group's step on every column, or the same error
spread over all columns after a rotation) is multiplied by the whole of |n|. The pass measures,
per norm, gain = sqrt(mean(g^2) * E|n|^2 / E|g * n|^2): 1 when g and the input energy are
unrelated, the factor by which the fold multiplies the input energy per unit of weight scale.
Measured on 128 tokens: SmolLM2-135M 0.8-2.0 on every norm; Gemma 3 270M 3-39 on every pre-norm
but layer 0's attention norm (0.8), and there W4 g128 RTN of q_proj's output goes from 7% relative
error unfolded to 35-47% folded (61% -> 9% on gate_proj). A norm whose gain exceeds `max_gain`
(default 2.5) is left, with the reason; `max_gain = 0` folds every norm without measuring. The
statistics come from one run of the module over the first `probe_tokens` calibration tokens, or,
without calibration, over `probe_tokens` token ids drawn from the vocabulary with a fixed seed
(massive activations do not depend on the text: Gemma's gains agree within 30% on both).
rotate's R1 refuses a stream read by a norm that kept its weight: run rotate_inputs before it.
In layer-by-layer mode (passes/infra/layerwise.py) a sub-module's stream is a stub, so nothing is
measured there and every norm is folded as with max_gain = 0 (the report's note says so).

Exactness: exact in exact arithmetic (the product is reassociated: (n * g) @ W.T = n @ (W * g).T).
The fold is computed in float64 and cast back to the weight's dtype, so on float32 weights it only
changes rounding (one rounding of W * g instead of rounding n * g at run time).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch

from splice.ir.core import Module, Node, Value, emit
from splice.ir.interpreter import Interpreter, default_feeds
from .infra.base import PassBase, PassContext, PassError, PassResult
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
    folded copy; with untie=False such a norm is left in place. `max_gain`: a norm whose fold
    would multiply its linears' input energy per unit weight scale by more than this is left
    (0: fold every norm, measure nothing); `probe_tokens`: the tokens that measure it.
    """

    name = "fold_norms"
    exact = True

    untie: bool = True
    max_gain: float = 2.5
    probe_tokens: int = 128

    def __post_init__(self) -> None:
        if not self.max_gain >= 0 or self.probe_tokens < 1:
            raise PassError(f"pass 'fold_norms': max_gain must be >= 0 (0: no limit) and "
                            f"probe_tokens >= 1, got {self.max_gain} and {self.probe_tokens}")

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
        todo = []
        for norm in [n for n in g.nodes if n.op == "rms_norm"]:
            reason = self._why_not(module, norm)
            if reason is not None:
                left[_label(norm)] = reason
            else:
                todo.append(norm)
        # layer by layer (passes/infra/layerwise.py) the sub-module's stream is a stub: no probe
        stub = any(n.origin == "layerwise" for n in g.nodes)
        gains = self._gains(module, ctx, [n for n in todo if not n.attrs["group"]
                                          and not _all_ones(module, n)]) \
            if self.max_gain and not stub else {}
        for norm in todo:
            gain = gains.get(id(norm), 0.0)
            if gain > self.max_gain:
                left[_label(norm)] = (f"folding would multiply its linears' input energy per "
                                      f"unit weight scale by {gain:.1f} (> max_gain "
                                      f"{self.max_gain:g}): it scales down the channels that "
                                      "carry its input (massive activations), which a "
                                      "quantized fold would read at full size")
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
        if gains:
            report["gains"] = {_label(n): round(gains[id(n)], 3) for n in todo if id(n) in gains}
        if stub and self.max_gain:
            report["note"] = ("layer by layer: gains not measured (a sub-module's stream is a "
                              "stub), every norm folded as with max_gain = 0")
        return PassResult(module, bool(folded), report)

    def _gains(self, module: Module, ctx: PassContext, norms: list[Node]) -> dict[int, float]:
        """sqrt(mean(g^2) E|n|^2 / E|g n|^2) per norm (by id), n its normalised input, from one
        run over `probe_tokens` calibration tokens or, without calibration, seeded random ids."""
        if not norms:
            return {}
        calib = ctx.calibration
        if calib is not None and calib.numel():
            calib = calib.reshape(-1, calib.shape[-1]) if calib.dim() > 1 else calib[None]
            rows = max(1, -(-self.probe_tokens // calib.shape[1]))
            ids = calib[:rows].to(torch.int64)
        else:
            gen = torch.Generator().manual_seed(ctx.seed)
            ids = torch.randint(0, module.config.vocab_size, (1, self.probe_tokens), generator=gen)
        names = sorted({n.inputs[0].name for n in norms})
        with torch.no_grad():
            out = Interpreter(module, torch.float32).run(
                default_feeds(module, ids, None, torch.float32), capture=names, outputs=[])
        gains = {}
        for norm in norms:
            x = out[norm.inputs[0].name].to(torch.float64)
            x = x.reshape(-1, x.shape[-1])
            n = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + float(norm.attrs["eps"]))
            e = n.square().mean(0)
            g2 = _gamma(module, norm).square()
            seen = float((g2 * e).sum())
            gains[id(norm)] = math.sqrt(float(g2.mean()) * float(e.sum()) / seen) \
                if seen > 0 else math.inf
        return gains


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
