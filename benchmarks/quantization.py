"""Weight quantization: WikiText-2 perplexity, artefact size and int4 decode speed of the ONNX
artefacts for float32, W8 per-channel RTN, W4 g128 RTN and GPTQ (the recipes w8, w4_rtn, w4_gptq),
the same W4 g128 after fold_norms, W4 per-channel, and W4 g32 (integer and float zero points).

- SmolLM2-135M (full mode): perplexity on the first 16,384 tokens of wikitext2_test.txt in
  1024-token windows, through the artefact's runtime (ONNX Runtime, 2 threads). SmolLM2's
  published weights were Q4_1 with groups of 32: its float32 weights already lie on a 4-bit
  min-max grid per 32 inputs, which W4 g32 with float zero points rebuilds exactly (lossless by
  construction, so that row says nothing about the method).
- GPTQ calibration: 128 x 512 tokens of wikitext2_valid_tokenized.txt (the issue's figure),
  activations in float32 (`PassContext.precision`; the solver stays float64). It runs in a child
  process so that its wall time and peak resident memory are its own (the model included).
- MatMulNBits accuracy_level: the first GPTQ artefact (level 4, int8 compute, the backend's
  default) is also run with level 0 (float32 compute): perplexity, logit differences and top-1
  agreement on the first window, decode speed of both.
- Decode: 64-token prompt, 128 greedy tokens (`Artefact.generate_ids`), 2 threads, best of three
  after a warm-up (the machine is shared with other jobs: compare rows, not absolutes).
- stories260K (quick mode): the same rows at toy sizes on TinyStories (evaluation: the first half
  of tinystories_val.txt, calibration: the second half) with groups of 32. Seconds; it checks
  that the benchmark runs.

    python -m benchmarks.quantization [--quick] [--json FILE] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
STORIES = SHARED / "models" / "stories260K" / "stories260K.bin"
WIKI_CALIB = SHARED / "data" / "wikitext2_valid_tokenized.txt"
WIKI_TEST = SHARED / "data" / "wikitext2_test.txt"
TINYSTORIES = SHARED / "data" / "tinystories_val.txt"


def _setup(quick: bool) -> dict[str, Any]:
    if quick:
        text = TINYSTORIES.read_text()
        half = len(text) // 2
        return {"model": str(STORIES), "name": "stories260K", "eval_text": text[:half],
                "calib_text": text[half:], "eval_tokens": 2048, "window": 255, "bos": True,
                "calib": (8, 128), "group": 32, "prompt": 32, "new": 32}
    return {"model": "smollm2-135m", "name": "SmolLM2-135M", "eval_text": WIKI_TEST.read_text(),
            "calib_text": WIKI_CALIB.read_text(), "eval_tokens": 16384, "window": 1024,
            "bos": False, "calib": (128, 512), "group": 128, "prompt": 64, "new": 128}


def _configs(group: int, quick: bool) -> list[tuple[str, list[tuple[str, dict]]]]:
    """(label, passes): the recipes w8, w4_rtn and w4_gptq, the same with fold_norms first (what
    it costs), per-channel groups, and groups of 32 (SmolLM2's own Q4_1 grid)."""
    q = "quantize_weights"
    w4 = {"bits": 4, "group_size": group}
    fz = {"method": "rtn", "bits": 4, "group_size": 32, "float_zero_points": True}
    return [
        ("float32", []),
        ("W8 per-channel RTN", [(q, {"method": "rtn", "bits": 8, "group_size": 0})]),
        (f"W4 g{group} RTN", [(q, {"method": "rtn", **w4})]),
        (f"W4 g{group} GPTQ", [(q, {"method": "gptq", **w4})]),
        (f"W4 g{group} RTN after fold_norms", [("fold_norms", {}), (q, {"method": "rtn", **w4})]),
        *([] if quick else [(f"W4 g{group} GPTQ after fold_norms",
                             [("fold_norms", {}), (q, {"method": "gptq", **w4})])]),
        ("W4 per-channel RTN", [(q, {"method": "rtn", "bits": 4, "group_size": 0})]),
        *([] if group == 32 else [("W4 g32 RTN", [(q, {"method": "rtn", "bits": 4,
                                                        "group_size": 32})])]),
        ("W4 g32 RTN float-zero", [(q, fz)]),
        ("W4 g32 float-zero + int8 tied table", [(q, {**fz, "embeddings": "int8",
                                                      "lm_head": "int8"})]),
    ]


def _calibration(module, text: str, samples: int, seq: int) -> torch.Tensor:
    from splice.text import encode_text

    ids = encode_text(module, text)[: samples * seq]
    if len(ids) < samples * seq:
        raise RuntimeError(f"calibration text has {len(ids)} tokens, fewer than {samples}x{seq}")
    return torch.tensor(ids, dtype=torch.int64).reshape(samples, seq)


def compile_variant(model: str, passes: list[tuple[str, dict]], out: Path, calib_text: str | None,
                    samples: int, seq: int, level0: Path | None = None) -> dict[str, Any]:
    """Import, run `passes` (float32 calibration activations), export to `out`; the pass reports.
    With `level0`, also write the same model with MatMulNBits at accuracy_level 0 there."""
    from splice.backends.onnx import RULES, export, lower, save
    from splice.backends.onnx.quant import qlinear_rules
    from splice.frontend import load_model
    from splice.passes.base import PassContext
    from splice.passes.manager import PassManager
    from splice.passes.registry import make_pass

    module = load_model(model)
    calib = _calibration(module, calib_text, samples, seq) if calib_text else None
    ctx = PassContext(calibration=calib, precision=torch.float32)
    t0 = time.perf_counter()
    module, report = PassManager([make_pass(n, s) for n, s in passes]).run(module, ctx)
    passes_s = time.perf_counter() - t0
    export(module, out, report={"passes": report})
    if level0 is not None:
        save(lower(module, rules={**RULES, **qlinear_rules(0)}), level0)
    return {"passes_s": passes_s, "report": report}


def _child_compile(model: str, passes: list, out: Path, calib_text: str, samples: int,
                   seq: int, level0: Path | None) -> dict[str, Any]:
    """compile_variant in a child process: its own wall time and peak RSS."""
    text_file = out.parent / (out.name + ".calib.txt")
    text_file.write_text(calib_text)
    spec = json.dumps({"model": model, "passes": passes, "out": str(out), "calib": str(text_file),
                       "samples": samples, "seq": seq,
                       "level0": str(level0) if level0 else None})
    t0 = time.perf_counter()
    log = out.parent / (out.name + ".log")  # progress, readable while it runs
    with open(log, "w") as err:
        r = subprocess.run([sys.executable, "-m", "benchmarks.quantization", "--child", spec],
                           stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO)
    if r.returncode != 0:
        raise RuntimeError(f"GPTQ compile failed:\n{log.read_text()[-4000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.perf_counter() - t0
    return res


def _session(path: Path, threads: int = 2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _evaluate(art, ids: list[int], window: int, bos: int | None) -> dict[str, float]:
    from splice.evaluate import perplexity

    def logits_fn(x: np.ndarray) -> np.ndarray:
        return art.logits(x)[0]

    t0 = time.perf_counter()
    res = perplexity(logits_fn, ids, window=window, bos=bos)
    return {"ppl": res["ppl"], "eval_s": time.perf_counter() - t0}


def _decode(art, prompt: list[int], new: int, repeats: int = 3) -> dict[str, float]:
    """Best of `repeats` runs after a warm-up: the machine is shared, the best run is the one
    least disturbed."""
    art.generate_ids(prompt[:8], max_new_tokens=4, stop_at_eos=False)  # warm-up
    gens = [art.generate_ids(prompt, max_new_tokens=new, stop_at_eos=False)
            for _ in range(repeats)]
    return {"prefill_tok_s": max(g.prefill_tok_s for g in gens),
            "decode_tok_s": max(g.decode_tok_s for g in gens)}


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("model.onnx*")) / 1e6


def run(quick: bool = False, workdir: str | Path | None = None) -> tuple[str, dict]:
    """The tables and figures; artefacts go to a temporary directory, or `workdir` (kept, with
    the GPTQ child's progress log) when given."""
    from splice.runtime import load
    from splice.runtime.artefact import Artefact

    torch.set_num_threads(2)
    cfg = _setup(quick)
    samples, seq = cfg["calib"]
    res: dict[str, Any] = {"model": cfg["name"], "rows": {}, "calibration": f"{samples}x{seq}"}
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(workdir or scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        for i, (label, passes) in enumerate(_configs(cfg["group"], quick)):
            out = tmp / f"v{i}"
            gptq = any(s.get("method") == "gptq" for _, s in passes)
            first_gptq = gptq and "accuracy_level" not in res
            level0 = tmp / f"v{i}.level0"
            if gptq:
                child = _child_compile(cfg["model"], passes, out, cfg["calib_text"], samples, seq,
                                       level0 if first_gptq else None)
            else:
                child = compile_variant(cfg["model"], passes, out, None, samples, seq)
            art = load(out, threads=2)
            if i == 0:
                ids = art.tokenizer.encode(cfg["eval_text"])[: cfg["eval_tokens"]]
                bos = art.config.get("bos_token_id") if cfg["bos"] else None
                prompt = art.tokenizer.encode(cfg["eval_text"][20000:40000])[: cfg["prompt"]]
            row = {**_evaluate(art, ids, cfg["window"], bos), "size_mb": _size_mb(out),
                   "passes_s": child["passes_s"]}
            if label == "float32" or "W4" in label:
                row.update(_decode(art, prompt, cfg["new"]))
            q = next((r for r in child["report"] if r["name"] == "quantize_weights"), None)
            if q is not None:
                rep = q["report"]
                row["mean_rel_error"] = rep.get("mean_rel_error")
                row["mean_rtn_rel_error"] = rep.get("mean_rtn_rel_error")
                row["warnings"] = rep.get("warnings", [])
            if gptq:
                row["gptq_wall_s"], row["gptq_peak_rss_mb"] = child["wall_s"], child["peak_rss_mb"]
                res.setdefault("gptq_layers", {})[label] = q["report"]["layers"]
            if first_gptq:
                art0 = Artefact(art.path, art.manifest, _session(level0 / "model.onnx"))
                window = np.asarray([([bos] if bos is not None else []) + ids[: cfg["window"]]])
                l4, l0 = art.logits(window)[0], art0.logits(window)[0]
                diff = np.abs(l4 - l0)
                res["accuracy_level"] = {
                    "level 4 (int8 compute)": {"ppl": row["ppl"],
                                               "decode_tok_s": row["decode_tok_s"]},
                    "level 0 (float32 compute)": {**_evaluate(art0, ids, cfg["window"], bos),
                                                  **_decode(art0, prompt, cfg["new"])},
                    "max_abs_logit_diff": float(diff.max()),
                    "mean_abs_logit_diff": float(diff.mean()),
                    "max_abs_logit": float(np.abs(l0).max()),
                    "top1_agreement": float((l4.argmax(-1) == l0.argmax(-1)).mean())}
            res["rows"][label] = row
    return markdown(res, cfg), res


def markdown(res: dict, cfg: dict) -> str:
    rows = res["rows"]
    base = rows["float32"]["ppl"]
    lines = [f"## Weight quantization: {res['model']}", "",
             f"Perplexity: first {cfg['eval_tokens']} tokens of "
             f"{'wikitext2_test.txt' if not cfg['bos'] else 'tinystories_val.txt (first half)'}, "
             f"{cfg['window']}-token windows, ONNX artefacts (MatMulNBits accuracy_level 4). "
             f"GPTQ calibration: {res['calibration']} tokens. Decode: {cfg['prompt']}-token "
             f"prompt, {cfg['new']} greedy tokens, 2 threads, best of 3 (a shared machine).", "",
             "| variant | ppl | vs float32 | model MB | quantize s | layer out. error | "
             "decode tok/s |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, r in rows.items():
        err = r.get("mean_rel_error")
        err = f"{err:.4f}" if err is not None else "-"
        dec = f"{r['decode_tok_s']:.1f}" if "decode_tok_s" in r else "-"
        lines.append(f"| {label} | {r['ppl']:.3f} | {r['ppl'] / base - 1:+.2%} | "
                     f"{r['size_mb']:.1f} | {r['passes_s']:.1f} | {err} | {dec} |")
    for label, g in rows.items():
        if "gptq_wall_s" not in g:
            continue
        lines += ["", f"{label}: {g['gptq_wall_s']:.0f} s wall in a child process (import, "
                  f"passes, export), passes {g['passes_s']:.0f} s, peak RSS "
                  f"{g['gptq_peak_rss_mb']:.0f} MB. Mean relative output error per linear on the "
                  f"calibration inputs: GPTQ {g['mean_rel_error']:.4f}, RTN on the same inputs "
                  f"{g['mean_rtn_rel_error']:.4f}."]
        if g.get("warnings"):
            lines.append("Warnings: " + "; ".join(g["warnings"]))
    if "accuracy_level" in res:
        acc = res["accuracy_level"]
        lines += ["", "MatMulNBits accuracy_level on the GPTQ artefact; level 4 vs 0 on the first "
                  f"window: max |logit diff| {acc['max_abs_logit_diff']:.3g} (mean "
                  f"{acc['mean_abs_logit_diff']:.3g}; max |logit| {acc['max_abs_logit']:.3g}), "
                  f"top-1 agreement {acc['top1_agreement']:.1%}:",
                  "", "| accuracy_level | ppl | decode tok/s |", "| --- | --- | --- |"]
        for k in ("level 4 (int8 compute)", "level 0 (float32 compute)"):
            lines.append(f"| {k} | {acc[k]['ppl']:.3f} | {acc[k]['decode_tok_s']:.1f} |")
    lines += ["", "Rows without fold_norms quantize the imported weights; fold_norms first "
              "(the norm scales multiplied into the weight columns) widens the groups that hold "
              "a channel with a large scale, and unties a tied lm_head (two float "
              "vocab x hidden tables in the artefact). The last row shares one int8 table "
              "between the embedding and the lm_head."]
    if not cfg["bos"]:
        lines += ["", "SmolLM2-135M's published weights are Q4_1 (w = d * q + m per group of 32): "
                  "W4 g32 with float zero points rebuilds that grid, so it is lossless by "
                  "construction and says nothing about the method. With integer zero points "
                  "(MatMulNBits' packed uint8) m / d is rounded, and it is not."]
    return "\n".join(lines) + "\n"


def _child_main(spec: str) -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    s = json.loads(spec)
    text = Path(s["calib"]).read_text()
    res = compile_variant(s["model"], [tuple(p) for p in s["passes"]], Path(s["out"]), text,
                          s["samples"], s["seq"],
                          level0=Path(s["level0"]) if s["level0"] else None)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(res, default=float))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quantization")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--workdir", default=None, help="keep the artefacts and the GPTQ log here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        _child_main(a.child)
        return 0
    text, figures = run(quick=a.quick, workdir=a.workdir)
    print(text)
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
