"""ONNX backend: ir.Module -> ONNX (float32; standard ops or ONNX Runtime contrib ops) -> an artefact.

`lower` builds the ONNX model from an op table (rules.py's standard one, or `rule_table("contrib")`
with ONNX Runtime's fused ops, contrib.py, the default for export), `save` writes it with external
weights, `export` writes the whole artefact (model, tokenizer, manifest) atomically.
"""

from .contrib import OPS_MODES, rule_table
from .export import export
from .context import LoweringContext, LoweringError
from .lower import OPSET, lower, save
from .rules import RULES

__all__ = ["OPSET", "OPS_MODES", "LoweringContext", "LoweringError", "RULES", "export", "lower",
           "rule_table", "save"]
