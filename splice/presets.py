"""Presets: built-in recipes chosen for a goal on a target, with the figures they were chosen by.

A preset is a built-in recipe (a TOML file in splice/recipes/) with a `[preset]` table:

    [preset]
    target = "cpu"              # the target it is meant for: cpu | npu
    goal = "balanced"           # what it is chosen for: fastest, balanced, closest to float
    default = true              # the one `splice compile MODEL --target cpu` takes with no recipe
    calibration_text = "..."    # what text --calib should give, for a preset that calibrates

    [preset.measured]           # what `make bench` measured (benchmarks/presets.py), never typed
    model = "SmolLM2-135M"      # in by hand: the section writes the table it prints
    ...

`splice presets` lists them with their figures; `splice presets show NAME` prints the file to
edit and pass back as `--recipe FILE`. A recipe ignores its [preset] table (splice/recipe.py).
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from typing import Any

from .errors import InputError
from .recipe import Recipe, builtin_names, builtin_text

TARGETS = ("cpu", "npu")
_KEYS = ("target", "goal", "default", "calibration_text", "measured")
# the figures `splice presets` shows, in this order, with their column heads
COLUMNS = (("backend", "through"), ("wikitext2_ppl", "WikiText-2 ppl"),
           ("decode_tok_s_1_thread", "decode tok/s 1 thr"),
           ("decode_tok_s_2_threads", "decode tok/s 2 thr"),
           ("vs_llama_cpp_q4_0_1_thread", "vs llama.cpp Q4_0 1 thr"),
           ("compile_s", "compile s"), ("size_mb", "size MB"))


@dataclasses.dataclass(frozen=True)
class Preset:
    """A built-in recipe's [preset] table, checked."""

    name: str
    target: str
    goal: str
    default: bool
    calibration_text: str
    measured: Mapping[str, Any]
    description: str
    calibrates: bool  # whether its recipe needs calibration text

    def figures(self) -> str:
        """One line of its measured figures, or why there are none."""
        m = self.measured
        if not m:
            return "not measured yet"
        shown = [f"{head} {_fmt(m[key])}" for key, head in COLUMNS if key in m]
        where = ", ".join(str(m[k]) for k in ("model", "machine", "date") if k in m)
        return "; ".join(shown) + (f" ({where})" if where else "")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.2f}" if v < 100 else f"{v:.0f}"
    return str(v)


def _check(name: str, table: Any, recipe: Recipe) -> Preset:
    """The [preset] table of a shipped file: a mistake there is a bug in splice, not bad input."""
    if not isinstance(table, Mapping):
        raise RuntimeError(f"built-in recipe {name!r}: [preset] must be a table")
    bad = [k for k in table if k not in _KEYS]
    if bad or table.get("target") not in TARGETS or not isinstance(table.get("goal"), str) \
            or not isinstance(table.get("default", False), bool) \
            or not isinstance(table.get("measured", {}), Mapping):
        raise RuntimeError(f"built-in recipe {name!r}: [preset] needs target ({', '.join(TARGETS)})"
                           f", goal, default (a bool), measured (a table); keys: {', '.join(_KEYS)}")
    return Preset(name, table["target"], table["goal"], table.get("default", False),
                  table.get("calibration_text", ""), dict(table.get("measured", {})),
                  recipe.description, recipe.calibration_samples > 0)


def presets(target: str | None = None) -> list[Preset]:
    """Every built-in preset (of `target` when given), the default of each target first."""
    out = []
    for name in builtin_names():
        data = tomllib.loads(builtin_text(name))
        if "preset" in data:
            p = _check(name, data["preset"], Recipe.named(name))
            if target is None or p.target == target:
                out.append(p)
    return sorted(out, key=lambda p: (TARGETS.index(p.target), not p.default, p.name))


def get(name: str) -> Preset:
    """The preset called `name`; an unknown name is bad input that lists the presets."""
    for p in presets():
        if p.name == name:
            return p
    raise InputError(f"unknown preset {name!r}; presets: "
                     f"{', '.join(p.name for p in presets())}")


def default_preset(target: str) -> str:
    """The name of the preset `splice compile MODEL --target T` takes when no recipe is given."""
    for p in presets(target):
        if p.default:
            return p.name
    raise InputError(f"target {target!r} has no default preset; targets with one: "
                     f"{', '.join(sorted({p.target for p in presets() if p.default}))}; "
                     "give --recipe NAME|FILE")


def backend_for(recipe: str, target: str, backend: str | None, options: dict
                ) -> tuple[str, dict]:
    """The CLI's backend and its options: `backend` as given; with none, a CPU preset compiles
    for TVM with int8 activations and a float16 KV cache where that runs (the tvm extra
    installed, an x86 CPU with AVX2, no ONNX-only option given: SmolLM2's fastest and balanced
    decode 1.5-1.8x llama.cpp's Q4_0 there against ~1.0x through ONNX Runtime, at the same
    perplexity; the float16 cache: 1.2-1.4x at 512 tokens of context, 1.4-1.5x at 1,500, for
    +-0.05% perplexity; docs/tvm.md), anything else for ONNX Runtime. The aarch64 target has
    one backend, TVM (float activations unless asked: the int8 products need Armv8.2's dot
    product, which some edge cores lack; a float16 KV cache)."""
    if backend is not None:
        return backend, options
    if target == "aarch64":
        return "tvm", {"kv_cache": "float16", **options}
    cpu_preset = any(p.name == recipe for p in presets("cpu"))
    tvm_only = {"threads", "activations", "kv_cache"}
    if not cpu_preset or target != "cpu" or options.keys() - tvm_only or not tvm_int8_runs():
        return "onnx", options
    return "tvm", {"activations": "int8", "kv_cache": "float16", **options}


def tvm_int8_runs() -> bool:
    """Whether TVM's int8-activation products can be built and run here (without importing TVM,
    which takes seconds)."""
    import importlib.util
    import platform

    from splice.runtime.tvm_runtime import cpu_flags

    return importlib.util.find_spec("tvm") is not None and platform.machine() in (
        "x86_64", "AMD64") and "avx2" in cpu_flags()


def check_calibration(recipe: Recipe, calibration: Any) -> None:
    """A recipe that calibrates, given no calibration text: one line naming the text it wants
    (a preset's own words, or what any calibrated recipe wants), before any model is loaded."""
    if recipe.calibration_samples == 0 or calibration is not None:
        return
    want = next((p.calibration_text for p in presets() if p.name == recipe.name
                 and p.calibration_text), "text like the model's use (e.g. WikiText-2's "
                "validation text)")
    raise InputError(f"recipe {recipe.name!r} needs calibration text ({recipe.calibration_samples}"
                     f" x {recipe.calibration_seq_len} tokens): give --calib FILE (Python: "
                     f"calibration=) with {want}")


def table() -> str:
    """What `splice presets` prints: each preset, its goal, and its measured figures."""
    lines = []
    for p in presets():
        flag = " (default)" if p.default else ""
        calib = ", needs --calib" if p.calibrates else ""
        lines.append(f"{p.name:<18} {p.target} {p.goal}{flag}{calib}")
        lines.append(f"{'':<18} {p.description}")
        lines.append(f"{'':<18} measured: {p.figures()}")
    lines.append("`splice presets show NAME` prints one as TOML to edit and pass as --recipe FILE")
    return "\n".join(lines)


def show(name: str) -> str:
    """The preset's TOML file as shipped (comments and figures included)."""
    return builtin_text(get(name).name)
