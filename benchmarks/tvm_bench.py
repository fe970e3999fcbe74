"""TVM backend figures: prefill and decode speed of the TVM llvm library beside splice's ONNX
artefact of the same graph, float32 and int4, with compile time.

Protocol (the ONNX benchmarks'): SmolLM2-135M (stories260K in quick mode), a 64-token prompt of
real text, 128 greedy tokens without stopping at EOS, 2 threads, every engine measured in the same
run. The engines alternate within each of REPEATS rounds and each reports its best round: on a
machine shared with other jobs the best round is the one least disturbed by them, and alternating
exposes every engine to the same disturbances. A pause separates engines: ONNX Runtime's and
TVM's idle workers spin for a while after a run, and on two cores that spinning would be charged
to the next engine (measured: TVM's prefill of stories260K 40x slower right after an ONNX run).

int4: RTN, 4-bit, groups of 32 (QuantizeWeightsPass), lm_head kept in float32, the same quantized
graph exported to both backends (ONNX: MatMulNBits; TVM: quant.py's kernels reading the same
bytes), and to TVM once more with the export option activations="int8" (qdot.py). Tuning time
is zero: the TVM schedules are hand-written rules (backends/tvm/schedule.py),
so a compile is lowering plus LLVM code generation.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO.parent / "shared" / "models" / "stories260K" / "stories260K.bin"
TEXTS = (REPO.parent / "shared" / "data" / "wikitext2_test.txt",
         REPO.parent / "shared" / "data" / "tinystories_val.txt")
REPEATS = 3
PAUSE_S = 0.5
# the int4 graph through TVM with activations="int8" (decode's products multiply int8
# activations by the codes, backends/tvm/qdot.py; prefill as "TVM int4")
INT8_ACT = "TVM int4 int8-act"


def _prompt(art, n: int) -> list[int]:
    text = next(p for p in TEXTS if p.is_file()).read_text()[:20000]
    ids = art.tokenizer.encode(text)[:n]
    if len(ids) < n:
        raise RuntimeError(f"not enough text for a {n}-token prompt")
    return ids


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def run(quick: bool = False) -> tuple[str, dict]:
    from splice.backends.onnx import export as export_onnx
    from splice.backends.tvm import export as export_tvm
    from splice.frontend import load_model
    from splice.passes.infra.base import PassContext
    from splice.passes.quantize_weights import QuantizeWeightsPass
    from splice.ir import run_logits
    from splice.runtime import load

    model = str(STORIES) if quick else "smollm2-135m"
    name = "stories260K" if quick else "SmolLM2-135M"
    prompt_len, new = (32, 32) if quick else (64, 128)
    res: dict = {"model": name, "prompt": prompt_len, "new": new, "compile": {}, "speed": {},
                 "logit_diff": {}, "rounds": 1 if quick else REPEATS}  # quick: a test's run
    module, res["import_s"] = _timed(load_model, model)
    int4, res["quantize_s"] = _timed(
        lambda: QuantizeWeightsPass(bits=4, group_size=32).call(module.clone(),
                                                                PassContext()).module)
    with tempfile.TemporaryDirectory() as tmp:
        arts = {}
        engines = [("ONNX float32", "onnx", module), ("TVM float32", "tvm", module),
                   ("ONNX int4", "onnx", int4), ("TVM int4", "tvm", int4)]
        if not quick:  # the quick run keeps to the four engines (tests/benchmarks)
            engines.append((INT8_ACT, "tvm", int4))
        for label, backend, mod in engines:
            out = Path(tmp) / label.replace(" ", "_")
            if backend == "onnx":
                _, wall = _timed(export_onnx, mod, out, threads=2)
                compile_row = {"wall_s": wall}
            else:
                act = {"activations": "int8"} if label == INT8_ACT else {}
                _, wall = _timed(export_tvm, mod, out, threads=2, **act)
                report = load(out).manifest["report"]
                compile_row = {"wall_s": wall, "lower_s": report["lower_s"],
                               "build_s": report["build_s"], "tuning_s": 0.0}
            res["compile"][label] = {**compile_row, "size_mb": _size_mb(out)}
            arts[label] = load(out, threads=2)
        ids = _prompt(arts["ONNX float32"], prompt_len)
        refs = {"float32": run_logits(module, torch.tensor([ids]))["logits"][0].numpy(),
                "int4": run_logits(int4, torch.tensor([ids]))["logits"][0].numpy()}
        for label, art in arts.items():
            ref = refs[label.split()[1]]
            got = art.logits(np.asarray([ids]))[0]
            res["logit_diff"][label] = {
                "max_abs": float(np.abs(got - ref).max()), "max_abs_logit": float(np.abs(ref).max()),
                "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean())}
        for art in arts.values():
            art.generate_ids(ids[:8], max_new_tokens=4, stop_at_eos=False)  # warm-up
        rounds: dict[str, list] = {label: [] for label in arts}
        for _ in range(res["rounds"]):
            for label, art in arts.items():
                time.sleep(PAUSE_S)
                g = art.generate_ids(ids, max_new_tokens=new, stop_at_eos=False)
                rounds[label].append((g.prefill_tok_s, g.decode_tok_s))
        for label, rs in rounds.items():
            res["speed"][label] = {"prefill_tok_s": max(r[0] for r in rs),
                                   "decode_tok_s": max(r[1] for r in rs),
                                   "rounds": [list(r) for r in rs]}
    return markdown(res), res


def markdown(res: dict) -> str:
    sp, cp = res["speed"], res["compile"]
    lines = [f"## TVM backend: {res['model']}", "",
             f"Prompt {res['prompt']} tokens, {res['new']} greedy tokens, 2 threads; best of "
             f"{res['rounds']} alternating rounds (same run):", "",
             "| engine | prefill tok/s | decode tok/s | compile s | of which LLVM build s | "
             "tuning s | artefact MB |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, s in sp.items():
        c = cp[label]
        build = f"{c['build_s']:.1f}" if "build_s" in c else "-"
        tune = f"{c['tuning_s']:.0f}" if "tuning_s" in c else "-"
        lines.append(f"| {label} | {s['prefill_tok_s']:.1f} | {s['decode_tok_s']:.1f} | "
                     f"{c['wall_s']:.1f} | {build} | {tune} | {c['size_mb']:.1f} |")
    lines += ["", "| ratio (TVM / ONNX) | prefill | decode |", "| --- | --- | --- |"]
    for kind in ("float32", "int4"):
        o, t = sp[f"ONNX {kind}"], sp[f"TVM {kind}"]
        lines.append(f"| {kind} | {t['prefill_tok_s'] / o['prefill_tok_s']:.2f}x | "
                     f"{t['decode_tok_s'] / o['decode_tok_s']:.2f}x |")
    if INT8_ACT in sp:
        o, t = sp["ONNX int4"], sp[INT8_ACT]
        lines.append(f"| int4, TVM with int8 activations | "
                     f"{t['prefill_tok_s'] / o['prefill_tok_s']:.2f}x | "
                     f"{t['decode_tok_s'] / o['decode_tok_s']:.2f}x |")
    lines += ["", "Logits on the prompt against splice's reference interpreter (float32) of the "
              "same graph (ONNX int4 runs MatMulNBits at accuracy level 4, int8 activations):", "",
              "| engine | max abs diff | max abs logit | top-1 agreement |",
              "| --- | --- | --- | --- |"]
    lines += [f"| {k} | {v['max_abs']:.2g} | {v['max_abs_logit']:.1f} | "
              f"{v['top1_agreement']:.3f} |" for k, v in res["logit_diff"].items()]
    lines += ["", f"Import {res['import_s']:.1f} s; int4 RTN quantization {res['quantize_s']:.1f} s "
              "(shared by both backends). TVM tuning: none (hand-written schedules)."]
    return "\n".join(lines) + "\n"
