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
Cost: one Hadamard of the norm's width per norm and token (Gemma 3: 37 of order 640 per token, as
many as R1's online post-norm rotations, which this replaces: the stream stays unrotated, so run
rotate with r1 = False after it; R2 and R4 are independent of it).

Which norms: rms_norm with a constant weight over the whole last dim (group 0) whose output is
not a graph output and feeds only linears (as their input) with constant float weights that no
other node reads (a tied lm_head is left, with the reason: rotating it would rotate the embedding).
The width must have a Hadamard matrix (ir.hadamard), or, with allow_block, a block-diagonal one.
A rotated norm feeds a hadamard node, not linears, so a second run finds nothing (modified=False).

Exact in exact arithmetic: s * s = 1 and H H^T = I; the products are computed in float64 and cast
back to the weights' dtype once (the numeric test holds float64 logits to 1e-12).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from splice.ir.core import IRError, Module, Node, emit
from splice.ir.hadamard import factorize, largest_block
from .infra.base import PassBase, PassContext, PassError, PassResult
from .infra.registry import register_pass
from .numerics.rotation import _Rotation, random_signs

logger = logging.getLogger(__name__)


def _label(node: Node) -> str:
    return f"layers.{node.layer}.{node.role}" if node.layer is not None else node.role or node.op


def _why_not(module: Module, norm: Node) -> str | None:
    """None when the linears after `norm` can read a rotated input, else the reason not."""
    w = norm.inputs[1] if len(norm.inputs) > 1 else None
    if w is None or not w.is_const:
        return "no constant weight (rotate's R1 handles weightless norms)"
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
        todo = []
        for norm in module.graph.find(op="rms_norm"):
            reason = _why_not(module, norm)
            if reason is None:
                todo.append(norm)
            elif len(norm.inputs) > 1 and norm.inputs[1] is not None:
                report["left"][_label(norm)] = reason  # weightless norms: not this pass's
        for norm in todo:
            n = int(norm.output.shape[-1])
            q = _Rotation(n, self._block(n, _label(norm)), random_signs(n, self.seed))
            w = norm.inputs[1]
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
                      layer=norm.layer, role=f"{norm.role}.hadamard", origin=self.name,
                      after=norm)
            for user, index in list(norm.output.uses):
                if user is not hn:
                    user.replace_input(index, hn.output)
            report["rotated"].append(_label(norm))
            if q.block:
                report.setdefault("blocks", {})[_label(norm)] = q.block
        if todo:
            logger.info("rotate_inputs: %d norm outputs rotated online", len(todo))
        report["seed"] = self.seed
        return PassResult(module, bool(todo), report)

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
