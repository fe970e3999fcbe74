"""Pass instruments: hooks the PassManager calls around every pass (after TVM's PassInstrument).

An instrument observes; it never changes the module. Each hook gets the pass and the context, and
`after_pass` also gets the pass's result and the report record for this run, to which it adds its
own JSON-ready entry under its key ("timing", "verify", "numeric"). Instruments may keep state
between `before_pass` and `after_pass` (a start time, cached logits) — unlike passes (STYLE rule 7)
they are observers of one run; `run_begin` resets that state, so an instrument object can serve
several runs, one after another.

Shipped: TimingInstrument, VerifyInstrument, DumpInstrument and NumericCheckInstrument.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from splice.ir.core import Module
from splice.ir.interpreter import run_logits
from splice.ir.verify import verify
from .base import PassError

COMPARE_ELEMENTS = 1 << 24  # logits compare_logits holds in float64 at once (128 MB a copy)

if TYPE_CHECKING:
    from .base import PassBase, PassContext, PassResult

logger = logging.getLogger(__name__)


class PassCheckError(RuntimeError):
    """An instrument's check failed after a pass: a bug in the pass, not bad input."""


class Instrument:
    """Base instrument: every hook does nothing. Subclasses override what they need."""

    def run_begin(self, module: Module, ctx: PassContext) -> None:
        """Called once before the first pass of a PassManager run."""

    def before_pass(self, module: Module, pass_: PassBase, ctx: PassContext) -> None:
        """Called before each pass run, on the module the pass will get."""

    def after_pass(self, module: Module, pass_: PassBase, ctx: PassContext, result: PassResult,
                   record: dict[str, Any]) -> None:
        """Called after each pass run with the module it returned; may add to `record`."""

    def run_end(self, module: Module, ctx: PassContext, report: list[dict[str, Any]]) -> None:
        """Called once after the last pass of a successful run."""


def _pass_name(pass_: PassBase) -> str:
    return pass_.name or type(pass_).__name__


class TimingInstrument(Instrument):
    """Wall and CPU time of each pass, and how much it raised the process's peak RSS.

    Peak RSS comes from getrusage (free to read, and it sees torch's allocations, which tracemalloc
    does not). It is a high-water mark: `peak_rss_delta_mb` is how far a pass pushed the peak
    above every earlier one, 0 when it stayed under it.
    """

    def __init__(self) -> None:
        self._start: tuple[float, float, int] | None = None

    @staticmethod
    def _peak_rss_kib() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

    def before_pass(self, module: Module, pass_: PassBase, ctx: PassContext) -> None:
        self._start = (time.perf_counter(), time.process_time(), self._peak_rss_kib())

    def after_pass(self, module: Module, pass_: PassBase, ctx: PassContext, result: PassResult,
                   record: dict[str, Any]) -> None:
        if self._start is None:
            return
        wall0, cpu0, rss0 = self._start
        self._start = None
        rss1 = self._peak_rss_kib()
        record["timing"] = {
            "wall_s": time.perf_counter() - wall0,
            "cpu_s": time.process_time() - cpu0,
            "peak_rss_mb": rss1 / 1024,
            "peak_rss_delta_mb": (rss1 - rss0) / 1024,
        }
        logger.info("%s: %.3fs wall, %.3fs cpu, peak RSS +%.1f MiB", _pass_name(pass_),
                    record["timing"]["wall_s"], record["timing"]["cpu_s"],
                    record["timing"]["peak_rss_delta_mb"])


class VerifyInstrument(Instrument):
    """Run the IR verifier after every pass; a failure names the pass that broke the module."""

    def after_pass(self, module: Module, pass_: PassBase, ctx: PassContext, result: PassResult,
                   record: dict[str, Any]) -> None:
        start = time.perf_counter()
        try:
            verify(module)
        except Exception as e:
            raise PassCheckError(f"the module is invalid after pass {_pass_name(pass_)!r}: "
                                 f"{e}") from e
        record["verify"] = {"ok": True, "wall_s": time.perf_counter() - start}


class DumpInstrument(Instrument):
    """Write the IR text to `directory`: `000_input.txt` first, then `NNN_<pass>.txt` after each
    pass that modified the module (NNN = step + 1), as MLIR's print-after-change does."""

    def __init__(self, directory: str | Path):
        if not str(directory).strip():      # Path("") would be the current directory
            raise PassError("IR dump directory is an empty path; give a directory name")
        self.directory = Path(directory)

    def _write(self, filename: str, module: Module) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / filename
        path.write_text(str(module.graph))
        return path

    def run_begin(self, module: Module, ctx: PassContext) -> None:
        self._write("000_input.txt", module)

    def after_pass(self, module: Module, pass_: PassBase, ctx: PassContext, result: PassResult,
                   record: dict[str, Any]) -> None:
        if not result.modified:
            return
        safe = "".join(c if c.isalnum() or c in "_-." else "_" for c in _pass_name(pass_))
        path = self._write(f"{record['step'] + 1:03d}_{safe}.txt", module)
        record["dump"] = str(path)


class NumericCheckError(PassCheckError):
    """A pass that claims to be exact changed the logits beyond the float64 tolerance."""


def _float64_copy(module: Module) -> Module:
    """A deep copy with every floating-point weight promoted to float64 (exactly: every f32, f16
    and bf16 value is a float64 value)."""
    shadow = module.clone()
    for name, v in shadow.graph.consts.items():
        t = shadow.weights[name]
        if t.is_floating_point() and t.dtype != torch.float64:
            shadow.set_weight(v, t.to(torch.float64))
    return shadow


def _stores_below_float64(module: Module) -> bool:
    return any(t.is_floating_point() and t.dtype != torch.float64 for t in module.weights.values())


def compare_logits(before: torch.Tensor, after: torch.Tensor, ids: torch.Tensor) -> dict[str, Any]:
    """How far `after` logits are from `before` on the batch `ids` [batch, seq]: the largest
    difference relative to max |logit|, KL(before || after) averaged over tokens, top-1
    agreement, and the perplexity of the batch's next tokens under each (a perplexity proxy).
    Computed in float64 over COMPARE_ELEMENTS logits at a time (whole token rows), so its memory
    is bounded whatever the vocabulary (a 262k one held 8 float64 copies of the whole batch)."""
    vocab = before.shape[-1]
    b_all, a_all = before.reshape(-1, vocab), after.reshape(-1, vocab)
    nxt = torch.full(ids.shape, -1, dtype=torch.int64)  # each position's next token, -1: none
    nxt[:, :-1] = ids[:, 1:]
    nxt = nxt.reshape(-1)
    step = max(1, COMPARE_ELEMENTS // vocab)
    scale = diff = kl = agree = nll_b = nll_a = 0.0
    for i in range(0, b_all.shape[0], step):
        b, a = b_all[i:i + step].to(torch.float64), a_all[i:i + step].to(torch.float64)
        scale = max(scale, b.abs().max().item())
        diff = max(diff, (a - b).abs().max().item())
        logp_b, logp_a = torch.log_softmax(b, dim=-1), torch.log_softmax(a, dim=-1)
        kl += (logp_b.exp() * (logp_b - logp_a)).sum().item()
        agree += (b.argmax(-1) == a.argmax(-1)).sum().item()
        t = nxt[i:i + step]
        has = t >= 0
        nll_b -= logp_b[has].gather(-1, t[has, None]).sum().item()
        nll_a -= logp_a[has].gather(-1, t[has, None]).sum().item()
    tokens = b_all.shape[0]
    stats: dict[str, Any] = {"max_rel_diff": diff / (scale or 1.0), "kl": max(kl / tokens, 0.0),
                             "top1_agreement": agree / tokens, "tokens": int(ids.numel())}
    if ids.shape[1] > 1:
        pairs = ids.shape[0] * (ids.shape[1] - 1)
        stats.update(ppl_before=math.exp(nll_b / pairs), ppl_after=math.exp(nll_a / pairs),
                     ppl_ratio=math.exp((nll_a - nll_b) / pairs))
    return stats


class NumericCheckInstrument(Instrument):
    """Run a pinned token batch through the reference interpreter in float64 before and after each
    pass that modified the module, and record how far the logits moved.

    Exact passes (`pass_.exact` true) must keep max |Δlogit| / max |logit| ≤ `rtol` (1e-9).
    Exactness is a property of the transformation, not of the storage: a norm fold on float32
    weights rounds the folded weights to float32 (~1e-7), which no float64 evaluation can undo. So
    when the module stores weights below float64, the pass is also run on a float64 copy of its
    input (`shadow`), and that copy must meet `rtol`; the stored module must meet the looser
    `storage_rtol` (rounding only). Lossy passes only report: KL, top-1 agreement and the
    perplexity proxy (see compare_logits). Each pass costs one interpreter run (two for an exact
    pass on a below-float64 module): the logits after pass k are the logits before pass k + 1.
    """

    def __init__(self, batch: Any, *, rtol: float = 1e-9, storage_rtol: float = 1e-4,
                 shadow: bool = True):
        self.batch = _check_batch(batch)
        for key, tol in (("rtol", rtol), ("storage_rtol", storage_rtol)):
            if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol >= 0:
                raise PassError(f"NumericCheckInstrument: {key} must be a number >= 0, got {tol!r}")
        self.rtol = float(rtol)
        self.storage_rtol = float(storage_rtol)
        self.shadow = bool(shadow)
        self._module: Module | None = None
        self._logits: torch.Tensor | None = None
        self._shadow_input: Module | None = None

    def logits(self, module: Module) -> torch.Tensor:
        """The float64 logits of `module` on the pinned batch."""
        vocab = module.config.vocab_size
        top = int(self.batch.max())
        if top >= vocab:
            raise PassError(f"numeric check batch holds token id {top}, but the model's "
                            f"vocabulary has {vocab} tokens (ids 0..{vocab - 1})")
        outs = run_logits(module, self.batch, torch.float64)
        if "logits" in outs:
            return outs["logits"]
        return outs[module.graph.outputs[0].name]

    def run_begin(self, module: Module, ctx: PassContext) -> None:
        self._module, self._logits, self._shadow_input = None, None, None

    def before_pass(self, module: Module, pass_: PassBase, ctx: PassContext) -> None:
        if self._logits is None or self._module is not module:
            self._logits, self._module = self.logits(module), module
        self._shadow_input = None
        if pass_.exact and self.shadow and _stores_below_float64(module):
            self._shadow_input = _float64_copy(module)

    def after_pass(self, module: Module, pass_: PassBase, ctx: PassContext, result: PassResult,
                   record: dict[str, Any]) -> None:
        exact = bool(pass_.exact)
        name = _pass_name(pass_)
        shadow, self._shadow_input = self._shadow_input, None
        before = self._logits
        assert before is not None, "before_pass was not called"
        if not result.modified:
            self._module = module
            record["numeric"] = {"exact": exact, "skipped": "the pass reported modified=False"}
            return
        after = self.logits(module)
        stats = {"exact": exact, **compare_logits(before, after, self.batch)}
        self._logits, self._module = after, module
        record["numeric"] = stats
        if not exact:
            logger.info("%s: KL %.3g, top-1 %.4f, max rel diff %.3g", name, stats["kl"],
                        stats["top1_agreement"], stats["max_rel_diff"])
            return
        if shadow is not None:
            exact_diff = compare_logits(before, self.logits(pass_.call(shadow, ctx).module),
                                        self.batch)["max_rel_diff"]
            stats["float64_max_rel_diff"] = exact_diff
            if stats["max_rel_diff"] > self.storage_rtol:
                raise NumericCheckError(
                    f"pass {name!r} claims to be exact, but its stored result moved the logits "
                    f"by {stats['max_rel_diff']:.3g} of max |logit| (allowed for rounding: "
                    f"{self.storage_rtol:.3g})")
        else:
            exact_diff = stats["max_rel_diff"]
        stats["rtol"] = self.rtol
        if exact_diff > self.rtol:
            raise NumericCheckError(
                f"pass {name!r} claims to be exact, but in float64 it moved the logits by "
                f"{exact_diff:.3g} of max |logit| (allowed: {self.rtol:.3g}); KL {stats['kl']:.3g}, "
                f"top-1 agreement {stats['top1_agreement']:.4f}")
        logger.info("%s: exact to %.3g (float64)", name, exact_diff)


def _check_batch(batch: Any) -> torch.Tensor:
    """The pinned batch as int64 [batch, seq]; anything else raises naming what is accepted."""
    try:
        t = batch if isinstance(batch, torch.Tensor) else torch.tensor(batch)
    except (TypeError, ValueError) as e:
        raise PassError(f"numeric check batch must be token ids [batch, seq]: {e}") from None
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or t.numel() == 0:
        raise PassError(f"numeric check batch must be token ids [batch, seq], got shape "
                        f"{list(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise PassError(f"numeric check batch must hold integer token ids, got {t.dtype}")
    if int(t.min()) < 0:
        raise PassError("numeric check batch holds a negative token id")
    return t.to(torch.int64)
