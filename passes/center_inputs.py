"""Center the inputs of the linears that read a weightless norm: x -> x - mu, and b -> b + W mu.

Gemma 3's residual stream carries massive activations (Sun et al., "Massive Activations in Large
Language Models", 2024): in Gemma 3 270M one or two channels hold 80-98% of the normalised
stream's energy (|x_j| ~ 25 = sqrt(640) on nearly every token), and the pre-norm scale gamma_j of
those channels is 0 (the MLP norms) or 20-50x below the median (the attention norms), so the float
model hardly reads them. fold_norms moves gamma into the weights; a 4-bit grid shared with the
other columns of a group then gives column j an error of the group's step, which x_j multiplies
by the whole norm of x: RTN W4 g128 takes WikiText-2 perplexity from 20 to 520,000 after
fold_norms (34 without it), and rotate's R1 cannot help (the error along the massive direction is
rotation invariant: 7e11 with R1). Because the massive channels are nearly constant, subtracting
the calibration mean mu of the normalised input (computed in whatever basis the graph is in,
rotated or not) removes them from what the quantized product sees, and the constant W mu goes into
the linear's bias: y = W (x - mu) + (b + W mu) = W x + b. Exact in exact arithmetic; the numeric
check holds it to float64 rounding. Run it after fold_norms and rotate, before quantize_weights.

A massive channel that is not constant from token to token (Gemma 3 270M: centering alone left
W4 + R1 at perplexity 5e4) needs `directions` = k > 0: the top k eigenvectors U of the second
moment E[x x^T] of the norm's output (calibration) are projected out of what the linears read,
and their part is added back in float: s = x U, x' = x - s U^T, y = W x' + b + s (W U)^T (two
small float linears per norm, one [out, k] linear and an add per reader; quantize_weights leaves
them float, their roles end in ".project"). Exact as well; the mean is then not subtracted. A norm
read by the linear that writes a graph output (an untied lm_head) is left alone in this mode.

Which norms: rms_norm without a weight (folded) over the whole last dim, whose output feeds only
linears (as their input) with constant float weights, and is not a graph output. The norm's
output then feeds one `add` of the constant -mu (role "<norm role>.center"), and every reading
linear gets the bias b + W mu (a new bias when it had none). A centered norm feeds an add, not
linears, so a second run finds nothing: modified=False. Statistics: one run of the module over
ctx.calibration, `chunk_tokens` tokens (whole sequences) at a time, as running sums.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from splice.ir.core import Module, Node, emit
from splice.ir.interpreter import Interpreter, default_feeds
from .infra.base import PassBase, PassContext, PassError, PassResult
from .infra.registry import register_pass

logger = logging.getLogger(__name__)


def _label(node: Node) -> str:
    return f"layers.{node.layer}.{node.role}" if node.layer is not None else node.role or node.op


def centerable(module: Module) -> list[Node]:
    """The weightless norms whose output feeds only linears with constant float weights."""
    found = []
    outputs = {id(v) for v in module.graph.outputs}
    for norm in module.graph.find(op="rms_norm"):
        if (len(norm.inputs) > 1 and norm.inputs[1] is not None) or norm.attrs["group"]:
            continue
        uses = norm.output.uses
        if not uses or id(norm.output) in outputs:
            continue
        if all(u.op == "linear" and i == 0 and u.inputs[1].is_const
               and module.weight(u.inputs[1]).is_floating_point() for u, i in uses):
            found.append(norm)
    return found


@register_pass
@dataclasses.dataclass(frozen=True)
class CenterInputsPass(PassBase):
    """Subtract each weightless norm's calibration mean from what its linears read, adding W mu
    to their biases, or (directions = k > 0) project out its top k directions and add their part
    back in float. Exact; for the quantization that follows (massive activations).

    Settings: `min_tokens` the fewest calibration tokens accepted; `chunk_tokens` the tokens run
    at once; `directions` 0 (the mean) or the number of directions projected out.
    """

    name = "center_inputs"
    exact = True

    min_tokens: int = 16
    chunk_tokens: int = 2048
    directions: int = 0

    def call(self, module: Module, ctx: PassContext) -> PassResult:
        if self.min_tokens < 1 or self.chunk_tokens < 1 or self.directions < 0:
            raise PassError(f"center_inputs: min_tokens and chunk_tokens must be >= 1 and "
                            f"directions >= 0, got {self.min_tokens}, {self.chunk_tokens} and "
                            f"{self.directions}")
        outs = {id(v) for v in module.graph.outputs}
        norms = [n for n in centerable(module) if not self.directions or not any(
            id(u.output) in outs for u in n.output.users())]  # projections: not the lm_head
        report: dict[str, Any] = {"centered": [], "norms": {}}
        if not norms:
            report["note"] = "no weightless norm feeding only linears (run fold_norms first)"
            return PassResult(module, False, report)
        calib = ctx.require_calibration(self.name, self.min_tokens)
        calib = (calib[None] if calib.dim() == 1 else calib).to(torch.int64)
        sums = {id(n): torch.zeros(n.output.shape[-1], dtype=torch.float64) for n in norms}
        width = {id(n): n.output.shape[-1] for n in norms}
        moments = {k: torch.zeros(d, d, dtype=torch.float64) for k, d in width.items()} \
            if self.directions else {}
        count = [0]

        def hook(node: Node, outs: tuple[torch.Tensor, ...]) -> None:
            if id(node) in sums:
                x = outs[0].detach().to(torch.float64)
                x = x.reshape(-1, x.shape[-1])
                sums[id(node)] += x.sum(0)
                if moments:
                    moments[id(node)] += x.T @ x

        run = Interpreter(module, ctx.precision)
        rows = max(1, self.chunk_tokens // calib.shape[1])
        names = [v.name for v in module.graph.outputs]
        with torch.no_grad():
            for i in range(0, calib.shape[0], rows):
                chunk = calib[i:i + rows]
                run.run(default_feeds(module, chunk, None, ctx.precision), hook=hook,
                        outputs=names[:1])
                count[0] += chunk.numel()
        g = module.graph
        for norm in norms:
            mu = sums[id(norm)] / count[0]
            energy = float(mu.pow(2).sum())
            label = _label(norm)
            readers = list(norm.output.uses)
            dtype = module.weight(readers[0][0].inputs[1]).dtype  # the weights' float type
            if self.directions:
                share = self._project(module, norm, moments[id(norm)] / count[0], dtype)
                report["centered"].append(label)
                report["norms"][label] = {"removed_energy_share": share,
                                          "readers": len(readers)}
                continue
            shift = module.add_weight(f"{label}.center", (-mu).to(dtype))
            add = emit(g, "add", [norm.output, shift], layer=norm.layer,
                       role=f"{norm.role}.center", origin=self.name, after=norm)
            for lin, index in readers:
                w = module.weight(lin.inputs[1])
                bias = (w.to(torch.float64) @ mu)
                if len(lin.inputs) > 2 and lin.inputs[2] is not None:
                    old = module.weight(lin.inputs[2])
                    if len(lin.inputs[2].uses) > 1:
                        raise PassError(f"center_inputs: the bias of {_label(lin)} is shared")
                    module.set_weight(lin.inputs[2], (old.to(torch.float64) + bias).to(old.dtype))
                    lin.replace_input(index, add.output)
                    continue
                b = module.add_weight(f"{lin.inputs[1].const}.center_bias", bias.to(w.dtype))
                new = emit(g, "linear", [add.output, lin.inputs[1], b], dict(lin.attrs),
                           layer=lin.layer, role=lin.role, origin=self.name, before=lin)
                lin.output.replace_all_uses_with(new.output)
                if lin.output in g.outputs:
                    g.outputs = [new.output if v is lin.output else v for v in g.outputs]
                name = lin.output.name
                g.remove(lin)
                g.rename(new.output, name)
            report["centered"].append(label)
            report["norms"][label] = {"mean_energy": energy, "readers": len(readers)}
        report["calibration_tokens"] = count[0]
        report["directions"] = self.directions
        logger.info("center_inputs: %d norm outputs centered", len(report["centered"]))
        return PassResult(module, True, report)

    def _project(self, module: Module, norm: Node, moment: torch.Tensor,
                 dtype: torch.dtype) -> float:
        """Remove the top `directions` eigenvectors U of the second moment E[x x^T] from what
        the linears read: s = x U (float), x' = x - s U^T, y = W x' + b + s (W U)^T. Exact."""
        g = module.graph
        vals, vecs = torch.linalg.eigh(moment)
        u = vecs[:, -self.directions:]
        share = float(vals[-self.directions:].sum() / vals.sum().clamp_min(1e-300))
        label, role = _label(norm), norm.role
        readers = list(norm.output.uses)
        s = emit(g, "linear", [norm.output, module.add_weight(f"{label}.project_in",
                                                              u.T.contiguous().to(dtype))],
                 layer=norm.layer, role=f"{role}.project", origin=self.name, after=norm)
        p = emit(g, "linear", [s.output, module.add_weight(f"{label}.project_out",
                                                           (-u).contiguous().to(dtype))],
                 layer=norm.layer, role=f"{role}.project", origin=self.name, after=s)
        x = emit(g, "add", [norm.output, p.output], layer=norm.layer, role=f"{role}.center",
                 origin=self.name, after=p)
        for lin, index in readers:
            lin.replace_input(index, x.output)
            w = module.weight(lin.inputs[1]).to(torch.float64)
            extra = emit(g, "linear", [s.output, module.add_weight(
                f"{lin.inputs[1].const}.project", (w @ u).to(dtype))], layer=lin.layer,
                role=f"{lin.role}.project", origin=self.name, after=lin)
            y = emit(g, "add", [lin.output, extra.output], layer=lin.layer,
                     role=f"{lin.role}.project", origin=self.name, after=extra)
            for user, i in list(lin.output.uses):
                if user is not y:
                    user.replace_input(i, y.output)
        return share
