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


def _configs(group: int, quick: bool) -> list[tuple]:
    """(label, passes, extras, rows): the recipes w8, w4_rtn and w4_gptq without and with
    `rotate` (fold_norms + QuaRot R1/R2/R4), fold_norms alone before RTN (what folding costs
    without a rotation), per-channel groups, groups of 32 (SmolLM2's own Q4_1 grid), and the full
    pipeline (recipe prune4_mlp_patch_w4a8). `extras` are (label, passes) applied to a copy of the
    result of `passes`, so the W4A8 and W4A8KV8 rows reuse the rotated GPTQ weights instead of
    solving GPTQ again; `rows` is the number of calibration sequences when not the benchmark's
    (the MLP patch trains on 512)."""
    q = "quantize_weights"
    rot = [("fold_norms", {}), ("rotate", {})]
    w4 = {"bits": 4, "group_size": group}
    # act-order (static groups, so MatMulNBits reads the result) and the MSE clip search: on
    # SmolLM2 with rotate, 128 x 512 tokens, they take GPTQ from 25.74 (32 x 512, neither) to 25.39
    gptq = (q, {"method": "gptq", **w4, "symmetric": False, "act_order": True,
                "clip_search": True})
    a8 = ("quantize_activations", {"mode": "dynamic_per_token", "bits": 8})
    kv8 = ("quantize_kv_cache", {"bits": 8})
    fz = {"method": "rtn", "bits": 4, "group_size": 32, "float_zero_points": True}
    # the recipes with end-to-end scale tuning (tune_scales.py), shortened on stories260K
    small = {"quantize_weights": {"group_size": group}}
    if quick:
        small = {"select_layers": {"n": 1},  # stories260K has 5 layers
                 "estimate_patch": {"mlp_rank": 16, "mlp_steps": 10},
                 "quantize_weights": {"group_size": group, "hessian_samples": 0,
                                      "tune_steps": 4, "tune_samples": 32, "tune_seq_len": 64}}
    tuned, tuned_rows = _recipe("w4_gptq_rotate_tuned", small, quick)
    full, full_rows = _recipe("prune4_mlp_patch_w4a8", small, quick)
    n = full[0][1]["n"]
    return [
        ("float32", [], []),
        ("W8 per-channel RTN", [(q, {"method": "rtn", "bits": 8, "group_size": 0})], []),
        ("W8 per-channel RTN + rotate", [*rot, (q, {"method": "rtn", "bits": 8,
                                                    "group_size": 0})], []),
        (f"W4 g{group} RTN", [(q, {"method": "rtn", **w4})], []),
        (f"W4 g{group} RTN after fold_norms", [("fold_norms", {}), (q, {"method": "rtn", **w4})],
         []),
        (f"W4 g{group} RTN + rotate", [*rot, (q, {"method": "rtn", **w4})], []),
        (f"W4 g{group} GPTQ", [gptq], []),
        (f"W4 g{group} GPTQ + rotate", [*rot, gptq],
         [(f"W4A8 (g{group} GPTQ + rotate, int8 per-token activations)", [a8]),
          ("W4A8KV8 (same + int8 KV cache per head)", [a8, kv8])]),
        (f"W4 g{group} GPTQ + rotate + scale tuning (recipe `w4_gptq_rotate_tuned`)", tuned, [],
         tuned_rows),
        (f"full pipeline: prune {n} + MLP patch + rotate + GPTQ W4 g{group} + scale tuning "
         "+ A8 (recipe `prune4_mlp_patch_w4a8`)", full, [], full_rows),
        ("W4 per-channel RTN", [(q, {"method": "rtn", "bits": 4, "group_size": 0})], []),
        *([] if group == 32 else [("W4 g32 RTN", [(q, {"method": "rtn", "bits": 4,
                                                        "group_size": 32})], [])]),
        ("W4 g32 RTN float-zero", [(q, fz)], []),
        ("W4 g32 float-zero + int8 tied table", [(q, {**fz, "embeddings": "int8",
                                                      "lm_head": "int8"})], []),
    ]


def _recipe(name: str, changes: dict[str, dict], quick: bool) -> tuple[list, int | None]:
    """Built-in recipe `name` as (pass, settings) pairs with `changes` per pass name, and its
    calibration rows (None in quick mode: the benchmark's own)."""
    from splice.recipe import Recipe

    d = Recipe.named(name).to_dict()
    passes = [(p["name"], {**p["settings"], **changes.get(p["name"], {})}) for p in d["passes"]]
    return passes, None if quick else d["calibration"]["samples"]


def _calibration(module, text: str, samples: int, seq: int) -> torch.Tensor:
    from splice.frontend.text import encode_text

    ids = encode_text(module, text)[: samples * seq]
    if len(ids) < samples * seq:
        raise RuntimeError(f"calibration text has {len(ids)} tokens, fewer than {samples}x{seq}")
    return torch.tensor(ids, dtype=torch.int64).reshape(samples, seq)


def compile_variant(model: str, passes: list[tuple[str, dict]], out: Path, calib_text: str | None,
                    samples: int, seq: int, extras: list | None = None) -> dict[str, Any]:
    """Import, run `passes` (float32 calibration activations), export to `out`; the pass reports.
    Each
    (label, passes) of `extras` runs on a copy of the result and is exported to out.<k>."""
    from splice.backends.onnx import export
    from splice.frontend import load_model
    from splice.passes.infra.base import PassContext
    from splice.passes.infra.manager import PassManager
    from splice.passes.infra.registry import make_pass

    module = load_model(model)
    calib = _calibration(module, calib_text, samples, seq) if calib_text else None
    ctx = PassContext(calibration=calib, precision=torch.float32)
    t0 = time.perf_counter()
    module, report = PassManager([make_pass(n, s) for n, s in passes]).run(module, ctx)
    passes_s = time.perf_counter() - t0
    export(module, out, report={"passes": report})
    done = []
    for k, (_, more) in enumerate(extras or []):
        t1 = time.perf_counter()
        m, rep = PassManager([make_pass(n, s) for n, s in more]).run(module.clone(), ctx)
        export(m, out.parent / f"{out.name}.{k}", report={"passes": report + rep})
        done.append({"passes_s": passes_s + time.perf_counter() - t1, "report": report + rep})
    return {"passes_s": passes_s, "report": report, "extras": done}


def _child_compile(model: str, passes: list, out: Path, calib_text: str, samples: int,
                   seq: int, extras: list) -> dict[str, Any]:
    """compile_variant in a child process: its own wall time and peak RSS."""
    text_file = out.parent / (out.name + ".calib.txt")
    text_file.write_text(calib_text)
    spec = json.dumps({"model": model, "passes": passes, "out": str(out), "calib": str(text_file),
                       "samples": samples, "seq": seq,
                       "extras": extras})
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


def _measure(art, out: Path, label: str, child: dict, ids: list[int], prompt: list[int],
             bos: int | None, cfg: dict) -> dict[str, Any]:
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
        if rep.get("tune"):
            row["tune"] = rep["tune"]
    return row


def _with_accuracy_level(art_dir: Path, level: int) -> Path:
    """The artefact's model.onnx with every MatMulNBits at `level` (weights shared: the copy
    points at the artefact's external data)."""
    import onnx

    model = onnx.load(str(Path(art_dir) / "model.onnx"), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for a in node.attribute:
                if a.name == "accuracy_level":
                    a.i = level
    path = Path(art_dir) / f"model.level{level}.onnx"
    onnx.save(model, str(path))
    return path


def _accuracy_levels(art, row: dict, ids: list[int], prompt: list[int],
                     bos: int | None, cfg: dict) -> dict[str, Any]:
    """The GPTQ artefact at MatMulNBits accuracy_level 4 (int8 compute) against level 0."""
    from splice.runtime.onnx_runtime import OnnxArtefact

    art0 = OnnxArtefact(art.path, art.manifest, _session(_with_accuracy_level(art.path, 0)))
    window = np.asarray([([bos] if bos is not None else []) + ids[: cfg["window"]]])
    l4, l0 = art.logits(window)[0], art0.logits(window)[0]
    diff = np.abs(l4 - l0)
    return {"level 4 (int8 compute)": {"ppl": row["ppl"], "decode_tok_s": row["decode_tok_s"]},
            "level 0 (float32 compute)": {**_evaluate(art0, ids, cfg["window"], bos),
                                          **_decode(art0, prompt, cfg["new"])},
            "max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
            "max_abs_logit": float(np.abs(l0).max()),
            "top1_agreement": float((l4.argmax(-1) == l0.argmax(-1)).mean())}


def rotation_statistics(cfg: dict, rows: int = 4) -> dict[str, Any]:
    """Where rotation helps: kurtosis and max/median |x| of every linear's input (the tensors
    activation quantization rounds), and of the residual stream, on `rows` calibration
    sequences, after fold_norms and after fold_norms + rotate (R1, R2, R4)."""
    from splice.ir.stats import activation_stats
    from splice.frontend import load_model
    from splice.passes.infra.base import PassContext
    from splice.passes.infra.manager import PassManager
    from splice.passes.infra.registry import make_pass

    module = load_model(cfg["model"])
    seq = cfg["calib"][1]
    batches = _calibration(module, cfg["calib_text"], rows, seq)
    out: dict[str, Any] = {"tokens": rows * seq}
    for name, passes in (("fold_norms", [("fold_norms", {})]),
                         ("fold_norms + rotate", [("fold_norms", {}), ("rotate", {})])):
        m, _ = PassManager([make_pass(n, s) for n, s in passes]).run(module.clone(),
                                                                     PassContext())
        st = activation_stats(m, batches)
        groups: dict[str, list[dict]] = {}
        for r in st["linears"]:
            role = r["roles"][0].split(".")[-1]
            kind = {"q_proj": "q/k/v input", "gate_proj": "gate/up input",
                    "o_proj": "o_proj input", "down_proj": "down_proj input"}.get(role, role)
            groups.setdefault(kind, []).append(r)
        summary = {k: {"kurtosis_mean": float(np.mean([r["kurtosis"] for r in v])),
                       "kurtosis_max": float(np.max([r["kurtosis"] for r in v])),
                       "max_median_mean": float(np.mean([r["max_median_ratio"] for r in v])),
                       "max_median_max": float(np.max([r["max_median_ratio"] for r in v]))}
                   for k, v in groups.items() if k.endswith("input")}
        resid = [r["residual_kurtosis"] for r in st["layers"]]
        summary["residual stream"] = {"kurtosis_mean": float(np.mean(resid)),
                                      "kurtosis_max": float(np.max(resid))}
        out[name] = summary
    return out


def _done(out: Path, extras: list) -> bool:
    return all((p / "manifest.json").is_file()
               for p in [out] + [out.parent / f"{out.name}.{k}" for k in range(len(extras))])


def _reuse(out: Path, extras: list) -> dict[str, Any]:
    """A variant compiled by an earlier run into the same workdir (--resume): its pass reports
    from the manifests; its compile time and memory are not known again."""
    def report(p: Path) -> list:
        return json.loads((p / "manifest.json").read_text())["report"]["passes"]

    rep = report(out)
    passes_s = sum(r.get("time_s", 0.0) for r in rep)
    return {"passes_s": passes_s, "report": rep, "reused": True,
            "extras": [{"passes_s": passes_s, "report": report(out.parent / f"{out.name}.{k}")}
                       for k in range(len(extras))]}


def run(quick: bool = False, workdir: str | Path | None = None,
        resume: bool = False) -> tuple[str, dict]:
    """The tables and figures; artefacts go to a temporary directory, or `workdir` (kept, with
    the GPTQ child's progress log) when given."""
    from splice.runtime import load

    torch.set_num_threads(2)
    cfg = _setup(quick)
    samples, seq = cfg["calib"]
    res: dict[str, Any] = {"model": cfg["name"], "rows": {}, "calibration": f"{samples}x{seq}"}
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(workdir or scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        ids: list[int] | None = None
        for i, (label, passes, extras, *rows) in enumerate(_configs(cfg["group"], quick)):
            out = tmp / f"v{i}"
            gptq = any(s.get("method") == "gptq" for _, s in passes)
            first_gptq = gptq and "accuracy_level" not in res
            n_calib = rows[0] if rows and rows[0] else samples
            if resume and _done(out, extras):
                child = _reuse(out, extras)
            elif gptq:
                child = _child_compile(cfg["model"], passes, out, cfg["calib_text"], n_calib, seq,
                                       extras)
            else:
                child = compile_variant(cfg["model"], passes, out, None, samples, seq,
                                        extras=extras)
            variants = [(label, out, child)] + [
                (extra_label, tmp / f"v{i}.{k}", done)
                for k, ((extra_label, _), done) in enumerate(zip(extras, child["extras"]))]
            for v_label, v_out, v_child in variants:
                art = load(v_out, threads=2)
                if ids is None:
                    ids = art.tokenizer.encode(cfg["eval_text"])[: cfg["eval_tokens"]]
                    bos = art.config.get("bos_token_id") if cfg["bos"] else None
                    prompt = art.tokenizer.encode(cfg["eval_text"][20000:40000])[: cfg["prompt"]]
                row = _measure(art, v_out, v_label, v_child, ids, prompt, bos, cfg)
                if gptq and v_label == label and "wall_s" in child:
                    row["gptq_wall_s"] = child["wall_s"]
                    row["gptq_peak_rss_mb"] = child["peak_rss_mb"]
                    row["gptq_calibration"] = f"{n_calib}x{seq}"
                res["rows"][v_label] = row
                print(json.dumps({v_label: row}, default=float), file=sys.stderr, flush=True)
            if first_gptq:
                res["gptq_layers"] = next(r for r in child["report"]
                                          if r["name"] == "quantize_weights")["report"]["layers"]
                res["accuracy_level"] = _accuracy_levels(load(out, threads=2), res["rows"][label],
                                                         ids, prompt, bos, cfg)
        res["activations"] = rotation_statistics(cfg)
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
        lines += ["", f"{label}: calibration {g['gptq_calibration']} tokens, "
                  f"{g['gptq_wall_s']:.0f} s wall in a child process (import, "
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
    for label, r in rows.items():
        if r.get("tune"):
            t = r["tune"]
            teacher = "unpruned float" if t.get("teacher") == "original" else "float"
            lines += ["", f"{label}: {t['steps']} steps over {t['train_sequences']} sequences "
                      f"({t['parameters']:,} scales of {t['linears']} linears); KL from the "
                      f"{teacher} model on {t['heldout_sequences']} held-out sequences "
                      f"{t['heldout_kl_before']:.4f} -> {t['heldout_kl_after']:.4f}"
                      f"{'' if t['changed'] else ' (no gain: the GPTQ scales kept)'}."]
    tuned = next((k for k in rows if "scale tuning" in k), "")
    goals = [(f"W4 g{cfg['group']} GPTQ + rotate", 0.05), (tuned, 0.05),
             (next((k for k in rows if k.startswith("full pipeline")), ""), 0.25)]
    lines += [""] + [f"Goal: {k} within {limit:.0%} of float32: {rows[k]['ppl'] / base - 1:+.1%} "
                     f"({'met' if rows[k]['ppl'] / base - 1 <= limit else 'not met'})."
                     for k, limit in goals if k in rows]
    if "activations" in res:
        act = res["activations"]
        lines += ["", f"Where rotation helps: activation statistics on {act['tokens']} calibration "
                  "tokens (float32), mean and max over layers; kurtosis 3 is Gaussian, a large "
                  "max/median |x| is what per-token int8 rounding loses precision to.", "",
                  "| tensor | kurtosis mean / max, fold_norms | same after rotate | "
                  "max/median mean / max, fold_norms | same after rotate |",
                  "| --- | --- | --- | --- | --- |"]
        a, b = act["fold_norms"], act["fold_norms + rotate"]
        for k in a:
            mm = (f"{a[k]['max_median_mean']:.1f} / {a[k]['max_median_max']:.1f} | "
                  f"{b[k]['max_median_mean']:.1f} / {b[k]['max_median_max']:.1f}"
                  if "max_median_mean" in a[k] else "- | -")
            lines.append(f"| {k} | {a[k]['kurtosis_mean']:.1f} / {a[k]['kurtosis_max']:.1f} | "
                         f"{b[k]['kurtosis_mean']:.1f} / {b[k]['kurtosis_max']:.1f} | {mm} |")
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
                          extras=s["extras"])
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(res, default=float))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quantization")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--workdir", default=None, help="keep the artefacts and the GPTQ log here")
    ap.add_argument("--resume", action="store_true",
                    help="reuse the artefacts an earlier run left in --workdir")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        _child_main(a.child)
        return 0
    text, figures = run(quick=a.quick, workdir=a.workdir, resume=a.resume)
    print(text)
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
