"""The `hadamard` op's ONNX lowering strategies, timed: what backends/onnx/hadamard.py's size rule
is based on.

A graph holding only the op, x of shape [1, tokens, width] float32, ONNX Runtime's CPU provider
with all graph optimisations, one intra-op thread (the op is small: a second thread only adds its
dispatch); each figure is the fastest of `rounds` batches of calls, in microseconds a call. Every
strategy runs on every width here (the dense MatMul only up to 4096: its matrix is width^2 floats).

    python -m benchmarks.hadamard           # the table in hadamard.py's docstring
"""

from __future__ import annotations

import numpy as np

from benchmarks.memory_limits import time_call

WIDTHS = (16, 64, 128, 256, 576, 1024, 1536, 2048, 4096, 11008)
TOKENS = (1, 64)
DENSE_LIMIT = 4096


def _session(width: int, strategy: str):
    import onnx_ir as ir
    import onnxruntime as ort

    from splice.backends.onnx import RULES, lower
    from splice.backends.onnx.hadamard import with_hadamard
    from splice.ir import Graph, ModelConfig, Module, emit

    g = Graph()
    x = g.add_input("x", "f32", ("batch", "seq", width))
    g.outputs = [emit(g, "hadamard", [x], {"size": width}, name="y", role="rot").output]
    module = Module(g, {}, ModelConfig("hadamard", 1, width, 0, 1, 1, 1, 1, 1))
    model = lower(module, rules=with_hadamard(RULES, strategy))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def run(quick: bool = False) -> tuple[str, dict]:
    from splice.backends.onnx.hadamard import STRATEGIES, choose_strategy

    widths = (16, 576, 1536) if quick else WIDTHS
    calls, rounds = (5, 2) if quick else (60, 7)
    rng = np.random.default_rng(0)
    rows = []
    for width in widths:
        for tokens in TOKENS:
            x = rng.standard_normal((1, tokens, width), dtype=np.float32)
            us = {s: (None if s == "matmul" and width > DENSE_LIMIT
                      else 1e6 * time_call(_session(width, s), {"x": x}, calls, rounds))
                  for s in STRATEGIES}
            rows.append({"width": width, "tokens": tokens, "us": us,
                         "chosen": choose_strategy(width)})
    lines = ["## Hadamard lowering strategies (ONNX Runtime CPU, 1 thread)", "",
             "Microseconds a call, x of shape [1, tokens, width] float32; the fastest of "
             f"{rounds} batches of {calls} calls. `chosen`: what the size rule picks.", "",
             "| width | tokens | " + " | ".join(STRATEGIES) + " | chosen |",
             "| --- | --- | " + " | ".join("---" for _ in STRATEGIES) + " | --- |"]
    for r in rows:
        cells = ["-" if r["us"][s] is None else f"{r['us'][s]:.1f}" for s in STRATEGIES]
        lines.append(f"| {r['width']} | {r['tokens']} | " + " | ".join(cells)
                     + f" | {r['chosen']} |")
    return "\n".join(lines) + "\n", {"rows": rows}


if __name__ == "__main__":
    print(run()[0])
