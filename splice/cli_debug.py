"""The debugging subcommands of the CLI: `splice debug`, `splice bisect` and `splice inspect
--calib`. splice/cli.py declares their arguments and calls these; they print what a person reads
and return the exit code (InputError propagates, so bad input still exits 2 with one line).

Exit codes: debug returns 0 when every pass and check passed and 1 when one failed (a finding:
the report is written either way and says where); bisect returns 0 when it found the culprit and
3 when no pass crosses the tolerance (the message says so and gives the largest value seen), so a
script can tell "found" from "clean" from bad input (2).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .cli_args import progress_on
from .errors import InputError

log = logging.getLogger(__name__)

NOT_FOUND = 3


def _check_args(a: argparse.Namespace) -> None:
    """Reject bad arguments before anything heavy is imported or loaded."""
    if a.calib is not None and not Path(a.calib).is_file():
        raise InputError(f"calibration text {a.calib} not found; give a UTF-8 text file")
    if a.tokens < 2:
        raise InputError(f"--tokens must be at least 2, got {a.tokens}")
    tol = getattr(a, "tolerance", None)
    if tol is not None and not tol >= 0:  # also catches nan
        raise InputError(f"--tolerance must be a number >= 0, got {tol}")


def _recipe(a: argparse.Namespace):
    """The recipe, after the arguments' checks: a bad one fails before the model is loaded."""
    _check_args(a)
    from .recipe import Recipe

    return Recipe.resolve(a.recipe)


def _import(a: argparse.Namespace, stage: Callable[[str], None]):
    from splice.frontend import load_model

    stage("import")
    return load_model(a.model)


def _calibration(module, recipe, calib: str | None):
    """Token windows for passes that calibrate, from the start of the text (recipe's size)."""
    from splice.frontend.tokens import calibration_windows

    if calib is None or recipe.calibration_samples == 0:
        return None
    seq = min(recipe.calibration_seq_len, module.config.max_position)
    return calibration_windows(module, calib, recipe.calibration_samples * seq, seq_len=seq)


def _stats_batches(module, calib: str, tokens: int):
    from splice.frontend.tokens import calibration_windows

    return calibration_windows(module, calib, tokens, seq_len=256)


def build_report(module, recipe, out: Path, *, calib: str | None, tokens: int,
                 check_lowering: bool = False, stats_tokens: int | None = None,
                 expand_layer: int | None = None, model_name: str = "",
                 extra: dict[str, Any] | None = None,
                 progress: Callable[[str], None] | None = None) -> tuple[dict, Path]:
    """Run `recipe` with every instrument on `module` (which it may change), add the optional
    sections and write out/report.html + report.json. Returns (data, html path). Activation
    statistics (with `calib`) use `stats_tokens` tokens, by default 4 × `tokens`. `progress` is
    given the name of each step as it starts (report_steps counts them)."""
    from splice.ir.graph_svg import draw_graph
    from splice.passes.infra.report import write_report
    from splice.ir.stats import activation_stats
    from splice.frontend.tokens import pinned_batch
    from splice.passes.infra.trace import debug_run
    from .progress import StageInstrument

    stage = progress or (lambda name: None)
    stage("pinned batch")
    batch, source = pinned_batch(module, calib, tokens)
    calibration = _calibration(module, recipe, calib)
    stats_before = None
    if calib is not None:
        stage("activation statistics")
        stats_batches = _stats_batches(module, calib, stats_tokens or 4 * tokens)
        stats_before = activation_stats(module, stats_batches)
    final, data = debug_run(module, recipe, out, batch=batch, batch_source=source,
                            calibration=calibration, model_name=model_name,
                            instruments=(StageInstrument(stage),) if progress else ())
    if stats_before is not None:
        stage("activation statistics after the recipe")
        data["activation_stats"] = {"input model": stats_before,
                                    "after the recipe": activation_stats(final, stats_batches)}
    if check_lowering:
        stage("lowering check")
        data["lowering_check"] = _lowering(final, batch)
    stage("report")
    layers = final.graph.layers()
    data["graph"] = draw_graph(final.graph, expand_layer=expand_layer if expand_layer in layers
                               else None)
    if extra:
        data.update(extra)
    return data, write_report(data, out)


def report_steps(recipe, *, calib: str | None, check_lowering: bool = False) -> int:
    """How many steps build_report names: the pinned batch, each pass, the report, and the
    optional activation statistics (two) and lowering check."""
    return 2 + len(recipe.passes) + 2 * (calib is not None) + int(check_lowering)


def _lowering(module, batch) -> dict[str, Any]:
    from splice.backends.onnx.lower import LoweringError
    from splice.backends.onnx.lowering_check import check_lowering

    try:
        return check_lowering(module, batch[:1]).to_json()
    except LoweringError as e:  # the report says what cannot be lowered, rather than nothing
        return {"ok": False, "error": str(e)}


def _print_passes(data: dict) -> None:
    from splice.passes.infra.report import numeric_verdict

    print(f"{'step':>4} {'pass':<20} {'modified':>8} {'time s':>8} {'peak MB':>8}  numeric check")
    for p in data["passes"]:
        t = p.get("timing") or {}
        peak = f"{t['peak_rss_mb']:.0f}" if t else "-"
        time_s = f"{p['time_s']:.3f}" if p.get("time_s") is not None else "-"
        text, ok = numeric_verdict(p.get("numeric"))
        mark = "" if ok is None else (" ok" if ok else " FAILED")
        print(f"{p['step']:>4} {p['name']:<20} {str(p.get('modified')):>8} {time_s:>8} "
              f"{peak:>8}  {text}{mark}")


def cmd_debug(a: argparse.Namespace) -> int:
    """`splice debug`: the instrumented run, its table on stdout, the report in --out."""
    from .progress import Progress

    t0 = time.perf_counter()
    recipe = _recipe(a)
    steps = 1 + report_steps(recipe, calib=a.calib, check_lowering=a.check_lowering)
    with Progress("splice debug", steps, enabled=progress_on(a)) as shown:
        module = _import(a, shown.stage)
        data, path = build_report(module, recipe, Path(a.out), calib=a.calib, tokens=a.tokens,
                                  check_lowering=a.check_lowering, model_name=str(a.model),
                                  progress=shown.stage)
    _print_passes(data)
    failed = False
    if data.get("error"):
        failed = True
        print(f"stopped: {data['error']['message']}", file=sys.stderr)
    lc = data.get("lowering_check")
    if lc is not None:
        if lc.get("error"):
            print(f"lowering check: {lc['error']}")
        else:
            print(lc["summary"])
        failed = failed or not lc["ok"]
    print(f"report: {path} ({time.perf_counter() - t0:.1f} s)")
    return 1 if failed else 0


def cmd_bisect(a: argparse.Namespace) -> int:
    """`splice bisect`: the metric after each pass, the layer search, the culprit line, then the
    debug report of the run up to the culprit (its layer expanded in the drawing)."""
    from splice.passes.infra.bisect import bisect
    from splice.frontend.tokens import pinned_batch
    from .progress import Progress
    from .recipe import Recipe

    t0 = time.perf_counter()
    recipe = _recipe(a)
    # import, pinned batch, reference logits, each pass, about four layer probes, the report
    steps = 7 + len(recipe.passes) + report_steps(recipe, calib=a.calib)
    with Progress("splice bisect", steps, enabled=progress_on(a)) as shown:
        module = _import(a, shown.stage)
        shown.stage("pinned batch")
        batch, source = pinned_batch(module, a.calib, a.tokens)
        calibration = _calibration(module, recipe, a.calib)
        original = module.clone()
        result = bisect(module, recipe, metric=a.metric, tolerance=a.tolerance, batch=batch,
                        calibration=calibration, cache_dir=a.cache_dir, progress=shown.stage)
        upto = len(recipe.passes) if result.culprit_step is None else result.culprit_step + 1
        part = Recipe(f"{recipe.name} up to {result.culprit_name}" if result.found
                      else recipe.name, recipe.passes[:upto], recipe.description, recipe.seed,
                      recipe.calibration_samples, recipe.calibration_seq_len)
        _, path = build_report(original, part, Path(a.out), calib=a.calib, tokens=a.tokens,
                               expand_layer=result.layer, model_name=str(a.model),
                               extra={"bisect": result.to_json()},
                               progress=lambda name: shown.stage(f"report: {name}"))
    # printed once the display has cleared its line
    print(f"{'step':>4} {'pass':<20} {a.metric:>12}")
    for s in result.steps:
        print(f"{s['step']:>4} {s['name']:<20} {s['value']:>12.4g}"
              + ("  > tolerance" if s["crosses"] else ""))
    for p in result.layer_probes:
        print(f"     changes kept for layers <= {p['layers_kept']:>3}: {a.metric} {p['value']:.4g}"
              + ("  > tolerance" if p["crosses"] else ""))
    print(result.summary)
    if result.layer_note:
        print(f"({result.layer_note})")
    print(f"report: {path} ({time.perf_counter() - t0:.1f} s)")
    return 0 if result.found else NOT_FOUND


def check_inspect_calib(a: argparse.Namespace) -> None:
    """`splice inspect --calib`: refuse an artefact or a missing text before any loading."""
    if (Path(a.model) / "manifest.json").is_file():
        raise InputError("activation statistics (--calib) need a model the reference interpreter "
                         "runs (a checkpoint or a saved module), not a compiled artefact")
    if not Path(a.calib).is_file():
        raise InputError(f"calibration text {a.calib} not found; give a UTF-8 text file")


def print_activation_stats(module, calib: str, tokens: int) -> None:
    """`splice inspect MODEL --calib FILE [--tokens N]`: the activation statistics tables."""
    from splice.ir.stats import activation_stats, format_stats

    print(format_stats(activation_stats(module, _stats_batches(module, calib, tokens))))


def add_arguments(sub: Any, model_help: str) -> None:
    """Declare `debug` and `bisect` on the CLI's subparsers."""
    d = sub.add_parser("debug", help="run a recipe with every check on and write an HTML report")
    d.add_argument("model", metavar="MODEL", help=model_help)
    d.add_argument("--recipe", default="fold_norms", help="a built-in recipe name or a .toml file")
    d.add_argument("--out", required=True, help="directory for report.html, report.json, ir/")
    d.add_argument("--calib", help="text file: calibration, the pinned batch, activation stats")
    d.add_argument("--tokens", type=int, default=128, help="tokens in the pinned batch (the "
                   "activation statistics use 4 times as many)")
    d.add_argument("--check-lowering", action="store_true",
                   help="also compare every IR value with ONNX Runtime (optimisations off)")
    d.set_defaults(fn=cmd_debug)

    b = sub.add_parser("bisect", help="find the first pass (and layer) that crosses a tolerance")
    b.add_argument("model", metavar="MODEL", help=model_help)
    b.add_argument("--recipe", required=True, help="a built-in recipe name or a .toml file")
    b.add_argument("--metric", required=True, choices=("ppl", "kl"),
                   help="kl: mean KL(original || current) per token; ppl: relative perplexity "
                        "increase on the pinned batch")
    b.add_argument("--tolerance", required=True, type=float, help="the metric's largest "
                   "acceptable value")
    b.add_argument("--calib", help="text file: calibration and the pinned batch")
    b.add_argument("--tokens", type=int, default=128, help="tokens in the pinned batch")
    b.add_argument("--out", default="splice-bisect", help="report directory")
    b.add_argument("--cache-dir", help="save the intermediate modules here (default: memory)")
    b.set_defaults(fn=cmd_bisect)
