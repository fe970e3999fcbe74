"""ONNX backend: ir.Module -> ONNX (standard ops, float32) -> an artefact for ONNX Runtime.

`lower` builds the ONNX model from the op table in rules.py, `save` writes it with external
weights, `export` writes the whole artefact (model, tokenizer, manifest) atomically.
"""

from .export import export
from .lower import OPSET, LoweringContext, LoweringError, lower, save
from .rules import RULES

__all__ = ["OPSET", "LoweringContext", "LoweringError", "RULES", "export", "lower", "save"]
