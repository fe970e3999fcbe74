"""Recipes: which passes run, in which order, with which settings.

A Recipe is a frozen dataclass; it is also readable from TOML, one `[[pass]]` table per pass:

    name = "fold-and-check"          # optional; the file's stem otherwise
    description = "fold every norm"  # optional
    seed = 0                         # optional: the random seed passes get (rotations, sampling)

    [calibration]                    # optional: how much calibration text the passes need
    samples = 0                      # sequences; 0 = no pass needs calibration
    seq_len = 128                    # tokens per sequence

    [[pass]]
    name = "fold_norms"              # a registered pass (`splice passes` lists them)
    untie = true                     # the pass's settings, checked against its fields

Passes are validated when the recipe is made (unknown pass, unknown setting, wrong type: a
one-line PassError, an InputError), so a bad recipe fails before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from splice.passes.infra.base import PassBase, PassError
from splice.passes.infra.registry import make_pass

_TOP_KEYS = ("name", "description", "seed", "calibration", "pass")
_CALIBRATION_KEYS = ("samples", "seq_len")


def _int(value: Any, what: str, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise PassError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named list of passes with their settings.

    `passes` accepts (pass name, settings) pairs or PassBase instances; it is stored as a tuple of
    pass instances (passes keep no per-run state, so they can be reused). `calibration_samples`
    sequences of `calibration_seq_len` tokens are what the calibrated passes expect; `seed` is the
    seed their context gets.
    """

    name: str
    passes: tuple[PassBase, ...] = ()
    description: str = ""
    seed: int = 0
    calibration_samples: int = 0
    calibration_seq_len: int = 128

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise PassError(f"recipe name must be a non-empty string, got {self.name!r}")
        if isinstance(self.passes, (str, bytes)) or not isinstance(self.passes, Sequence):
            raise PassError(f"recipe {self.name!r}: passes must be a list of (name, settings) "
                            f"pairs or pass instances, got {type(self.passes).__name__}")
        object.__setattr__(self, "passes", tuple(
            _as_pass(self.name, i, p) for i, p in enumerate(self.passes)))
        if not isinstance(self.description, str):
            raise PassError(f"recipe {self.name!r}: description must be a string, "
                            f"got {self.description!r}")
        _int(self.seed, f"recipe {self.name!r}: seed", 0)
        _int(self.calibration_samples, f"recipe {self.name!r}: calibration samples", 0)
        _int(self.calibration_seq_len, f"recipe {self.name!r}: calibration seq_len", 1)

    def build(self) -> list[PassBase]:
        """The passes to give a PassManager, in order."""
        return list(self.passes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the artefact's manifest: every pass with all its settings."""
        return {
            "name": self.name,
            "description": self.description,
            "seed": self.seed,
            "calibration": {"samples": self.calibration_samples,
                            "seq_len": self.calibration_seq_len},
            "passes": [{"name": p.name, "settings": _plain(p.settings())} for p in self.passes],
        }

    def to_toml(self) -> str:
        """The recipe as TOML text that `from_toml` reads back to an equal recipe."""
        d = self.to_dict()
        lines = [f"name = {_toml_value(d['name'])}"]
        if self.description:
            lines.append(f"description = {_toml_value(self.description)}")
        lines += [f"seed = {self.seed}", "", "[calibration]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in d["calibration"].items()]
        for p in d["passes"]:
            lines += ["", "[[pass]]", f"name = {_toml_value(p['name'])}"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in p["settings"].items() if v is not None]
        return "\n".join(lines) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, default_name: str = "recipe") -> Recipe:
        """A recipe from the data of a TOML file or of `to_dict()` (passes as {"name", settings...}
        tables, or {"name", "settings"} as to_dict writes them)."""
        if not isinstance(d, Mapping):
            raise PassError(f"recipe must be a table, got {type(d).__name__}")
        unknown = [k for k in d if k not in _TOP_KEYS + ("passes",)]
        if unknown:
            raise PassError(f"recipe: unknown key(s) {', '.join(map(repr, unknown))}; accepted: "
                            f"{', '.join(_TOP_KEYS)}")
        name = d.get("name", default_name)
        calib = d.get("calibration", {})
        if not isinstance(calib, Mapping):
            raise PassError("recipe: [calibration] must be a table with samples and seq_len")
        bad = [k for k in calib if k not in _CALIBRATION_KEYS]
        if bad:
            raise PassError(f"recipe: unknown calibration key(s) {', '.join(map(repr, bad))}; "
                            f"accepted: {', '.join(_CALIBRATION_KEYS)}")
        tables = d.get("pass", d.get("passes", []))
        if not isinstance(tables, list) or not all(isinstance(t, Mapping) for t in tables):
            raise PassError("recipe: passes are [[pass]] tables, each with name = \"<pass>\" and "
                            "its settings")
        passes = []
        for i, t in enumerate(tables):
            if "name" not in t:
                raise PassError(f"recipe {name!r}: [[pass]] number {i + 1} has no name = "
                                "\"<registered pass>\"")
            if set(t) <= {"name", "settings"} and isinstance(t.get("settings", {}), Mapping):
                settings = dict(t.get("settings", {}))  # the to_dict() form
            else:
                settings = {k: v for k, v in t.items() if k != "name"}
            passes.append((t["name"], settings))
        return cls(name=name, passes=tuple(passes), description=d.get("description", ""),
                   seed=d.get("seed", 0), calibration_samples=calib.get("samples", 0),
                   calibration_seq_len=calib.get("seq_len", 128))

    @classmethod
    def from_toml(cls, source: str | Path) -> Recipe:
        """A recipe from a TOML file (a Path, or a str naming a file) or TOML text (a str holding
        a newline or '='). Errors name the file and, for syntax errors, the line."""
        if isinstance(source, Path) or ("\n" not in source and "=" not in source):
            path = Path(source)
            if not path.is_file():
                raise PassError(f"recipe file {str(path)!r} does not exist"
                                + ("" if path.suffix else "; built-in recipes: "
                                   + ", ".join(BUILTIN_RECIPES)))
            try:
                text, where, stem = path.read_text(encoding="utf-8"), str(path), path.stem
            except UnicodeDecodeError as e:
                raise PassError(f"recipe file {str(path)!r} is not UTF-8 text ({e.reason} at byte "
                                f"{e.start}); a recipe is a TOML file") from None
            except OSError as e:
                raise PassError(f"recipe file {str(path)!r} cannot be read ({e.strerror})") from None
        else:
            text, where, stem = source, "recipe text", "recipe"
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise PassError(f"{where}: TOML syntax error: {e}") from None
        try:
            return cls.from_dict(data, default_name=stem)
        except PassError as e:
            raise PassError(f"{where}: {e}") from None

    @classmethod
    def named(cls, name: str) -> Recipe:
        """A built-in recipe: "none" (no passes) or "fold_norms"."""
        factory = BUILTIN_RECIPES.get(name)
        if factory is None:
            raise PassError(f"unknown recipe {name!r}; built-in recipes: "
                            f"{', '.join(BUILTIN_RECIPES)}, or give a .toml file")
        return factory()

    @classmethod
    def resolve(cls, spec: str | Path | Recipe) -> Recipe:
        """What `--recipe FILE|NAME` means: a Recipe as is, a built-in name, or a TOML file."""
        if isinstance(spec, Recipe):
            return spec
        if isinstance(spec, str) and spec in BUILTIN_RECIPES:
            return cls.named(spec)
        if not isinstance(spec, (str, Path)):
            raise PassError(f"a recipe is a Recipe, a built-in name ({', '.join(BUILTIN_RECIPES)}) "
                            f"or a TOML file, got {type(spec).__name__}")
        return cls.from_toml(Path(spec))


def _as_pass(recipe: str, index: int, item: Any) -> PassBase:
    if isinstance(item, PassBase):
        return item
    if isinstance(item, str):
        item = (item, {})
    if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str) \
            and isinstance(item[1], Mapping):
        return make_pass(item[0], item[1])
    raise PassError(f"recipe {recipe!r}: pass {index + 1} is {item!r}; give (pass name, settings "
                    "dict) or a pass instance")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise PassError(f"cannot write {type(v).__name__} {v!r} as a TOML value")


# int4 asymmetric g128 GPTQ with act-order (static groups) and the MSE clip search, and the
# pruning of prune4_mlp_patch: parts of several recipes below
GPTQ_W4 = {"method": "gptq", "bits": 4, "group_size": 128, "symmetric": False, "act_order": True,
           "clip_search": True}
PRUNE4_MLP_PATCH = (
    ("select_layers", {"n": 4}),
    ("estimate_patch", {"kind": "mlp", "mlp_rank": 512, "mlp_steps": 8000}),
    ("prune_layers", {}), ("fuse_patch", {"strategy": "auto"}), ("fold_norms", {}))

BUILTIN_RECIPES: dict[str, Callable[[], Recipe]] = {
    "none": lambda: Recipe("none", (), "no passes: the imported model as is"),
    "fold_norms": lambda: Recipe("fold_norms", (("fold_norms", {}),),
                                 "fold every pre-norm's scale into the following linears (exact)"),
    "rotate": lambda: Recipe("rotate", (("fold_norms", {}), ("rotate", {})),
                             "fold the pre-norms, then QuaRot's Hadamard rotations R1, R2 and R4 "
                             "(exact; Gemma needs absorb_post_norm first, or rotate r1 = false)"),
    # No fold_norms before weight-only quantization: folding the norm scales into the weight
    # columns widens every group holding a channel with a large scale (SmolLM2-135M W4 g128 RTN,
    # 4 WikiText-2 windows: ppl 32.7 unfolded, 50.1 folded; float 23.1), and unties a tied
    # lm_head. Fold when a rotation follows, which spreads those channels out again.
    "w4_rtn": lambda: Recipe("w4_rtn", (("quantize_weights", {
        "method": "rtn", "bits": 4, "group_size": 128}),),
        "int4 weights, groups of 128, round to nearest (no calibration)"),
    # act-order and the clip search: SmolLM2-135M, WikiText-2 27.19 against 30.65 without them
    "w4_gptq": lambda: Recipe("w4_gptq", (("quantize_weights", GPTQ_W4),),
        "int4 asymmetric weights, groups of 128, GPTQ with act-order (static groups) and the MSE "
        "clip search on 128 x 512 calibration tokens",
        calibration_samples=128, calibration_seq_len=512),
    # SmolLM2-135M, WikiText-2: 25.39 against float 22.88 (w4_gptq alone 27.19)
    "w4_gptq_rotate": lambda: Recipe("w4_gptq_rotate", (
        ("fold_norms", {}), ("rotate", {}), ("quantize_weights", GPTQ_W4)),
        "fold norms, QuaRot rotations R1, R2, R4, then int4 asymmetric g128 GPTQ with act-order "
        "(static groups) and the MSE clip search, on 128 x 512 calibration tokens",
        calibration_samples=128, calibration_seq_len=512),
    # R4 is for activations: with weights only quantized it buys little and costs an online
    # Hadamard a step. SmolLM2-135M, WikiText-2: 25.50 (w4_gptq_rotate 25.39); without R4 the
    # pruned pipeline decodes 5-8% faster on ONNX Runtime, 2 cores (benchmarks/onnx_speed.py)
    "w4_gptq_rotate_r12": lambda: Recipe("w4_gptq_rotate_r12", (
        ("fold_norms", {}), ("rotate", {"r4": False}), ("quantize_weights", GPTQ_W4)),
        "fold norms, QuaRot rotations R1 and R2 only (fused into the weights: no online op), "
        "then int4 asymmetric g128 GPTQ with act-order (static groups) and the MSE clip search, "
        "on 128 x 512 calibration tokens",
        calibration_samples=128, calibration_seq_len=512),
    # the same (GPTQ on the first 128 sequences), then the group scales tuned end to end by
    # distillation from the float model, 600 steps of one 512-token sequence out of 224 (~47 min
    # on 2 cores): SmolLM2-135M, WikiText-2 23.89 against float 22.88, +4.4% (w4_gptq_rotate
    # 25.39; 300 steps over 112 sequences 24.06)
    "w4_gptq_rotate_tuned": lambda: Recipe("w4_gptq_rotate_tuned", (
        ("fold_norms", {}), ("rotate", {}),
        ("quantize_weights", {**GPTQ_W4, "hessian_samples": 128, "tune_steps": 600,
                              "tune_lr": 1e-3, "tune_samples": 256, "tune_seq_len": 512})),
        "w4_gptq_rotate, then the int4 group scales tuned end to end (codes fixed) by "
        "distillation from the float model's next-token distribution",
        calibration_samples=256, calibration_seq_len=512),
    "w8": lambda: Recipe("w8", (("quantize_weights", {"method": "rtn", "bits": 8,
                                                      "group_size": 0}),),
                         "int8 weights per output channel, round to nearest"),
    "prune4_patch": lambda: Recipe(
        "prune4_patch",
        (("select_layers", {"n": 4}), ("estimate_patch", {}), ("prune_layers", {}),
         ("fuse_patch", {"strategy": "auto"}), ("fold_norms", {})),
        "prune the 4 least important contiguous layers (cosine), bridge the cut with the better "
        "of LinearPatch and a ridge least-squares patch, then fold norms",
        calibration_samples=16, calibration_seq_len=512),
    # SmolLM2-135M, block [12, 16), WikiText-2: 26.94 (81% of the gap to the dense 22.88 from
    # the pruned 44.11; least squares alone 31.36, distilled 29.38), ~15 min on 2 cores
    "prune4_mlp_patch": lambda: Recipe(
        "prune4_mlp_patch", PRUNE4_MLP_PATCH,
        "prune the 4 least important contiguous layers (cosine), bridge the cut with the "
        "least-squares patch and a gated MLP block (rank 512) trained on the calibration "
        "streams, then fold norms",
        calibration_samples=512, calibration_seq_len=512),
    # the full pipeline: prune4_mlp_patch, rotate, GPTQ W4 g128 on the first 128 sequences, the
    # scales tuned towards the unpruned float model, int8 per-token activations. SmolLM2-135M,
    # WikiText-2: 27.14 against float 22.88 (+18.6%; 29.56 with the scales untuned)
    "prune4_mlp_patch_w4a8": lambda: Recipe(
        "prune4_mlp_patch_w4a8",
        (*PRUNE4_MLP_PATCH, ("rotate", {}),
         ("quantize_weights", {**GPTQ_W4, "hessian_samples": 128, "tune_steps": 300,
                               "tune_lr": 1e-3, "tune_samples": 128, "tune_seq_len": 512,
                               "tune_teacher": "original"}),
         ("quantize_activations", {"mode": "dynamic_per_token", "bits": 8})),
        "prune4_mlp_patch, QuaRot rotations, int4 g128 GPTQ (on 128 of the calibration "
        "sequences) with its scales tuned end to end towards the unpruned float model, then int8 "
        "per-token activations: the whole compression pipeline",
        calibration_samples=512, calibration_seq_len=512),
    # NPU (--target npu): the HTP wants symmetric per-channel weights; the backend quantizes every
    # activation on static calibrated grids (16-bit, or 8-bit when static int8 nodes are present).
    # Norms stay unfolded: the HTP's RmsNorm takes its scale, and folding it into the weights
    # widens their per-channel ranges
    "npu_w8a16": lambda: Recipe("npu_w8a16", (("quantize_weights", {
        "method": "rtn", "bits": 8, "group_size": 0, "symmetric": True}),),
        "NPU: int8 symmetric per-channel weights; the backend adds static 16-bit activations"),
    "npu_w8a8": lambda: Recipe("npu_w8a8", (("quantize_weights", {
        "method": "rtn", "bits": 8, "group_size": 0, "symmetric": True}), (
        "quantize_activations", {"mode": "static_per_tensor", "bits": 8, "symmetric": True})),
        "NPU: int8 per-channel weights, static int8 activations at the linears (calibrated); "
        "the backend puts every other activation on 8-bit grids too",
        calibration_samples=8, calibration_seq_len=256),
    "prune4_patch_rotate": lambda: Recipe(
        "prune4_patch_rotate",
        (("select_layers", {"n": 4}),
         ("estimate_patch", {"kind": "linearpatch", "basis": "r1", "basis_seed": 0}),
         ("prune_layers", {}), ("fuse_patch", {"strategy": "auto"}), ("fold_norms", {}),
         ("rotate", {"seed": 0})),
        "prune 4 layers, bridge the cut with LinearPatch measured in rotate's R1 Hadamard basis, "
        "fold norms and rotate (QuaRot R1, R2, R4), which turns the patch into one channel scale "
        "of d parameters, exactly",
        calibration_samples=16, calibration_seq_len=512),
}
