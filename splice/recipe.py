"""Recipes: which passes run, in which order, with which settings.

A Recipe is a frozen dataclass; it is also readable from TOML, one `[[pass]]` table per pass:

    name = "fold-and-check"          # optional; the file's stem otherwise
    description = "fold every norm"  # optional
    seed = 0                         # optional: the random seed passes get (rotations, sampling)

    [calibration]                    # optional: how much calibration text the passes need
    samples = 0                      # sequences; 0 = no pass needs calibration
    seq_len = 128                    # tokens per sequence
    precision = "float64"            # the calibration forward passes' dtype: float64 | float32

    [[pass]]
    name = "fold_norms"              # a registered pass (`splice passes` lists them)
    untie = true                     # the pass's settings, checked against its fields

A `[preset]` table (target, goal, measured figures: splice/presets.py) is read by `splice presets`
and ignored by the recipe itself, so a preset printed with `splice presets show` and edited is a
recipe file as it stands. The built-in recipes, presets included, are TOML files in the package
(splice/recipes/); `Recipe.named` reads them.

Passes are validated when the recipe is made (unknown pass, unknown setting, wrong type: a
one-line PassError, an InputError), so a bad recipe fails before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import tomllib
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from splice.passes.infra.base import PassBase, PassError
from splice.passes.infra.registry import make_pass

_TOP_KEYS = ("name", "description", "seed", "calibration", "pass", "preset")
_CALIBRATION_KEYS = ("samples", "seq_len", "precision")
PRECISIONS = ("float64", "float32")


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
    seed their context gets; `calibration_precision` the dtype the calibrated passes run their
    forward passes in (float64, the default, or float32: about twice as fast on a CPU; the
    solvers and least-squares fits stay in float64 either way).
    """

    name: str
    passes: tuple[PassBase, ...] = ()
    description: str = ""
    seed: int = 0
    calibration_samples: int = 0
    calibration_seq_len: int = 128
    calibration_precision: str = "float64"

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
        if self.calibration_precision not in PRECISIONS:
            raise PassError(f"recipe {self.name!r}: calibration precision "
                            f"{self.calibration_precision!r}; accepted: {', '.join(PRECISIONS)}")

    @property
    def precision(self) -> torch.dtype:
        """The calibration forward passes' torch dtype (PassContext.precision)."""
        return getattr(torch, self.calibration_precision)

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
                            "seq_len": self.calibration_seq_len,
                            "precision": self.calibration_precision},
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
            raise PassError("recipe: [calibration] must be a table with samples, seq_len and "
                            "precision")
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
                   calibration_seq_len=calib.get("seq_len", 128),
                   calibration_precision=calib.get("precision", "float64"))

    @classmethod
    def from_toml(cls, source: str | Path) -> Recipe:
        """A recipe from a TOML file (a Path, or a str naming a file) or TOML text (a str holding
        a newline or '='). Errors name the file and, for syntax errors, the line."""
        if isinstance(source, Path) or ("\n" not in source and "=" not in source):
            path = Path(source)
            if not path.is_file():
                raise PassError(f"recipe file {str(path)!r} does not exist"
                                + ("" if path.suffix else "; built-in recipes: "
                                   + ", ".join(builtin_names())))
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
        """A built-in recipe (`builtin_names()`: "none", "fold_norms", the presets "fastest",
        "balanced", "closest_to_float", ...), read from its TOML file in the package."""
        text = builtin_text(name)
        try:
            return cls.from_dict(tomllib.loads(text), default_name=name)
        except (PassError, tomllib.TOMLDecodeError) as e:  # a shipped file: a bug, not bad input
            raise RuntimeError(f"built-in recipe {name!r} is broken: {e}") from e

    @classmethod
    def resolve(cls, spec: str | Path | Recipe) -> Recipe:
        """What `--recipe FILE|NAME` means: a Recipe as is, a built-in name, or a TOML file."""
        if isinstance(spec, Recipe):
            return spec
        if isinstance(spec, str) and spec in builtin_names():
            return cls.named(spec)
        if not isinstance(spec, (str, Path)):
            raise PassError(f"a recipe is a Recipe, a built-in name ({', '.join(builtin_names())}) "
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


# int4 asymmetric g128 GPTQ with act-order (static groups) and the MSE clip search: the settings
# of the w4_gptq recipe, for code that builds its own pass lists (benchmarks)
GPTQ_W4 = {"method": "gptq", "bits": 4, "group_size": 128, "symmetric": False, "act_order": True,
           "clip_search": True}


def _recipes_dir():
    """The built-in recipes: TOML files shipped in the package (splice/recipes/*.toml)."""
    return resources.files("splice") / "recipes"


@functools.cache
def builtin_names() -> tuple[str, ...]:
    """The built-in recipe names (the stems of the shipped TOML files), sorted."""
    return tuple(sorted(f.name[:-5] for f in _recipes_dir().iterdir()
                        if f.name.endswith(".toml")))


def builtin_text(name: str) -> str:
    """The shipped TOML text of a built-in recipe, comments included (what `splice presets show`
    prints to edit)."""
    if name not in builtin_names():
        raise PassError(f"unknown recipe {name!r}; built-in recipes: {', '.join(builtin_names())}, "
                        "or give a .toml file")
    return (_recipes_dir() / f"{name}.toml").read_text(encoding="utf-8")
