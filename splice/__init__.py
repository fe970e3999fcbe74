"""splice: a compiler for large language models.

The public face: `compile()`, `load()`, `Recipe` and the CLI (`splice ...`). Attributes are
imported lazily so that `import splice.runtime` on an edge device does not pull in torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["compile", "load", "Recipe", "InputError"]


def __getattr__(name: str) -> Any:
    if name == "compile":
        from .api import compile

        return compile
    if name == "load":
        from splice.runtime import load

        return load
    if name == "Recipe":
        from .recipe import Recipe

        return Recipe
    if name == "InputError":
        from .errors import InputError

        return InputError
    raise AttributeError(f"module 'splice' has no attribute {name!r}")
