"""Small real passes for testing the pass infrastructure (not registered: tests that need the
registry register them on a private copy of it).

Each one does what its name says to a real module; `modified` is computed as in any pass.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from splice.ir.core import Module
from splice.passes.infra.base import PassBase, PassContext, PassError, PassResult


@dataclasses.dataclass(frozen=True)
class LogPass(PassBase):
    """Appends its label to ctx.options["log"]; never changes the module."""

    name: ClassVar[str] = "log"
    label: str = "log"

    def call(self, module: Module, ctx: PassContext) -> PassResult:
        ctx.options.setdefault("log", []).append(self.label)
        return PassResult(module, False, {"label": self.label})


@dataclasses.dataclass(frozen=True)
class CountdownPass(PassBase):
    """Decrements config.extra["countdown"] while it is positive: modifies the module that many
    times, then reports modified=False."""

    name: ClassVar[str] = "countdown"

    def call(self, module: Module, ctx: PassContext) -> PassResult:
        left = module.config.extra.get("countdown", 0)
        if left <= 0:
            return PassResult(module, False)
        module.config = module.config.replace(extra={**module.config.extra, "countdown": left - 1})
        return PassResult(module, True, {"left": left - 1})


@dataclasses.dataclass(frozen=True)
class FailPass(PassBase):
    """Raises: a bug (RuntimeError) or bad input (PassError)."""

    name: ClassVar[str] = "fail"
    bad_input: bool = False

    def call(self, module: Module, ctx: PassContext) -> PassResult:
        if self.bad_input:
            raise PassError("this model has no layer 99")
        raise RuntimeError("boom")


@dataclasses.dataclass(frozen=True)
class BreakPass(PassBase):
    """Corrupts the module: a weight tensor of the wrong shape, behind the IR's back."""

    name: ClassVar[str] = "break"

    def call(self, module: Module, ctx: PassContext) -> PassResult:
        key = next(iter(module.weights))
        module.weights[key] = torch.zeros(3, dtype=module.weights[key].dtype)
        return PassResult(module, True)


@dataclasses.dataclass(frozen=True)
class ScaleWeightPass(PassBase):
    """Multiplies one weight by (1 + eps). With `claim_exact` it claims to be exact, which it is
    not: the numeric check must catch it."""

    name: ClassVar[str] = "scale_weight"
    weight: str = "head.weight"
    eps: float = 1e-6
    claim_exact: bool = False

    @property
    def exact(self) -> bool:  # type: ignore[override]
        return self.claim_exact

    def call(self, module: Module, ctx: PassContext) -> PassResult:
        v = module.graph.consts[self.weight]
        t = module.weight(v)
        module.set_weight(v, (t.to(torch.float64) * (1 + self.eps)).to(t.dtype))
        return PassResult(module, self.eps != 0)


@dataclasses.dataclass(frozen=True)
class NotAResultPass(PassBase):
    """Returns the module itself instead of a PassResult."""

    name: ClassVar[str] = "not_a_result"

    def call(self, module: Module, ctx: PassContext):  # type: ignore[override]
        return module
