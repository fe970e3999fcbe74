"""Pass infrastructure: PassBase, PassResult and PassContext.

A pass is a frozen dataclass (its settings) with a registered `name` and one method,
`call(module, ctx) -> PassResult`. Passes keep no per-run state on `self`: anything a run needs
(calibration tokens, the seed, the precision, a report to fill) travels in the context, so one
pass object can run twice or on two modules. `modified` is computed from what the pass did.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import torch

from splice.errors import InputError
from splice.ir.core import Module
from .reduce import Reducer


@dataclasses.dataclass
class PassResult:
    module: Module
    modified: bool
    # what the pass wants in the report: scores, chosen strategies, errors measured, warnings
    report: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PassContext:
    """What a pass run may read: calibration batches (token ids [batch, seq], int64), the random
    seed, the working precision for calibration arithmetic, the reducer that combines
    calibration statistics over processes (passes/infra/reduce.py; identity in one process, where
    `calibration` is this process's share of the batches when several run), and the reference:
    the module as the pass list received it, before any pass ran, which the PassManager keeps (a
    copy) when a pass's `wants_reference()` says it distills from it."""

    calibration: torch.Tensor | None = None
    seed: int = 0
    precision: torch.dtype = torch.float64
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    reducer: Reducer = dataclasses.field(default_factory=Reducer)
    reference: Module | None = None

    def reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """`tensor` combined over the processes sharing the calibration set (sum, max or min)."""
        return self.reducer(tensor, op)

    def require_calibration(self, pass_name: str, min_tokens: int = 1) -> torch.Tensor:
        calib = self.calibration
        if calib is None or calib.numel() < min_tokens:
            have = 0 if calib is None else calib.numel()
            raise PassError(f"{pass_name} needs at least {min_tokens} calibration tokens, got {have}; "
                            "pass calibration text or token batches")
        return calib


class PassError(InputError):
    """A pass cannot run on this module with these settings (bad input, not a bug)."""


@dataclasses.dataclass(frozen=True)
class PassBase(abc.ABC):
    """Base of every pass. Subclasses are frozen dataclasses whose fields are the settings."""

    name: ClassVar[str] = ""
    # True when the pass preserves the function exactly (in exact arithmetic): the numeric check
    # then demands float64 agreement; otherwise it reports the error it introduced.
    exact: ClassVar[bool] = False

    @abc.abstractmethod
    def call(self, module: Module, ctx: PassContext) -> PassResult:
        """Transform `module` (in place or into a new Module) and say whether anything changed."""

    def wants_reference(self) -> bool:
        """True when this pass, with these settings, reads ctx.reference."""
        return False

    def __call__(self, module: Module, ctx: PassContext | None = None) -> PassResult:
        return self.call(module, ctx or PassContext())

    def settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
