"""The PassManager: runs a list of passes in order, with instruments, and reports each run.

Order is plain Python (a list), as in xDSL's PipelinePass: no dependency solver, no hidden
scheduling. Fixed-point mode repeats the list until a whole sweep leaves the module unchanged,
capped so that two passes undoing each other cannot loop forever.

Errors: whatever a pass or an instrument raises is re-raised naming the failing pass, its step and
the passes that ran before it, with the original as `__cause__`. Bad input (InputError, e.g. a
PassError for a setting that does not fit this model) stays bad input: it becomes a
`PassInputFailure`, a PassError, so the CLI still exits 2; anything else (a bug, a failed check)
becomes a `PassFailure`.

The report is a list with one JSON-ready dict per pass run:

    {"step": 0, "name": "fold_norms", "settings": {...}, "modified": true, "time_s": 0.012,
     "report": {...the pass's own report...}, <what instruments add: "timing", "verify", "numeric">}
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import PurePath
from typing import Any

import torch

from splice.errors import InputError
from splice.ir.core import Module
from .base import PassBase, PassContext, PassError, PassResult
from .instruments import Instrument

logger = logging.getLogger(__name__)


class PassFailure(RuntimeError):
    """A pass (or an instrument checking it) failed. `pass_name`, `step` and `ran_before` say
    where; `__cause__` is the original error."""

    def __init__(self, message: str, *, pass_name: str, step: int, ran_before: Sequence[str]):
        super().__init__(message)
        self.pass_name = pass_name
        self.step = step
        self.ran_before = tuple(ran_before)


class PassInputFailure(PassFailure, PassError):
    """A pass rejected its input (the original was an InputError); still an InputError."""


class FixedPointError(PassError):
    """Fixed-point mode ran out of steps while passes were still modifying the module."""


def jsonable(obj: Any) -> Any:
    """`obj` as plain JSON data: tuples become lists, tensors numbers or lists, paths and dtypes
    strings, non-finite floats strings (JSON has no inf/nan)."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=str) if isinstance(obj, (set, frozenset)) else obj
        return [jsonable(v) for v in items]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.item() if obj.numel() == 1 else obj.tolist())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    if isinstance(obj, (PurePath, torch.dtype)):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return jsonable(obj.item())
    return str(obj)


def _names(names: Sequence[str]) -> str:
    return ", ".join(names) if names else "none"


class PassManager:
    """Run `passes` in order with `instruments`; `run(module, ctx)` returns (module, report).

    With `fixed_point=True` the list repeats until a full sweep reports no modification;
    `max_steps` caps the number of pass runs in that mode (FixedPointError when reached).
    When a pass wants the reference (the module before any pass: a distillation teacher) and the
    context has none, the run keeps a copy of the module it was given as ctx.reference.
    """

    def __init__(self, passes: Iterable[PassBase], instruments: Iterable[Instrument] = (), *,
                 fixed_point: bool = False, max_steps: int = 100):
        self.passes = tuple(passes)
        self.instruments = tuple(instruments)
        for i, p in enumerate(self.passes):
            if not isinstance(p, PassBase):
                raise PassError(f"pass list item {i} is {type(p).__name__} {p!r}, not a pass; "
                                "give PassBase instances (see splice.passes.infra.registry.make_pass)")
        for i, inst in enumerate(self.instruments):
            if not isinstance(inst, Instrument):
                raise PassError(f"instrument {i} is {type(inst).__name__}, not an Instrument")
        if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
            raise PassError(f"max_steps must be a positive integer, got {max_steps!r}")
        self.fixed_point = bool(fixed_point)
        self.max_steps = max_steps

    def run(self, module: Module, ctx: PassContext | None = None) -> tuple[Module, list[dict]]:
        ctx = ctx if ctx is not None else PassContext()
        report: list[dict] = []
        if not self.passes:
            return module, report
        if ctx.reference is None and any(p.wants_reference() for p in self.passes):
            ctx = dataclasses.replace(ctx, reference=module.clone())
        for inst in self.instruments:
            inst.run_begin(module, ctx)
        ran: list[str] = []
        unchanged_in_a_row = 0
        step = 0
        while True:
            for p in self.passes:
                if self.fixed_point and step >= self.max_steps:
                    still = [r["name"] for r in report[-len(self.passes):] if r["modified"]]
                    raise FixedPointError(
                        f"no fixed point after {step} pass runs (max_steps={self.max_steps}); "
                        f"still modifying in the last sweep: {_names(still)}")
                module, record = self._run_one(p, module, ctx, step, ran)
                report.append(record)
                ran.append(p.name or type(p).__name__)
                step += 1
                unchanged_in_a_row = 0 if record["modified"] else unchanged_in_a_row + 1
                # converged once every pass of the list has run on the current module unchanged
                if self.fixed_point and unchanged_in_a_row >= len(self.passes):
                    break
            if not self.fixed_point or unchanged_in_a_row >= len(self.passes):
                break
        for inst in self.instruments:
            inst.run_end(module, ctx, report)
        return module, report

    def _run_one(self, p: PassBase, module: Module, ctx: PassContext, step: int,
                 ran: list[str]) -> tuple[Module, dict]:
        name = p.name or type(p).__name__
        record: dict[str, Any] = {"step": step, "name": name, "settings": jsonable(p.settings())}
        where = f"pass {name!r} (step {step}; ran before it: {_names(ran)})"
        logger.debug("running %s", where)
        try:
            for inst in self.instruments:
                inst.before_pass(module, p, ctx)
        except Exception as e:
            raise self._failure(f"{where}: instrument {type(inst).__name__} failed before the "
                                f"pass: {e}", e, name, step, ran) from e
        start = time.perf_counter()
        try:
            result = p.call(module, ctx)
        except Exception as e:
            raise self._failure(f"{where} failed: {type(e).__name__}: {e}", e, name, step, ran) from e
        wall = time.perf_counter() - start
        if not isinstance(result, PassResult) or not isinstance(result.modified, bool) \
                or not isinstance(result.module, Module):
            raise PassFailure(f"{where} returned {type(result).__name__}; a pass returns "
                              "PassResult(module: Module, modified: bool)",
                              pass_name=name, step=step, ran_before=ran)
        record.update(modified=result.modified, time_s=wall, report=jsonable(result.report))
        try:
            for inst in self.instruments:
                inst.after_pass(result.module, p, ctx, result, record)
        except Exception as e:
            raise self._failure(f"{where}: instrument {type(inst).__name__} rejected the result: "
                                f"{e}", e, name, step, ran) from e
        logger.info("pass %s: modified=%s in %.3fs", name, result.modified, wall)
        return result.module, jsonable(record)

    @staticmethod
    def _failure(message: str, error: Exception, name: str, step: int,
                 ran: list[str]) -> PassFailure:
        cls = PassInputFailure if isinstance(error, InputError) else PassFailure
        return cls(message, pass_name=name, step=step, ran_before=ran)
