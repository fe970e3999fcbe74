"""A recipe run with every instrument on, recorded for the debug report.

`debug_run` runs the recipe through the ordinary PassManager with TimingInstrument (wall, CPU,
peak RSS), VerifyInstrument, DumpInstrument (full IR text after each modifying pass, in
DIR/ir/) and NumericCheckInstrument on the pinned batch, plus a TraceInstrument that keeps what
the report draws: the IR text diff of each pass, node counts by op before and after, and the
weights a pass added or dropped. Nothing here re-implements a pass or a check; the report shows
what the shipped instruments measured.

A failing pass (an exact pass that moved the logits, an invalid graph, a crash) does not lose the
run: the trace holds the records of every pass so far, including the failing one's partial
record, and the report says where and why it stopped. Bad input (an InputError, e.g. a pass
that needs calibration text) is still raised, since there is nothing to report.

The record of a run is JSON-ready data (`report.json`); report.py renders the same data as HTML.
"""

from __future__ import annotations

import datetime
import difflib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from splice.errors import InputError
from splice.ir.core import Module
from .base import PassBase, PassContext, PassResult
from .instruments import (DumpInstrument, Instrument, NumericCheckInstrument, TimingInstrument,
                          VerifyInstrument)
from .manager import PassFailure, PassManager, jsonable

if TYPE_CHECKING:  # only annotated: the recipe (splice/) is above the pass infrastructure
    from splice.recipe import Recipe

log = logging.getLogger(__name__)

# diff lines kept per pass in the report; the full IR of every step is in DIR/ir/
MAX_DIFF_LINES = 400


def _summary(module: Module) -> dict[str, Any]:
    return {"nodes": len(module.graph.nodes), "ops": module.graph.op_counts(),
            "parameters": module.num_parameters(),
            "weight_mb": sum(t.numel() * t.element_size() for t in module.weights.values()) / 2**20,
            "layers": len(module.graph.layers())}


def ir_diff(before: str, after: str, max_lines: int = MAX_DIFF_LINES) -> dict[str, Any]:
    """The unified diff of two IR texts (one line of context), cut to `max_lines` lines."""
    lines = list(difflib.unified_diff(before.splitlines(), after.splitlines(), "before", "after",
                                      lineterm="", n=1))
    added = sum(1 for ln in lines if ln.startswith("+") and not ln.startswith("+++"))
    removed = sum(1 for ln in lines if ln.startswith("-") and not ln.startswith("---"))
    return {"lines": lines[:max_lines], "total_lines": len(lines),
            "truncated": len(lines) > max_lines, "added": added, "removed": removed}


class TraceInstrument(Instrument):
    """Keeps, per pass, the IR before and after (as a diff), op counts and weight names.

    The IR text after pass k is the text before pass k + 1, so each module is printed once. The
    pass's record dict is kept by reference: instruments after this one (the numeric check) fill
    it in later, and a record survives a failure raised by one of them.
    """

    def __init__(self, max_diff_lines: int = MAX_DIFF_LINES):
        self.max_diff_lines = max_diff_lines
        self.entries: list[dict[str, Any]] = []
        self.last_module: Module | None = None
        self._text: str | None = None
        self._module: Module | None = None

    def _state(self, module: Module) -> str:
        if self._module is not module or self._text is None:
            self._text, self._module = str(module.graph), module
        return self._text

    def run_begin(self, module: Module, ctx: PassContext) -> None:
        self.entries, self._text, self._module = [], None, None
        self.last_module = module

    def before_pass(self, module: Module, pass_: PassBase, ctx: PassContext) -> None:
        self.last_module = module
        self.entries.append({"name": pass_.name or type(pass_).__name__,
                             "exact": bool(pass_.exact), "before": _summary(module),
                             "weights_before": set(module.weights), "text_before":
                             self._state(module), "record": None})

    def after_pass(self, module: Module, pass_: PassBase, ctx: PassContext, result: PassResult,
                   record: dict[str, Any]) -> None:
        self.last_module = module
        entry = self.entries[-1]
        entry["record"] = record
        entry["after"] = _summary(module)
        names = set(module.weights)
        entry["weights_added"] = sorted(names - entry["weights_before"])
        entry["weights_removed"] = sorted(entry["weights_before"] - names)
        before = entry.pop("text_before")
        # a pass that returns the same object may have edited it in place: print it again
        self._module = None
        entry["diff"] = ir_diff(before, self._state(module), self.max_diff_lines) \
            if result.modified else None


def _pass_row(entry: dict[str, Any], step: int) -> dict[str, Any]:
    """One pass of the report: the manager's record (timing, verify, numeric, the pass's own
    report) merged with what the trace saw."""
    rec = jsonable(entry.get("record") or {})
    row = {"step": step, "name": entry["name"], "exact": entry["exact"],
           "settings": rec.get("settings", {}), "modified": rec.get("modified"),
           "time_s": rec.get("time_s"), "timing": rec.get("timing"), "verify": rec.get("verify"),
           "numeric": rec.get("numeric"), "dump": rec.get("dump"), "pass_report": rec.get("report"),
           "before": entry["before"], "after": entry.get("after"),
           "weights_added": entry.get("weights_added", []),
           "weights_removed": entry.get("weights_removed", []), "diff": entry.get("diff")}
    return jsonable(row)


def debug_run(module: Module, recipe: Recipe, out_dir: str | Path, *, batch: torch.Tensor,
              batch_source: str = "", calibration: torch.Tensor | None = None,
              seed: int | None = None, model_name: str = "",
              max_diff_lines: int = MAX_DIFF_LINES,
              instruments: tuple[Instrument, ...] = ()) -> tuple[Module, dict[str, Any]]:
    """Run `recipe` on `module` with every instrument on; returns (the last module, report data).

    The IR dumps go to out_dir/ir/. `batch` is the pinned token batch of the numeric check. The
    data's "status" is "ok" or "failed" (then "error" says which pass and why). `instruments`
    (the CLI's progress display) run before the debug ones.
    """
    out_dir = Path(out_dir)
    trace = TraceInstrument(max_diff_lines)
    timing = TimingInstrument()
    numeric = NumericCheckInstrument(batch)
    # timing first, so its peak-RSS window spans the pass and every check that runs with it
    # `instruments` (a progress display) first: it names the pass before the checks' own work
    instruments = [*instruments, timing, trace, VerifyInstrument(), DumpInstrument(out_dir / "ir"),
                   numeric]
    ctx = PassContext(calibration=calibration, seed=recipe.seed if seed is None else seed,
                      precision=recipe.precision)
    data: dict[str, Any] = {
        "title": f"splice debug: {model_name or module.config.architecture} / {recipe.name}",
        "model": {"name": model_name, "architecture": module.config.architecture,
                  "source": module.config.source, "config": module.config.to_json()},
        "recipe": recipe.to_dict(),
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "batch": {"shape": list(batch.shape), "source": batch_source},
        "calibration": None if calibration is None else {"shape": list(calibration.shape)},
        "input": _summary(module), "status": "ok", "error": None,
    }
    start = time.perf_counter()
    final = module
    try:
        final, _ = PassManager(recipe.build(), instruments).run(module, ctx)
    except PassFailure as e:
        if isinstance(e, InputError):
            raise
        cause = e.__cause__
        data["status"] = "failed"
        data["error"] = {"pass": e.pass_name, "step": e.step, "ran_before": list(e.ran_before),
                         "message": str(e),
                         "cause": f"{type(cause).__name__}: {cause}" if cause else None}
        final = trace.last_module or module
        log.warning("debug run stopped: %s", e)
    data["total_time_s"] = time.perf_counter() - start
    data["passes"] = [_pass_row(entry, i) for i, entry in enumerate(trace.entries)]
    data["output"] = _summary(final)
    data["ir_dir"] = str(out_dir / "ir")
    return final, data
