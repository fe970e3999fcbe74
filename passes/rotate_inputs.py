"""Rotate what the linears after a scaled norm read, online: y Q = (rms_norm(x) * (g * s)) H.

rotate's R1 rotates the residual stream and needs every norm that reads it to be weightless
(fold_norms first). fold_norms leaves the norms whose fold would multiply the quantization error
(massive activations: every pre-norm of Gemma 3 270M but one, passes/fold_norms.py), and R1 then
refuses. This pass gives the linears after such a norm a rotated input without touching the
stream: the norm keeps its scale g, its signs-folded copy g * s (Q = diag(s) H, s random signs of
`seed`) multiplies the normalised stream, an online `hadamard` node (role "<norm role>.hadamard")
follows it, and every linear reading it takes Q on its input side (W' = W Q). This is how rotate
already rotates R1 through Gemma's sandwich post-norms (QuaRot's online Hadamard, Ashkboos et
al. 2024), applied to the readers' side. The quantizer then sees the input the float model reads,
n * g, whose energy is where the weights read it, with the weight's outliers spread by Q: on
Gemma 3 270M (WikiText-2 inputs, W4 g128 GPTQ) the relative output error of q_proj / gate_proj is
0.035-0.076 this way, 0.043-0.097 unfolded and unrotated, 0.069-0.30 after fold_norms and R1.
Cost: one Hadamard of the norm's width per norm and token (Gemma 3: 36 of order 640 per token, as
many as R1's online post-norm rotations, which this replaces: the stream stays unrotated).

When it acts: only when some norm feeding only linears keeps a per-channel scale (R1 is then
impossible). Otherwise (every such norm folded, as on SmolLM2) it does nothing and says that
rotate's R1 applies, with no online op: a recipe can run fold_norms, rotate_inputs, rotate on any
model. When it acts it rotates the readers of every such norm, a weightless one (folded by
fold_norms) getting the signs as its scale, and records R1 as done in config.extra["rotation"]
["r1"] (with "online_after_norms" and "by": "rotate_inputs"), so that rotate, which then finds
R1 applied, goes on with R2 / R4 only; it does nothing when R1 is recorded already.

Which norms: rms_norm over the whole last dim (group 0) with a constant scale or none, whose output
is not a graph output and feeds only linears (as their input) with constant float weights that no
other node reads (a tied lm_head is left, with the reason: rotating it would rotate the embedding).
The width must have a Hadamard matrix (ir.hadamard), or, with allow_block, a block-diagonal one.
A rotated norm feeds a hadamard node, not linears, and R1 is recorded: a second run does nothing
(modified=False). Layer by layer (passes/infra/layerwise.py) each sub-module rotates its own
layer's norms (the stub head's norm is left) and the driver checks every layer decided alike.

Exact in exact arithmetic: s * s = 1 and H H^T = I; the products are computed in float64 and cast
back to the weights' dtype once (the numeric test holds float64 logits to 1e-12).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from splice.ir.core import IRError, Module, Node, Value, emit
from splice.ir.hadamard import factorize, largest_block
from .infra.base import PassBase, PassContext, PassError, PassResult
from .infra.registry import register_pass
from .numerics.rotation import _Rotation, random_signs

logger = logging.getLogger(__name__)


def _label(node: Node) -> str:
    return f"layers.{node.layer}.{node.role}" if node.layer is not None else node.role or node.op


def _scale(norm: Node) -> Value | None:
    return norm.inputs[1] if len(norm.inputs) > 1 else None


def _why_not(module: Module, norm: Node) -> str | None:
    """None when the linears after `norm` can read a rotated input, else the reason not."""
    w = _scale(norm)
    if w is not None and not w.is_const:
        return "its scale is computed, not a constant"
    if norm.attrs["group"]:
        return f"normalises groups of {norm.attrs['group']} channels"
    out = norm.output
    if not out.uses or any(v is out for v in module.graph.outputs):
        return "its output is unused or a graph output"
    for user, index in out.uses:
        what = _label(user)
        if user.op != "linear" or index != 0:
            return f"its output feeds {user.op} {what}, not only linears' inputs"
        lw = user.inputs[1]
        if lw is None or not lw.is_const or not module.weight(lw).is_floating_point():
            return f"linear {what} has no constant float weight"
        if any(other is not user for other, _ in lw.uses):
            return f"linear {what} shares its weight (a tied table)"
    return None


def _uniform(module: Module, norm: Node) -> bool:
    w = _scale(norm)
    if w is None:
        return True
    gamma = module.weight(w).to(torch.float64) + float(norm.attrs["offset"])
    return bool(torch.all(gamma == gamma[0]))


@register_pass
@dataclasses.dataclass(frozen=True)
class RotateInputsPass(PassBase):
    """An online randomised Hadamard after each scaled norm that feeds only linears, folded into
    the norm's scale (signs) and the linears' input side. Exact.

    Settings: `seed` for the random signs; `allow_block` a block-diagonal Hadamard when the
    width has no full one.
    """

    name = "rotate_inputs"
    exact = True

    seed: int = 0
    allow_block: bool = False

    def call(self, module: Module, ctx: PassContext) -> PassResult:
        report: dict[str, Any] = {"rotated": [], "left": {}}
        done = module.config.extra.get("rotation", {})
        if "r1" in done:
            report["note"] = "R1 already applied (config.extra['rotation']['r1'])"
            return PassResult(module, False, report)
        todo = []
        for norm in module.graph.find(op="rms_norm"):
            if norm.origin == "layerwise":  # a layer-by-layer sub-module's stub head
                continue
            reason = _why_not(module, norm)
            if reason is None:
                todo.append(norm)
            elif _scale(norm) is not None and not norm.attrs["group"]:
                report["left"][_label(norm)] = reason
        if not any(_scale(n) is not None and not _uniform(module, n) for n in todo):
            report["note"] = ("no norm feeding linears keeps a per-channel scale: rotate's R1 "
                              "rotates the stream with no online op")
            report["left"] = {}
            return PassResult(module, False, report)
        sizes = set()
        for norm in todo:
            n = int(norm.output.shape[-1])
            sizes.add(n)
            q = _Rotation(n, self._block(n, _label(norm)), random_signs(n, self.seed))
            self._rotate(module, norm, q)
            report["rotated"].append(_label(norm))
            if q.block:
                report.setdefault("blocks", {})[_label(norm)] = q.block
        logger.info("rotate_inputs: %d norm outputs rotated online", len(todo))
        report["seed"] = self.seed
        if len(sizes) == 1:  # R1's job done online: rotate skips R1, still does R2 / R4
            (n,) = sizes
            record = {**_Rotation(n, self._block(n, "the width"), None).record(),
                      "seed": self.seed, "online_after_norms": report["rotated"],
                      "by": self.name}
            rotation = {**done, "r1": record}
            module.config = module.config.replace(
                extra={**module.config.extra, "rotation": rotation})
            report["r1"] = record
        return PassResult(module, True, report)

    def _rotate(self, module: Module, norm: Node, q: _Rotation) -> None:
        """The signs into the norm's scale (a scale of signs for a weightless norm), H after it
        online, Q into its linears' input side."""
        n = q.size
        w = _scale(norm)
        dtype = module.weight(norm.output.users()[0].inputs[1]).dtype
        if w is None:  # a new norm node with the signs as its scale, same output name
            g = module.graph
            signs = module.add_weight(f"{_label(norm)}.signs", q.signs.to(dtype))
            new = emit(g, "rms_norm", [norm.inputs[0], signs], {**norm.attrs, "offset": 0.0},
                       name=norm.output.name + ".signed", layer=norm.layer, role=norm.role,
                       origin=self.name, before=norm)
            name = norm.output.name
            norm.output.replace_all_uses_with(new.output)
            g.remove(norm)
            g.rename(new.output, name)
            norm = new
        else:
            g = module.weight(w)
            scaled = ((g.to(torch.float64) + float(norm.attrs["offset"])) * q.signs).to(g.dtype)
            if len(w.uses) > 1:  # a scale shared with another norm: this one gets its own
                norm.replace_input(1, module.add_weight(f"{_label(norm)}.rotated", scaled))
            else:
                module.set_weight(w, scaled)
        norm.attrs["offset"] = 0.0
        for lin in norm.output.users():
            lw = lin.inputs[1]
            t = module.weight(lw)
            module.set_weight(lw, q.input_side(t.to(torch.float64)).to(t.dtype))
        hn = emit(module.graph, "hadamard", [norm.output], {"size": n, "block": q.block},
                  layer=norm.layer, role=f"{norm.role}.hadamard", origin=self.name, after=norm)
        for user, index in list(norm.output.uses):
            if user is not hn:
                user.replace_input(index, hn.output)

    def _block(self, n: int, what: str) -> int:
        if factorize(n) is not None:
            return 0
        if self.allow_block:
            try:
                return largest_block(n)
            except IRError:
                pass
        raise PassError(f"rotate_inputs: {what} is {n} wide, which has no Hadamard matrix"
                        + ("" if self.allow_block else "; set allow_block=True for a "
                           "block-diagonal one"))
