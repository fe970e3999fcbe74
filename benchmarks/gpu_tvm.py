"""TVM cuda figures for SmolLM2-135M int4 on an NVIDIA GPU: decode tokens/s at batch 1 and 16,
with compile time and the device's name (the issue's GPU benchmark). Run it on a machine with a
GPU and a CUDA toolkit (nvcc on PATH, which TVM uses to compile the kernels):

    python -m benchmarks.gpu_tvm [--out gpu_tvm.md] [--json gpu_tvm.json]

Protocol: the CPU benchmark's int4 graph (RTN, 4-bit, groups of 32, lm_head kept float32), built
for the GPU's architecture with dlight's GPU rules (schedule.py); a 64-token prompt of real text,
copied over the batch, then 128 greedy steps without stopping at EOS; decode tokens/s counts
batch x steps over the decode time, best of REPEATS runs. ONNX Runtime's CUDA provider on the
same int4 graph is measured beside it where onnxruntime has that provider. Without a GPU the
script says so and exits with status 2 (the test suite only checks that the cuda library builds:
tests/backends/test_tvm.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.tvm_bench import _prompt

BATCHES = (1, 16)
PROMPT, STEPS, REPEATS = 64, 128, 3


def _decode_speed(art, ids: list[int], batch: int) -> dict:
    """Prefill the prompt for `batch` rows, then STEPS greedy steps: tokens/s of each phase."""
    rows = np.asarray([ids] * batch, np.int64)
    best = {"prefill_tok_s": 0.0, "decode_tok_s": 0.0}
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        logits, cache = art.logits(rows)  # returns host logits: the step is synchronised
        t1 = time.perf_counter()
        tok = logits[:, -1].argmax(-1)[:, None]
        for _ in range(STEPS):
            logits, cache = art.logits(tok, cache)
            tok = logits[:, -1].argmax(-1)[:, None]
        t2 = time.perf_counter()
        best["prefill_tok_s"] = max(best["prefill_tok_s"], batch * len(ids) / (t1 - t0))
        best["decode_tok_s"] = max(best["decode_tok_s"], batch * STEPS / (t2 - t1))
    return best


def run() -> tuple[str, dict]:
    import tvm

    from splice.backends.tvm import export
    from splice.frontend import load_model
    from splice.passes.infra.base import PassContext
    from splice.passes.quantize_weights import QuantizeWeightsPass
    from splice.runtime import load

    dev = tvm.cuda(0)
    if not dev.exist:
        raise SystemExit(2)
    major, minor = dev.compute_version.split(".")
    res: dict = {"device": dev.device_name, "arch": f"sm_{major}{minor}", "speed": {}}
    module = load_model("smollm2-135m")
    int4 = QuantizeWeightsPass(bits=4, group_size=32).call(module, PassContext()).module
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = export(int4, Path(tmp) / "tvm_cuda", target="cuda", cuda_arch=res["arch"])
        res["compile_s"] = time.perf_counter() - t0
        art = load(path)
        ids = _prompt(art, PROMPT)
        art.logits(np.asarray([ids[:8]]))  # warm-up (module load, first launches)
        for batch in BATCHES:
            res["speed"][f"TVM cuda int4, batch {batch}"] = _decode_speed(art, ids, batch)
        res["onnx_cuda"] = _onnx_cuda(int4, Path(tmp) / "onnx_cuda", ids, res)
    return markdown(res), res


def _onnx_cuda(int4, out: Path, ids: list[int], res: dict) -> str:
    """ONNX Runtime's CUDA provider on the same graph, where onnxruntime has it."""
    import onnxruntime as ort

    from splice.backends.onnx import export as export_onnx
    from splice.runtime import load

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider here (pip install onnxruntime-gpu)"
    art = load(export_onnx(int4, out, target="cuda"))
    art.logits(np.asarray([ids[:8]]))
    for batch in BATCHES:
        res["speed"][f"ONNX Runtime CUDA int4, batch {batch}"] = _decode_speed(art, ids, batch)
    return "measured"


def markdown(res: dict) -> str:
    lines = [f"## TVM cuda: SmolLM2-135M int4 on {res['device']} ({res['arch']})", "",
             f"Prompt {PROMPT} tokens copied over the batch, {STEPS} greedy steps, best of "
             f"{REPEATS}; compile {res['compile_s']:.1f} s, tuning none (dlight rules).", "",
             "| engine | prefill tok/s | decode tok/s |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v['prefill_tok_s']:.0f} | {v['decode_tok_s']:.0f} |"
              for k, v in res["speed"].items()]
    if res.get("onnx_cuda") != "measured":
        lines += ["", f"ONNX Runtime CUDA: not measured ({res.get('onnx_cuda')})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_tvm")
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    ap.add_argument("--json", default=None, help="also write the raw figures as JSON")
    a = ap.parse_args(argv)
    try:
        text, res = run()
    except SystemExit:
        print("no CUDA GPU visible to TVM (tvm.cuda(0) does not exist); nothing measured",
              file=sys.stderr)
        return 2
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
