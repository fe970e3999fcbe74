"""The `splice` command line: compile, run, eval, inspect, passes, debug, bisect.

Exit codes: 0 success, 2 bad input (one line naming the problem and what is accepted), 1 an
internal failure (a bug: the message says so; --debug shows the traceback for either).
`splice debug` also returns 1 when a pass or the lowering check failed (its report says where),
`splice bisect` returns 3 when no pass crosses the tolerance (see splice/cli_debug.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from .cli_args import (BISECT_EPILOG, DEBUG_EPILOG, GLOBAL_FLAGS, HelpFormatter, Parser,
                       add_export_arguments, check_arguments, export_options)
from .cli_args import progress_on as _progress_on
from .errors import InputError

log = logging.getLogger("splice")

EXAMPLES = """examples:
  splice compile smollm2-135m --recipe fold_norms --target cpu --out out/smollm2
  splice compile smollm2-135m --recipe fastest --backend tvm --out out/smollm2-tvm
  splice run out/smollm2 "Once upon a time" --max-new-tokens 32
  splice eval out/smollm2 --text wikitext2_test.txt --max-tokens 16384
  splice inspect out/smollm2
  splice inspect smollm2-135m --calib wikitext2_valid_tokenized.txt --tokens 2048
  splice debug smollm2-135m --recipe fold_norms --out out/debug --calib tinystories_val.txt
  splice bisect model.bin --recipe my.toml --metric kl --tolerance 0.01 --out out/bisect
  splice presets
  splice presets show balanced > my.toml
  splice passes
"""


def _is_artefact(path: str) -> bool:
    return (Path(path) / "manifest.json").is_file()


def cmd_compile(a: argparse.Namespace) -> int:
    with _sigint_deferred():  # a Ctrl-C inside onnx_ir's nanobind import would abort the process
        import onnx_ir  # noqa: F401
    from .api import compile

    from splice.passes.infra.distributed import launched_by_torchrun

    t0 = time.perf_counter()
    # --calib names a file: a Path, so that a missing one is reported as such (a str that is not
    # a file would be taken as the calibration text itself)
    recipe, backend, options = _compile_recipe(a)
    if a.backend is None and backend != "onnx":
        print(f"backend: tvm, {options.get('activations', 'float')} activations, "
              f"{options['kv_cache']} KV cache (--backend and --activations, --kv-cache choose)")
    from .progress import Progress

    with Progress("splice compile", len(recipe.passes) + 2, enabled=_progress_on(a)) as shown:
        path = compile(a.model, recipe, a.target, a.out,
                       calibration=Path(a.calib) if a.calib is not None else None,
                       instruments=_instruments(a), seed=a.seed, load=False,
                       memory_limit=None if a.memory_limit is None else a.memory_limit * 1e9,
                       backend=backend, layerwise=a.layerwise,
                       distributed=launched_by_torchrun(), export_options=options,
                       progress=shown.stage)
    if path is None:  # a torchrun rank other than 0: rank 0 wrote the artefact
        return 0
    manifest = json.loads((path / "manifest.json").read_text())
    _print_report(manifest.get("report", {}))
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"artefact: {path} ({size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    return 0


def _compile_recipe(a: argparse.Namespace):
    """The recipe, the backend and its options: --recipe, or with none the target's default
    preset (splice/presets.py) on the onnx, tvm and npu backends, gguf_q4_0 on the gguf backend
    (docs/gguf.md), fold_norms elsewhere; --backend, or with none the presets' choice
    (presets.backend_for). compile() refuses a recipe that calibrates given no --calib."""
    from . import presets
    from .api import resolve_recipe

    name = "gguf_q4_0" if a.recipe is None and a.backend == "gguf" else a.recipe
    if name is None:
        target = "npu" if a.backend == "npu" else a.target
        has_default = a.backend in (None, "onnx", "tvm", "npu") and any(
            p.default for p in presets.presets(target))
        name = presets.default_preset(target) if has_default else "fold_norms"
    recipe = resolve_recipe(name)
    return (recipe, *presets.backend_for(recipe.name, a.target, a.backend, export_options(a)))


def cmd_presets(a: argparse.Namespace) -> int:
    from . import presets

    if a.action == "show" and a.name is None:
        raise InputError("splice presets show NAME: name the preset to print; presets: "
                         + ", ".join(p.name for p in presets.presets()))
    print(presets.show(a.name) if a.action == "show" else presets.table(), end="\n")
    return 0


def _instruments(a: argparse.Namespace) -> list:
    from splice.passes.infra.instruments import DumpInstrument, TimingInstrument, VerifyInstrument

    inst = [TimingInstrument(), VerifyInstrument()]
    if a.dump_ir:
        inst.append(DumpInstrument(Path(a.dump_ir)))
    return inst


def _summary(value) -> str:
    """A report value on one short line: a dict's entries and a short list's items as values,
    a longer list as its count."""
    if isinstance(value, dict):
        if len(value) > 6:
            return f"({len(value)} entries)"
        return "{" + ", ".join(f"{k} {_summary(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        if len(value) > 6 or any(isinstance(v, (list, tuple, dict)) for v in value):
            return f"({len(value)} items)"
        return "[" + ", ".join(_summary(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _numeric(rec: dict | None) -> str:
    if not rec:
        return "-"
    if "skipped" in rec:
        return "unchanged"
    if rec.get("exact"):
        text = f"max rel diff {rec['max_rel_diff']:.1e}"
        if "float64_max_rel_diff" in rec:
            text += f" (float64 {rec['float64_max_rel_diff']:.1e})"
        return text
    return (f"KL {rec['kl']:.2e}, top-1 {rec['top1_agreement']:.3f}, "
            f"ppl x{rec['ppl_ratio']:.4f}")


def _print_report(report: dict) -> None:
    """One line per pass: what changed, how long it took, and what the numeric check saw."""
    rows = (report or {}).get("passes") or []   # an artefact written without a report has null
    if not rows:
        print("passes: none")
        return
    # the numeric check is an instrument of `splice debug`; a compile without it shows no column
    checked = any(r.get("numeric") for r in rows)
    numeric = f"{'numeric check':<44} " if checked else ""
    # the timing instrument's peak RSS of the process when the pass ended (a high-water mark)
    print(f"{'pass':<22} {'modified':>8} {'time s':>7} {'peak MB':>8}  {numeric}report")
    for r in rows:
        own = ", ".join(f"{k} {_summary(v)}" for k, v in r.get("report", {}).items())
        numeric = f"{_numeric(r.get('numeric')):<44} " if checked else ""
        peak = (r.get("timing") or {}).get("peak_rss_mb")
        print(f"{r['name']:<22} {str(r['modified']):>8} {r.get('time_s', 0):>7.2f} "
              f"{'-' if peak is None else f'{peak:.0f}':>8}  {numeric}{own}")


def cmd_run(a: argparse.Namespace) -> int:
    from splice.runtime import load

    # only the load options the user gave: a runtime that has no such option (NPU: threads)
    # refuses it, but must not be handed one nobody asked for
    options = {"threads": a.threads} if a.threads is not None else {}
    art = load(a.artefact, **options)
    kw = dict(max_new_tokens=a.max_new_tokens, greedy=a.temperature == 0, temperature=a.temperature
              or 1.0, top_k=a.top_k, top_p=a.top_p, seed=a.seed, lookahead=a.lookahead)
    if a.no_stream:
        print(art.generate(a.prompt, **kw))
    else:
        pieces = art.stream(a.prompt, **kw)
        # the generator checks the prompt and the settings when it starts: take its first piece
        # before echoing the prompt, so that a refusal is the only thing printed
        first = next(pieces, "")
        sys.stdout.write(a.prompt + first)
        sys.stdout.flush()
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    stats = getattr(art, "last_stats", None)
    if stats:
        kept = (f", {stats['accepted']} of {stats['drafted']} drafts kept"
                if "drafted" in stats else "")
        print(f"[prefill {stats.get('prefill_tok_s', 0):.1f} tok/s, "
              f"decode {stats.get('decode_tok_s', 0):.1f} tok/s{kept}]", file=sys.stderr)
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from .evaluate import perplexity_of

    r = perplexity_of(a.model, Path(a.text), max_tokens=a.max_tokens, window=a.window,
                      progress=_progress_on(a))
    print(f"perplexity {r['ppl']:.3f} over {r['tokens']} tokens ({r['protocol']}) [{r['engine']}]")
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    if a.calib is not None:
        from .cli_debug import check_inspect_calib

        check_inspect_calib(a)
    if _is_artefact(a.model):
        from splice.runtime.manifest import verify_artefact

        m = verify_artefact(Path(a.model))   # describe only what the hashes vouch for
        cfg = m.get("config", {})
        print(f"artefact {a.model}: backend {m.get('backend')} target {m.get('target')} "
              f"format {m.get('format_version')}")
        _print_config(cfg)
        files = m.get("files", {})
        total = sum((Path(a.model) / f).stat().st_size for f in files if (Path(a.model) / f).exists())
        print(f"files: {len(files)} ({total / 1e6:.1f} MB)")
        _print_report(m.get("report", {}))
        return 0
    from splice.frontend import load_model

    module = load_model(a.model)
    _print_config(module.config.to_json())
    print(f"parameters: {module.num_parameters():,}")
    print("ops: " + ", ".join(f"{k} {v}" for k, v in module.graph.op_counts().items()))
    if a.graph:
        print(module.graph)
    if a.calib is not None:
        from .cli_debug import print_activation_stats

        print_activation_stats(module, a.calib, a.tokens)
    return 0


def _print_config(cfg: dict) -> None:
    keys = ("architecture", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
            "head_dim", "intermediate_size", "max_position", "source")
    print(", ".join(f"{k} {cfg[k]}" for k in keys if k in cfg))


def cmd_passes(a: argparse.Namespace) -> int:
    from splice.passes.infra.registry import describe_passes

    print(describe_passes())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="splice", description="A compiler for large language models.",
                                epilog=EXAMPLES, formatter_class=HelpFormatter)
    for flags, text in GLOBAL_FLAGS:
        p.add_argument(*flags, action="store_true", help=text)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model_help = ("a Hugging Face directory, a .gguf file, a llama2.c .bin, or 'smollm2-135m' "
                  "(the embedded default)")

    c = sub.add_parser("compile", help="compile a model into an artefact directory")
    c.add_argument("model", metavar="MODEL", help=model_help)
    c.add_argument("--recipe", default=None,
                   help="a built-in recipe or preset name, or a .toml file (default: the "
                        "target's default preset on the onnx, tvm and npu backends, `splice "
                        "presets`; gguf_q4_0 on gguf)")
    c.add_argument("--backend", default=None, choices=("onnx", "tvm", "npu", "gguf"),
                   help="onnx (ONNX Runtime), tvm (a compiled library), npu (Qualcomm HTP) or "
                        "gguf (a GGUF file for llama.cpp); default: tvm with int8 activations "
                        "for a CPU preset where the tvm extra runs on an AVX2 CPU, else onnx")
    c.add_argument("--target", default="cpu",
                   help="cpu; cuda (--backend onnx or tvm); aarch64 (tvm, cross-compiled); npu "
                        "(Qualcomm HTP through QNN, static QDQ graphs; needs --calib)")
    c.add_argument("--out", required=True, help="artefact directory (replaced atomically)")
    c.add_argument("--calib", help="calibration text file (for passes that need it)")
    c.add_argument("--dump-ir", metavar="DIR", help="write the IR after every modifying pass")
    c.add_argument("--seed", type=int, default=None, help="overrides the recipe's seed")
    c.add_argument("--memory-limit", type=float, default=None, metavar="GB",
                   help="memory the compile may use (default: what is available now); a compile "
                        "estimated to need more is refused before loading")
    add_export_arguments(c)
    c.add_argument("--layerwise", action="store_true",
                   help="read the weights lazily (a Hugging Face directory or a .gguf file) "
                        "and run the passes one decoder layer at a time, after the whole-model "
                        "ones (models larger than memory; every pass but distill_patch)")
    c.set_defaults(fn=cmd_compile)

    r = sub.add_parser("run", help="generate text with an artefact")
    r.add_argument("artefact", metavar="ARTEFACT", help="an artefact directory (splice compile)")
    r.add_argument("prompt", help="the text to continue")
    r.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate, at most")
    r.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature, a finite number > 0; 0 = greedy")
    r.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest (0 = off)")
    r.add_argument("--top-p", type=float, default=1.0,
                   help="sample from the smallest set holding this probability, in (0, 1] "
                        "(1 = off)")
    r.add_argument("--seed", type=int, default=None,
                   help="sampling seed, an integer >= 0 (default: a fresh one)")
    r.add_argument("--threads", type=int, default=None,
                   help="ONNX, TVM, GGUF: threads (default: the artefact's own setting)")
    r.add_argument("--lookahead", type=int, default=0, metavar="K",
                   help="greedy only: prompt lookup decoding, up to K tokens copied from the "
                        "context and checked in one step, how many adapted to how many are "
                        "kept (0 = one token a step)")
    r.add_argument("--no-stream", action="store_true", help="print the text at the end")
    r.set_defaults(fn=cmd_run)

    e = sub.add_parser("eval", help="perplexity of an artefact or a model on a text file")
    e.add_argument("model", metavar="ARTEFACT|MODEL")
    e.add_argument("--text", required=True, help="UTF-8 text file")
    e.add_argument("--max-tokens", type=int, default=16384,
                   help="evaluate the text's first N tokens (N >= 1)")
    e.add_argument("--window", type=int, default=None,
                   help="tokens per window, >= 2 (default: min(1024, context))")
    e.set_defaults(fn=cmd_eval)

    i = sub.add_parser("inspect", help="describe an artefact or a model")
    i.add_argument("model", metavar="ARTEFACT|MODEL")
    i.add_argument("--graph", action="store_true", help="print the IR text")
    i.add_argument("--calib", help="text file: print per-layer activation statistics on it")
    i.add_argument("--tokens", type=int, default=2048, help="calibration tokens for --calib")
    i.set_defaults(fn=cmd_inspect)

    ps = sub.add_parser("presets", help="list the presets with their measured figures, or "
                                        "print one as TOML to edit (presets show NAME)")
    ps.add_argument("action", nargs="?", choices=("list", "show"), default="list")
    ps.add_argument("name", nargs="?", metavar="NAME", help="with show: the preset to print")
    ps.set_defaults(fn=cmd_presets)

    s = sub.add_parser("passes", help="list the registered passes and their settings")
    s.set_defaults(fn=cmd_passes)

    from .cli_debug import add_arguments as add_debug_commands

    add_debug_commands(sub, model_help)
    sub.choices["debug"].epilog = DEBUG_EPILOG
    sub.choices["bisect"].epilog = BISECT_EPILOG
    for command in sub.choices.values():
        command.formatter_class = HelpFormatter
        for flags, text in GLOBAL_FLAGS:  # SUPPRESS: absent after the name, the value before it
            command.add_argument(*flags, action="store_true", default=argparse.SUPPRESS,
                                 help=text)
    return p


def _quiet_libraries(debug: bool) -> None:
    """Libraries' progress bars are off, so that splice's own display (splice/progress.py) is the
    one on stderr and a failing command's stderr is its one error line. transformers copies the
    hub's switch when it is imported, hence both calls; its GGUF reader's bar is off where the
    frontend calls it (frontend/hf.py). onnx_ir's INFO lines (each a stack dump): --debug only."""
    logging.getLogger("onnx_ir").setLevel(logging.NOTSET if debug else logging.WARNING)
    try:
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:     # a runtime-only install has no Hugging Face libraries to quiet
        return
    disable_progress_bars()
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None:
        hf_logging.disable_progress_bar()


_sigint_seen = False


_alarm_before: list = []  # SIGALRM's handler while a deferred Ctrl-C is armed (see below)


def _on_sigint(signum, frame) -> None:
    """Python's own SIGINT behaviour (raise KeyboardInterrupt), remembering that it happened.
    Inside a finalizer (a `__del__` the garbage collector runs) an exception is printed with a
    traceback and dropped, so there the interrupt is raised again 5 ms later instead, once the
    finalizer has returned."""
    global _sigint_seen
    _sigint_seen = True
    if _in_finalizer(frame):
        if not _alarm_before:
            _alarm_before.append(signal.signal(signal.SIGALRM, _on_sigint))
        signal.setitimer(signal.ITIMER_REAL, 0.005)
        return
    signal.default_int_handler(signum, frame)


def _in_finalizer(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _disarm_deferred_sigint() -> None:
    if _alarm_before:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, _alarm_before.pop())


@contextlib.contextmanager
def _sigint_deferred():
    """Hold a Ctrl-C until the block ends, then raise it as KeyboardInterrupt. For imports of
    native extensions that cannot take one: a nanobind module interrupted while it initialises
    ends the process with std::terminate, not with an exception splice can report."""
    held: list[int] = []
    try:
        before = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    except ValueError:  # not the main thread: signals are not ours to touch
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)
    if held:
        global _sigint_seen
        _sigint_seen = True
        raise KeyboardInterrupt


def _interrupted(e: BaseException) -> bool:
    """Whether `e` comes from a Ctrl-C. A C extension interrupted while it is imported turns the
    KeyboardInterrupt into its own error, with the cause dropped (numpy: "ImportError: cannot
    load module more than once per process", onnxruntime: "ImportError: initialization failed",
    or a RecursionError later), so a SIGINT seen during the command counts too; otherwise the
    cause/context chain is searched, as a frontend may wrap what it caught."""
    if _sigint_seen:
        return True
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _report_interrupt() -> int:
    print("splice: interrupted", file=sys.stderr)
    return 130


def main(argv: list[str] | None = None) -> int:
    global _sigint_seen
    a = argparse.Namespace(debug=False)
    _sigint_seen = False
    previous = None
    try:
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:   # an ignored one stays so
            previous = signal.signal(signal.SIGINT, _on_sigint)
    except ValueError:      # not the main thread (an embedding caller): leave signals alone
        pass
    # one try around everything, argument parsing included: Ctrl-C at any moment is an
    # interruption (exit 130), never a traceback
    try:
        a = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.DEBUG if a.debug else logging.INFO if a.verbose
                            else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        _quiet_libraries(a.debug)
        check_arguments(a)
        return a.fn(a)
    except InputError as e:
        if _interrupted(e):
            return _report_interrupt()
        if a.debug:
            raise
        msg = " ".join(str(e).split())
        if getattr(e, "report_text", None):  # a report that explains the error (NPU pre-flight)
            print(e.report_text, file=sys.stderr)
        print(f"splice: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _report_interrupt()
    except BrokenPipeError:   # `splice inspect ... | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 141
    except Exception as e:  # noqa: BLE001 - the one place that turns a bug into exit code 1
        if _interrupted(e):
            return _report_interrupt()
        if a.debug:
            raise
        print(f"splice: internal error: {type(e).__name__}: {e} (a bug in splice; rerun with "
              "--debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        _disarm_deferred_sigint()


if __name__ == "__main__":
    sys.exit(main())
