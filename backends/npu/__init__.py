"""NPU backend: ir.Module -> static-shape QDQ ONNX graphs for Qualcomm's HTP (ONNX Runtime's QNN
execution provider), checked before they run and compiled ahead of time into EPContext models.

`lower_static` builds the static float graphs (lower.py), `calibrate` / `quantize_graph` make them
QDQ (qdq.py), `preflight.check` lists what the HTP will not take, `export` writes the artefact.
"""

from .export import TARGETS, export
from .lower import StaticShapes, lower_static, npu_rules
from .preflight import Issue, PreflightError, Report, check
from .qdq import calibrate, quantize_graph

__all__ = ["TARGETS", "Issue", "PreflightError", "Report", "StaticShapes", "calibrate", "check",
           "export", "lower_static", "npu_rules", "quantize_graph"]
