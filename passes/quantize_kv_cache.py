"""Quantize the KV cache: a `quantize` (fake-quant) node on the k (after rotary) and v inputs of
every attention, so the values attention uses, and the present cache it returns, are on the
integer grid; a backend that stores the cache as integers then changes nothing.

- int8 (default): per head. "dynamic_per_head" gives each token of each KV head its own scale
  (and zero point when asymmetric) from its head_dim values: the KIVI / QuaRot grouping with the
  group = head_dim. "static_per_head" uses one calibrated range per head over the calibration
  tokens (fixed QDQ scales for the NPU).
- int4: only after QuaRot's R3 rotation (Ashkboos et al. 2024: an online Hadamard on q and k
  after RoPE spreads the outlier channels of the keys over the head, which is what makes 4-bit
  keys usable). The rotate pass records it in config.extra["rotation"]["r3"]; without that record
  the pass refuses int4.

Asymmetric by default (keys are far from zero-mean per head, as KIVI and QuaRot observe). Never
exact; a second run finds the attention inputs already quantized and reports modified=False.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from splice.ir import quant
from splice.ir.core import Module, emit
from .infra.base import PassBase, PassContext, PassError, PassResult
from .quantize_activations import calibrate_ranges
from .infra.registry import register_pass

logger = logging.getLogger(__name__)

MODES = ("dynamic_per_head", "static_per_head")


@register_pass
@dataclasses.dataclass(frozen=True)
class QuantizeKVCachePass(PassBase):
    """Fake-quantize attention's k and v (int8 per head; int4 after the R3 rotation).

    Settings: bits 8 | 4; mode "dynamic_per_head" | "static_per_head" (calibrated); symmetric;
    clip_ratio in (0, 1]."""

    name = "quantize_kv_cache"
    exact = False

    bits: int = 8
    mode: str = "dynamic_per_head"
    symmetric: bool = False
    clip_ratio: float = 1.0

    def __post_init__(self) -> None:
        p = f"pass {self.name!r}:"
        if self.bits not in (4, 8):
            raise PassError(f"{p} int{self.bits} KV cache is not supported; bits must be 8 or 4")
        if self.mode not in MODES:
            raise PassError(f"{p} mode {self.mode!r}; accepted: {', '.join(MODES)}")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise PassError(f"{p} clip_ratio {self.clip_ratio} must lie in (0, 1]")

    def call(self, module: Module, ctx: PassContext) -> PassResult:
        g = module.graph
        todo = []
        for att in g.find(op="attention"):
            for i in (1, 2):
                v = att.inputs[i]
                if v.producer is not None and v.producer.op == "quantize":
                    continue
                todo.append((att, i))
        report: dict[str, Any] = {"bits": self.bits, "mode": self.mode, "quantized": []}
        if not todo:
            return PassResult(module, False, report)
        if self.bits == 4 and not module.config.extra.get("rotation", {}).get("r3"):
            raise PassError(f"pass {self.name!r}: an int4 KV cache needs QuaRot's R3 rotation (an "
                            "online Hadamard on q and k after rotary); run rotate with r3=True "
                            "first, or use bits=8")
        ranges = None
        if self.mode == "static_per_head":
            calib = ctx.require_calibration(self.name)
            values = [att.inputs[i] for att, i in todo]
            hd = {id(att.inputs[i]): att.attrs["head_dim"] for att, i in todo}
            if len(set(hd.values())) != 1:
                raise PassError(f"pass {self.name!r}: attentions with different head dims "
                                f"{sorted(set(hd.values()))}; static_per_head needs one")
            ranges = calibrate_ranges(module, values, calib, per_channel=True,
                                      group=next(iter(hd.values())), reduce=ctx.reduce)
        for att, i in todo:
            v = att.inputs[i]
            kind = "key" if i == 1 else "value"
            inputs = [v]
            attrs = {"bits": self.bits, "symmetric": self.symmetric, "clip_ratio": self.clip_ratio}
            if ranges is None:
                attrs.update(mode="dynamic_per_token", group=att.attrs["head_dim"])
            else:
                s, z = quant.static_params(*ranges[id(v)], self.bits, self.symmetric,
                                           self.clip_ratio)
                attrs["mode"] = "static_per_channel"
                base = f"layers.{att.layer}.attn.{kind}" if att.layer is not None else v.name
                inputs.append(module.add_weight(base + ".kv_scale", s))
                if z is not None:
                    inputs.append(module.add_weight(base + ".kv_zero_point", z))
            q = emit(g, "quantize", inputs, attrs, name=f"{v.name}.q", layer=att.layer,
                     role=f"attn.{kind}_quant", origin=self.name, before=att)
            att.replace_input(i, q.output)
            report["quantized"].append(f"{v.name} ({kind}, layer {att.layer})")
        module.config = module.config.replace(extra={**module.config.extra, "quantization": {
            **module.config.extra.get("quantization", {}),
            "kv_cache": {"bits": self.bits, "mode": self.mode, "symmetric": self.symmetric}}})
        logger.info("quantize_kv_cache: %d tensors, int%d %s", len(todo), self.bits, self.mode)
        return PassResult(module, True, report)
