"""Quantize the activations that enter the decoder's linears: a `quantize` (fake-quant) node on the
input of each selected linear / qlinear, so every later consumer sees exactly the integer grid an
int8 (or int4) kernel would.

Modes (the `quantize` op's, splice.ir.quant.fake_quantize):
- "dynamic_per_token" (CPU/GPU): a scale per token from its own max |x| (symmetric) or range; no
  calibration. This is the W8A8 / W4A8 activation scheme of SmoothQuant's per-token setting and of
  QuaRot (Ashkboos et al. 2024), whose rotations make it accurate at 4-8 bits.
- "static_per_tensor" / "static_per_channel" (NPU: fixed QDQ scales, as Qualcomm's HTP wants): the
  range of each quantized value is calibrated on ctx.calibration (max |x| or min/max over all
  calibration tokens, through the reference interpreter with a reducing hook, so no activation is
  stored), shrunk by `clip_ratio`, and stored as constant scale (and u8 zero point when asymmetric).

Linears that read the same value (q/k/v, gate/up) share one quantize node; other readers of that
value (a residual add) keep the float value. Never exact (`exact = False`); a second run finds every
selected input already quantized and reports modified=False.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from splice.ir import quant
from splice.ir.core import Module, Node, Value, emit
from splice.ir.interpreter import Interpreter, default_feeds
from .infra.base import PassBase, PassContext, PassError, PassResult
from .quantize_weights import DECODER_LINEARS, label
from .infra.registry import register_pass

logger = logging.getLogger(__name__)

CALIB_ROWS = 8  # calibration sequences per interpreter run


@register_pass
@dataclasses.dataclass(frozen=True)
class QuantizeActivationsPass(PassBase):
    """Fake-quantize the inputs of the selected linears (int8 dynamic per token, or static).

    Settings: mode "dynamic_per_token" | "static_per_tensor" | "static_per_channel"; bits 8 | 4;
    symmetric; clip_ratio in (0, 1]; roles (the linears whose inputs are quantized)."""

    name = "quantize_activations"
    exact = False

    mode: str = "dynamic_per_token"
    bits: int = 8
    symmetric: bool = True
    clip_ratio: float = 1.0
    roles: tuple[str, ...] = DECODER_LINEARS

    def __post_init__(self) -> None:
        p = f"pass {self.name!r}:"
        if self.mode not in quant.ACT_MODES:
            raise PassError(f"{p} mode {self.mode!r}; accepted: {', '.join(quant.ACT_MODES)}")
        if self.bits not in (4, 8):
            raise PassError(f"{p} int{self.bits} is not supported; bits must be 4 or 8")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise PassError(f"{p} clip_ratio {self.clip_ratio} must lie in (0, 1]")

    def call(self, module: Module, ctx: PassContext) -> PassResult:
        g = module.graph
        linears = [n for n in g.nodes if n.op in ("linear", "qlinear")]
        if not any(n.role in self.roles for n in linears):
            # a recipe whose roles name no linear would otherwise pass silently, quantizing nothing
            present = sorted({n.role for n in linears if n.role})
            raise PassError(f"pass {self.name!r}: roles {list(self.roles)} match no linear of "
                            f"this model; its linears' roles: {', '.join(present) or 'none'}")
        targets: dict[int, tuple[Value, list[Node]]] = {}
        for node in linears:
            if node.role not in self.roles:
                continue
            x = node.inputs[0]
            if x.producer is not None and x.producer.op == "quantize":
                continue
            targets.setdefault(id(x), (x, []))[1].append(node)
        report: dict[str, Any] = {"mode": self.mode, "bits": self.bits, "quantized": []}
        if not targets:
            return PassResult(module, False, report)
        ranges = None
        if self.mode != "dynamic_per_token":
            calib = ctx.require_calibration(self.name)
            ranges = calibrate_ranges(module, [x for x, _ in targets.values()], calib,
                                      per_channel=self.mode == "static_per_channel",
                                      reduce=ctx.reduce)
        for key, (x, users) in targets.items():
            first = users[0]
            inputs: list[Value | None] = [x]
            if ranges is not None:
                s, z = quant.static_params(*ranges[key], self.bits, self.symmetric, self.clip_ratio)
                base = f"{label(first)}.act"
                inputs.append(module.add_weight(base + ".scale", s))
                if z is not None:
                    inputs.append(module.add_weight(base + ".zero_point", z))
            q = emit(g, "quantize", inputs, {"mode": self.mode, "bits": self.bits,
                                             "symmetric": self.symmetric,
                                             "clip_ratio": self.clip_ratio},
                     name=f"{x.name}.q", layer=first.layer, role=f"{first.role}.act_quant",
                     origin=self.name, before=first)
            for user in users:
                user.replace_input(0, q.output)
            report["quantized"].append(f"{x.name} -> {', '.join(label(u) for u in users)}")
        module.config = module.config.replace(extra={**module.config.extra, "quantization": {
            **module.config.extra.get("quantization", {}),
            "activations": {"mode": self.mode, "bits": self.bits, "symmetric": self.symmetric}}})
        logger.info("quantize_activations: %d inputs, %s int%d", len(targets), self.mode, self.bits)
        return PassResult(module, True, report)


def calibrate_ranges(module: Module, values: list[Value], calib: torch.Tensor, *,
                     per_channel: bool, dtype: torch.dtype = torch.float32,
                     group: int = 0, reduce=None) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """(min, max) of each value over all calibration tokens: per channel ([C]), per run of
    `group` channels (each run's min/max spread back over its channels), or per tensor (0-d).
    Runs the reference interpreter with a hook that reduces each value as it is produced.
    `reduce(tensor, op)` (PassContext.reduce) combines the ranges over processes that each ran
    a share of the calibration tokens (a min and a max: exact, whatever the split)."""
    wanted = {id(v): v for v in values}
    lo: dict[int, torch.Tensor] = {}
    hi: dict[int, torch.Tensor] = {}

    def hook(node: Node, outs) -> None:
        for v, t in zip(node.outputs, outs):
            if id(v) not in wanted:
                continue
            flat = t.reshape(-1, t.shape[-1]).to(torch.float64)
            if group:
                flat = flat.reshape(-1, t.shape[-1] // group, group).transpose(0, 1)
                mn = flat.reshape(flat.shape[0], -1).amin(-1).repeat_interleave(group)
                mx = flat.reshape(flat.shape[0], -1).amax(-1).repeat_interleave(group)
            elif per_channel:
                mn, mx = flat.amin(0), flat.amax(0)
            else:
                mn, mx = flat.amin(), flat.amax()
            lo[id(v)] = torch.minimum(lo[id(v)], mn) if id(v) in lo else mn
            hi[id(v)] = torch.maximum(hi[id(v)], mx) if id(v) in hi else mx

    interp = Interpreter(module, dtype)
    ids = calib if calib.dim() == 2 else calib.reshape(1, -1)
    for chunk in ids.split(CALIB_ROWS):
        interp.run(default_feeds(module, chunk, None, dtype), hook=hook)
    missing = [v.name for v in values if id(v) not in lo]
    if missing:
        raise PassError(f"calibration did not compute {missing[:3]}: they are not produced by any "
                        "node (graph inputs or constants cannot be calibrated)")
    if reduce is not None:
        return {k: (reduce(lo[k], "min"), reduce(hi[k], "max")) for k in lo}
    return {k: (lo[k], hi[k]) for k in lo}
