"""Pass-level debugging: see, check and bisect every pass and every lowering.

- `debug_run` + `write_report`: a recipe run with every instrument on, written as one
  self-contained HTML report (report.py) and the same data as JSON (`splice debug`);
- `bisect`: the first pass, then the first layer inside it, at which a metric crosses a
  tolerance (`splice bisect`);
- `check_lowering`: the first IR value the ONNX lowering gets wrong (`splice debug
  --check-lowering`);
- `activation_stats`: per-layer activation statistics on calibration text (`splice inspect
  --calib`).

Names are imported lazily, as in the top-level package: the CLI imports splice.debug.commands
for its argument declarations on every start, and that must not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "BisectResult": "bisect", "bisect": "bisect", "splice_layers": "bisect",
    "draw_graph": "graph_svg",
    "LoweringCheckResult": "lowering_check", "ValueCheck": "lowering_check",
    "check_lowering": "lowering_check",
    "render": "report", "write_report": "report",
    "activation_stats": "stats", "format_stats": "stats",
    "calibration_windows": "tokens", "pinned_batch": "tokens",
    "debug_run": "trace",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'splice.debug' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
