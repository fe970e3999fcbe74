"""The pass registry: pass classes by name, and settings checked against each pass's dataclass fields.

Recipes and the CLI name passes by string, so the registry is where a typo or a mistyped setting
becomes a clear PassError (an InputError: the CLI exits 2) instead of a TypeError deep in a pass.
Pass modules register themselves with `@register_pass`. The built-in passes are the explicit
imports of splice/passes/__init__.py (passes/__init__.py in the tree), which Python runs before this
module can be imported, so every built-in pass is registered by the time anyone looks one up; there
is no directory scan, and asking for a pass imports the passes and their numerics, nothing more.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .base import PassBase, PassError


PASSES: dict[str, type[PassBase]] = {}

P = typing.TypeVar("P", bound=type[PassBase])


def register_pass(cls: P) -> P:
    """Class decorator: register a PassBase subclass under its `name`."""
    if not (isinstance(cls, type) and issubclass(cls, PassBase)):
        raise TypeError(f"register_pass: {cls!r} is not a PassBase subclass")
    params = getattr(cls, "__dataclass_params__", None)
    if not dataclasses.is_dataclass(cls) or params is None or not params.frozen:
        raise TypeError(f"register_pass: {cls.__name__} must be a frozen dataclass (its settings)")
    name = cls.__dict__.get("name", "")
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_pass: {cls.__name__} must set a class attribute `name`")
    if any(f.name == "name" for f in dataclasses.fields(cls)):
        raise TypeError(f"register_pass: {cls.__name__} has a setting called 'name', which recipes "
                        "use for the pass name")
    other = PASSES.get(name)
    # the same class defined again (a module reloaded) replaces itself; another class may not
    same = other is not None and (other.__module__, other.__qualname__) == (cls.__module__,
                                                                          cls.__qualname__)
    if other is not None and not same:
        raise TypeError(f"register_pass: pass name {name!r} is taken by "
                        f"{other.__module__}.{other.__qualname__}")
    PASSES[name] = cls
    return cls


def registered() -> dict[str, type[PassBase]]:
    """Every registered pass class by name: the built-in passes and any registered since."""
    return dict(sorted(PASSES.items()))


def get_pass(name: str) -> type[PassBase]:
    """The pass class registered as `name`; an unknown name raises listing the registered ones."""
    passes = registered()
    if not isinstance(name, str) or name not in passes:
        raise PassError(f"unknown pass {name!r}; registered passes: {', '.join(passes) or '(none)'}")
    return passes[name]


# -- settings ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting of a pass: its name, type annotation, default (or `required`) and type text."""

    name: str
    type: Any
    default: Any
    required: bool

    @property
    def type_name(self) -> str:
        return type_name(self.type)


def pass_settings(cls: type[PassBase]) -> list[Setting]:
    """The settings of a pass class: its init fields, with resolved type annotations."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default, required = f.default, False
        elif f.default_factory is not dataclasses.MISSING:
            default, required = f.default_factory(), False
        else:
            default, required = None, True
        out.append(Setting(f.name, hints.get(f.name, Any), default, required))
    return out


def type_name(tp: Any) -> str:
    """A short readable form of a type annotation: `int`, `float | None`, `tuple[int, ...]`."""
    if tp is Any:
        return "any"
    if tp is type(None):
        return "None"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    """Internal: a value does not fit a type (caught and turned into a PassError)."""


def coerce(value: Any, tp: Any) -> Any:
    """`value` checked against annotation `tp`, converted where lossless and expected (an int
    where a float is wanted, a list where a tuple is, a str where a Path is); raises _Mismatch."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for a in args:
            try:
                return coerce(value, a)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is typing.Literal:
        # True == 1, so a bool must not pass for an int literal (nor 1 for True)
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _Mismatch
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0]) for v in value)
        if args and len(args) != len(value):
            raise _Mismatch
        return tuple(coerce(v, a) for v, a in zip(value, args)) if args else tuple(value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return [coerce(v, args[0]) for v in value] if args else list(value)
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch
        if not args:
            return dict(value)
        return {coerce(k, args[0]): coerce(v, args[1]) for k, v in value.items()}
    check = origin or tp
    if isinstance(check, type) and isinstance(value, check):
        return value
    raise _Mismatch


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_settings(cls: type[PassBase], settings: Mapping[str, Any]) -> dict[str, Any]:
    """`settings` validated against the pass's fields: unknown names, missing required settings
    and wrong types raise PassError naming the setting, the accepted names or the expected type."""
    name = cls.name
    if not isinstance(settings, Mapping):
        raise PassError(f"pass {name!r}: settings must be a table of name = value, "
                        f"got {type(settings).__name__}")
    spec = {s.name: s for s in pass_settings(cls)}
    unknown = [k for k in settings if k not in spec]
    if unknown:
        accepted = ", ".join(spec) if spec else "none (this pass has no settings)"
        raise PassError(f"pass {name!r}: unknown setting{'s' if len(unknown) > 1 else ''} "
                        f"{', '.join(repr(k) for k in unknown)}; accepted: {accepted}")
    missing = [s.name for s in spec.values() if s.required and s.name not in settings]
    if missing:
        raise PassError(f"pass {name!r}: missing required setting(s) {', '.join(missing)}")
    out = {}
    for key, value in settings.items():
        s = spec[key]
        try:
            out[key] = coerce(value, s.type)
        except _Mismatch:
            raise PassError(f"pass {name!r}: setting {key!r} expects {s.type_name}, got "
                            f"{type(value).__name__} {_show(value)}") from None
    return out


def make_pass(name: str, settings: Mapping[str, Any] | None = None) -> PassBase:
    """An instance of the pass registered as `name`, with validated `settings`."""
    cls = get_pass(name)
    return cls(**check_settings(cls, settings or {}))


# -- descriptions ------------------------------------------------------------------------------

def _first_paragraph(cls: type) -> str:
    doc = cls.__dict__.get("__doc__") or ""
    # a dataclass without a docstring gets its signature as __doc__; fall back to the module's
    if not doc or doc.startswith(cls.__name__ + "("):
        module = inspect.getmodule(cls)
        doc = (module.__doc__ or "") if module is not None else ""
    doc = inspect.cleandoc(doc)
    para = doc.split("\n\n", 1)[0]
    return " ".join(para.split())


def describe_passes() -> str:
    """Every registered pass: name, whether it is exact, the first paragraph of its docstring and
    its settings (name, type, default). What `splice passes` prints."""
    blocks = []
    for name, cls in registered().items():
        kind = "exact" if cls.exact is True else "lossy" if cls.exact is False else "exact per settings"
        lines = [f"{name} ({kind})"]
        summary = _first_paragraph(cls)
        if summary:
            lines.append(f"    {summary}")
        settings = pass_settings(cls)
        if settings:
            lines.append("    settings:")
            for s in settings:
                default = "required" if s.required else f"= {s.default!r}"
                lines.append(f"      {s.name}: {s.type_name} {default}")
        else:
            lines.append("    settings: none")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n" if blocks else "(no passes registered)\n"
