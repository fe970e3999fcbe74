"""The CLI's arguments: how every argument is checked before any work (by its argparse dest,
for every command that has it), the flags every command takes before or after its name, and the
help's format (defaults shown) and exit-code notes. splice/cli.py builds the parser with these."""

from __future__ import annotations

import argparse
import sys

from . import checks
from .errors import InputError

# Every argument of every command is checked where it is parsed, by its name (argparse's dest),
# before any work: a file to read, a directory to write, a number's range, a text's encoding.
INPUT_FILES = {"calib": "calibration text (--calib)", "text": "text file (--text)"}
OUTPUT_DIRS = {"out": "output directory (--out)", "dump_ir": "IR dump directory (--dump-ir)",
               "cache_dir": "cache directory (--cache-dir)"}
_int = checks.integer
NUMBERS = {   # dest -> (check, its name, its range)
    "seed": (_int, "--seed", dict(minimum=0, optional=True)),
    "max_new_tokens": (_int, "--max-new-tokens (max_new_tokens)", dict(minimum=0)),
    "temperature": (checks.number, "--temperature (0 = greedy)", dict(minimum=0)),
    "top_k": (_int, "--top-k (top_k, 0 = off)", dict(minimum=0)),
    "top_p": (checks.number, "--top-p (top_p, 1 = off)", dict(above=0, maximum=1)),
    "threads": (_int, "--threads (0: the runtime's default)", dict(minimum=0, optional=True)),
    "lookahead": (_int, "--lookahead", dict(minimum=0)),
    "max_tokens": (_int, "--max-tokens", dict(minimum=1)),
    "window": (_int, "--window", dict(minimum=2, optional=True)),
    "tokens": (_int, "--tokens", dict(minimum=2)),
    "tolerance": (checks.number, "--tolerance", dict(minimum=0)),
    "memory_limit": (checks.number, "--memory-limit (GB)", dict(above=0, optional=True)),
}
TEXTS = {"prompt": "the prompt", "model": "MODEL", "artefact": "ARTEFACT", "recipe": "--recipe"}


def check_arguments(a: argparse.Namespace) -> None:
    """Refuse a bad argument of any command before anything is loaded or written."""
    for dest, what in TEXTS.items():
        value = getattr(a, dest, None)
        if value is not None:
            checks.text_argument(value, what, allow_empty=dest == "prompt")
            if dest != "prompt" and not value.strip():
                raise InputError(f"{what} is empty; give a path or a name")
    for dest, (check, what, limits) in NUMBERS.items():
        if hasattr(a, dest):
            check(getattr(a, dest), what, **limits)
    for dest, what in INPUT_FILES.items():
        if getattr(a, dest, None) is not None:
            checks.input_file(getattr(a, dest), what)
    for dest, what in OUTPUT_DIRS.items():
        if getattr(a, dest, None) is not None:
            # compile replaces an artefact; debug, bisect and the dumps write into a directory
            kind = "artefact" if (a.command, dest) == ("compile", "out") else "dir"
            checks.output_dir(getattr(a, dest), what, kind)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, and every option's default after its help (unless it has none)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        if (not text or "%(default)" in text or not action.option_strings
                or any(action.default is d for d in (None, False, argparse.SUPPRESS))):
            return text
        return f"{text} (default: %(default)s)"


# the flags every command accepts, before or after its name
GLOBAL_FLAGS = (
    (("--debug",), "show tracebacks and debug logging"),
    (("-v", "--verbose"), "log what each step does"),
    (("-q", "--quiet"), "no progress display (it is shown only on a terminal anyway)"),
)
DEBUG_EPILOG = ("exit codes: 0 every pass and check passed; 1 a pass or the lowering check "
                "failed (the report says where); 2 bad input")
BISECT_EPILOG = ("exit codes: 0 a pass crosses the tolerance (the culprit is named); 3 no pass "
                 "crosses it (the largest value seen is given); 2 bad input. The report is "
                 "written to --out, by default ./splice-bisect")


def progress_on(a: argparse.Namespace) -> bool:
    """splice's own progress display: on a terminal, unless -q."""
    return not a.quiet and sys.stderr.isatty()


class Parser(argparse.ArgumentParser):
    """argparse's parser with the CLI's promise for bad input: one line on stderr, exit 2.
    (argparse's own error prints the usage block first: two lines or more.) The subcommands'
    parsers are of this class too, since add_subparsers makes its parsers of the parent's."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


def add_export_arguments(c: argparse.ArgumentParser) -> None:
    """`splice compile`'s backend options (export_options reads them back)."""
    c.add_argument("--ops", choices=("contrib", "standard"), default=None,
                   help="ONNX: ONNX Runtime's contrib ops (default) or standard ONNX ops only")
    c.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), default=None,
                   help="ONNX: MatMulNBits compute precision (4: int8, the default; 0: float32)")
    c.add_argument("--threads", type=int, default=None,
                   help="ONNX, TVM, GGUF: the artefact's default thread count")
    c.add_argument("--activations", choices=("float", "int8"), default=None,
                   help="TVM (cpu with AVX2; aarch64 with Armv8.2's sdot): int8 multiplies "
                        "activations quantized to 8 bits per block with integer dot products "
                        "(faster kernels, +0.2-1.4%% ppl measured); float (the default) keeps "
                        "them in float32")
    c.add_argument("--kv-cache", choices=("float32", "float16"), default=None,
                   help="TVM: the KV cache's dtype; float16 halves what a decode step reads from "
                        "it (at 1,500 tokens as much as SmolLM2's int4 weights) for a rounding "
                        "of the keys and values; float32 (the default) is exact")


def export_options(a) -> dict:
    """The backend options given on the command line (compile() refuses those the backend lacks)."""
    given = {"ops": a.ops, "accuracy_level": a.accuracy_level, "threads": a.threads,
             "activations": a.activations, "kv_cache": a.kv_cache}
    return {k: v for k, v in given.items() if v is not None}
