"""The TVM backend: an ir.Module -> a Relax module (prefill and decode over an in-place KV
cache, lower.py), scheduled for llvm or cuda (schedule.py), built and exported as a shared
library with its parameters in safetensors (build.py, export.py)."""

from .build import TARGETS
from .export import export
from .context import Lowered, LoweringError
from .lower import lower
from .rules import RULES

__all__ = ["RULES", "TARGETS", "Lowered", "LoweringError", "export", "lower"]
