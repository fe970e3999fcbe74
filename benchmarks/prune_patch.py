"""Layer pruning with LinearPatch: perplexity after pruning n layers, without a patch, with the
LinearPatch (Hadamard channel scale), with the ridge least-squares patch, and with the one that
estimate_patch's "auto" picks on held-out calibration tokens.

- SmolLM2-135M (full mode): n = 2, 4, 6 layers chosen by select_layers (cosine), plus the block
  [12, 16) of the LinearPatch issue's reference figures (dense 22.88, pruned 44.11, LinearPatch
  40.26, ridge least squares 31.15) when select_layers does not choose it for n = 4.
  Calibration: 16 x 512 tokens of wikitext2_valid_tokenized.txt; evaluation: the first 16,384
  tokens of wikitext2_test.txt in 1024-token windows.
- stories260K (both modes): 1 of its 5 layers, evaluated on the first half of tinystories_val.txt
  (511-token windows after BOS, as its SOURCE.md measures it) and calibrated on the second half.

The last column distils the chosen patch (distill_patch: top-50 KL to the unpruned model, AdamW,
cosine schedule) before pruning: always on stories260K, on SmolLM2 with --distill, which also
gives SmolLM2's trade-off table on the n = 4 block: the least-squares patch on 4x the calibration
(64 x 512 tokens), and distillation settings from short sequences to full 512-token rows.
The MLP patch (estimate_patch kind "mlp": least squares and a gated MLP block trained by
regression on the calibration streams) runs on the n = 4 block with 64 and 256 x 512 tokens
(rank 128) and 512 x 512 (rank 512, the recipe prune4_mlp_patch's setting; stories260K: 2x its
calibration, rank 32), and as a row of the deployed forms (the last setting's rank and steps,
on the 16 x 512 tokens of the other rows).

Perplexity runs through the ONNX artefact in float32. Calibration activations are taken
in float32 (`PassContext.precision`, float64 by default, 6x slower on this CPU); the patch fits are
float64 whatever that precision. Each patched variant is the recipe's line: estimate_patch ->
prune_layers -> fuse_patch(auto) -> fold_norms.

    python -m benchmarks.prune_patch [--quick] [--distill] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
STORIES = SHARED / "models" / "stories260K" / "stories260K.bin"
WIKI_CALIB = SHARED / "data" / "wikitext2_valid_tokenized.txt"
WIKI_TEST = SHARED / "data" / "wikitext2_test.txt"
TINYSTORIES = SHARED / "data" / "tinystories_val.txt"
REFERENCE = {"block": [12, 16], "dense": 22.88, "pruned": 44.11, "linearpatch": 40.26,
             "lstsq": 31.15}

log = logging.getLogger(__name__)


def _ppl(module, ids: list[int], window: int, bos: int | None) -> float:
    """Perplexity of `module` through its ONNX artefact (float32, 2 threads): 3x faster than the
    reference interpreter on this CPU, and the number a user of the artefact gets (the two agree
    to ~1e-4 in the logits, tests/backends)."""
    import tempfile

    from splice.backends.onnx import export
    from splice.evaluate import perplexity
    from splice.runtime import load

    with tempfile.TemporaryDirectory() as tmp:
        art = load(export(module, Path(tmp) / "a"), threads=2)
        return perplexity(lambda x: art.logits(x)[0], ids, window=window, bos=bos)["ppl"]


def _patched(module, ctx, kind: str, start: int, n: int, distill: dict | None = None,
             **estimate):
    """(module after estimate [-> distill] -> prune -> fuse(auto) -> fold_norms, the reports of
    estimate_patch and distill_patch); `estimate`: more estimate_patch settings."""
    from splice.passes.distill_patch import DistillPatchPass
    from splice.passes.estimate_patch import EstimatePatchPass
    from splice.passes.fold_norms import FoldNormsPass
    from splice.passes.fuse_patch import FusePatchPass
    from splice.passes.prune_layers import PruneLayersPass

    m = module.clone()
    report = EstimatePatchPass(kind=kind, start=start, n=n, allow_first=True, **estimate)(
        m, ctx).report
    trained = DistillPatchPass(**distill)(m, ctx).report if distill else {}
    for p in (PruneLayersPass(), FusePatchPass(strategy="auto"), FoldNormsPass()):
        p(m, ctx)
    return m, report, trained


def _block_row(module, ctx, eval_ids, window, bos, n: int, start: int | None,
               distill: dict | None = None) -> dict[str, Any]:
    from splice.passes.prune_layers import PruneLayersPass
    from splice.passes.select_layers import SelectLayersPass

    t0 = time.perf_counter()
    row: dict[str, Any] = {"n": n}
    if start is None:
        sel = SelectLayersPass(n=n, metric="cosine")(module.clone(), ctx).report
        start = sel["start"]
        row["selected_by"] = "select_layers (cosine)"
        row["scores"] = sel["scores"]
    else:
        row["selected_by"] = "fixed"
    row["block"] = [start, start + n]
    pruned = module.clone()
    PruneLayersPass(start=start, n=n, allow_first=True)(pruned, ctx)
    row["params"] = pruned.num_parameters()
    row["pruned"] = _ppl(pruned, eval_ids, window, bos)
    chosen_module, auto, _ = _patched(module, ctx, "auto", start, n)
    chosen = auto["kind"]
    row["chosen_kind"] = chosen
    row["holdout_errors"] = auto["holdout_errors"]
    row["chosen"] = _ppl(chosen_module, eval_ids, window, bos)
    row[chosen] = row["chosen"]
    other = "lstsq" if chosen == "linearpatch" else "linearpatch"
    other_module, _, _ = _patched(module, ctx, other, start, n)
    row[other] = _ppl(other_module, eval_ids, window, bos)
    if distill:
        distilled, _, trained = _patched(module, ctx, chosen, start, n, distill)
        row["distilled"] = _ppl(distilled, eval_ids, window, bos)
        row["distill_report"] = trained
    row["wall_s"] = time.perf_counter() - t0
    log.info("block %s: %s", row["block"], {k: row[k] for k in ("pruned", "linearpatch", "lstsq")})
    return row


def _decode(module, prompt: list[int], new: int = 128, repeats: int = 3) -> dict[str, float]:
    """Export `module` to ONNX (float32) and time a greedy generation through splice's runtime:
    prefill and decode tokens/s, best of `repeats` after a warm-up (a shared machine)."""
    import tempfile

    from splice.backends.onnx import export
    from splice.runtime import load

    with tempfile.TemporaryDirectory() as tmp:
        art = load(export(module, Path(tmp) / "a"), threads=2)
        art.generate_ids(prompt[:8], max_new_tokens=4, stop_at_eos=False)
        gens = [art.generate_ids(prompt, max_new_tokens=new, stop_at_eos=False)
                for _ in range(repeats)]
    return {"prefill_tok_s": max(g.prefill_tok_s for g in gens),
            "decode_tok_s": max(g.decode_tok_s for g in gens)}


def _patch_params(module) -> int:
    """Parameters the patch adds: weights read by role "patch" nodes (the fold strategy adds
    none: it changes down_proj in place)."""
    names = {v.const for n in module.graph.nodes if n.role == "patch" for v in n.inputs
             if v is not None and v.is_const}
    return sum(module.weights[k].numel() for k in names)


def _fusion_rows(module, ctx, eval_ids, window, bos, start: int, n: int,
                 prompt: list[int], mlp: dict) -> list[dict[str, Any]]:
    """Each deployed form of the patch on block [start, start + n): its extra parameters,
    perplexity and decode speed through the ONNX backend, beside the unpatched pruned model
    and the dense model. LinearPatch rows use the training-free patch; "rotated" estimates it in
    rotate's R1 basis, so that after fold_norms + rotate it is one channel scale (compared with
    the rotated model without a patch: the rotation's own online Hadamard R4 costs the same in
    both)."""
    from splice.passes.estimate_patch import EstimatePatchPass
    from splice.passes.fold_norms import FoldNormsPass
    from splice.passes.fuse_patch import FusePatchPass
    from splice.passes.prune_layers import PruneLayersPass
    from splice.passes.rotate import RotatePass

    def variant(kind: str | None, strategy: str | None, rotate: bool = False, **est):
        m = module.clone()
        if kind is not None:
            EstimatePatchPass(kind=kind, start=start, n=n, allow_first=True, **est)(m, ctx)
        PruneLayersPass(start=start, n=n, allow_first=True)(m, ctx)
        if strategy is not None:
            FusePatchPass(strategy=strategy)(m, ctx)
        FoldNormsPass()(m, ctx)
        if rotate:
            RotatePass()(m, ctx)
        return m

    rows = []
    dense = module.clone()
    FoldNormsPass()(dense, ctx)
    specs = [("dense model (no pruning)", lambda: dense, "-"),
             ("pruned, no patch", lambda: variant(None, None), "-"),
             ("LinearPatch, dense matmul", lambda: variant("linearpatch", "dense"), "exact"),
             ("LinearPatch, FWHT + scale + FWHT", lambda: variant("linearpatch", "fwht"),
              "exact"),
             ("least squares, dense matmul", lambda: variant("lstsq", "dense"), "exact"),
             ("least squares, folded into down_proj", lambda: variant("lstsq", "fold"),
              "approximate"),
             ("least squares + MLP block (estimate_patch kind mlp), as it is",
              lambda: variant("mlp", "auto", **mlp), "exact"),
             ("rotated model, pruned, no patch", lambda: variant(None, None, rotate=True), "-"),
             ("LinearPatch in R1's basis, rotated: channel scale",
              lambda: variant("linearpatch", "auto", rotate=True, basis="r1"), "exact")]
    for label, make, exact in specs:
        try:
            m = make()
        except TypeError as e:  # an estimate_patch without the `basis` setting
            log.warning("fusion row %r skipped: %s", label, e)
            continue
        row = {"form": label, "exact": exact, "patch_params": _patch_params(m),
               "params": m.num_parameters(), "ppl": _ppl(m, eval_ids, window, bos)}
        row.update(_decode(m, prompt))
        rows.append(row)
        log.info("fusion: %s", row)
    return rows


def _model_section(name: str, module, calib: torch.Tensor, eval_ids: list[int], window: int,
                   bos: int | None, blocks: list[tuple[int, int | None]],
                   distill: dict | None, fusion_n: int, prompt: list[int],
                   distill_grid: list[dict] = (),
                   calib_pool: torch.Tensor | None = None,
                   mlp_grid: list[dict] = ()) -> dict[str, Any]:
    from splice.passes.infra.base import PassContext

    ctx = PassContext(calibration=calib, seed=0, precision=torch.float32)
    res: dict[str, Any] = {"model": name, "layers": module.config.num_layers,
                           "params": module.num_parameters(), "calibration_tokens": calib.numel(),
                           "eval_tokens": len(eval_ids), "window": window}
    res["dense"] = _ppl(module, eval_ids, window, bos)
    res["rows"] = []
    for n, start in blocks:
        if start is not None and any(r["block"] == [start, start + n] for r in res["rows"]):
            continue  # the fixed block is one select_layers chose already
        res["rows"].append(_block_row(module, ctx, eval_ids, window, bos, n, start, distill))
    row = next(r for r in res["rows"] if r["n"] == fusion_n)
    start = row["block"][0]
    mlp_fusion = {k: v for k, v in (mlp_grid[-1] if mlp_grid else {}).items()
                  if k != "calib_rows"}  # the largest patch's shape, on this section's tokens
    res["fusion"] = {"block": row["block"], "rows": _fusion_rows(module, ctx, eval_ids, window,
                                                                 bos, start, fusion_n, prompt,
                                                                 mlp_fusion)}
    res["distill_tradeoff"] = []
    for settings in distill_grid:
        settings = dict(settings)
        rows = settings.pop("calib_rows", calib.shape[0])
        c = PassContext(calibration=calib_pool[:rows * calib.shape[1]].reshape(rows, -1),
                        seed=0, precision=torch.float32) if rows != calib.shape[0] else ctx
        t0 = time.perf_counter()
        m, _, trained = _patched(module, c, "lstsq", start, fusion_n, settings or None)
        res["distill_tradeoff"].append({**settings, "calib_rows": rows,
                                        "calib_seq": calib.shape[1], "block": row["block"],
                                        "seconds": time.perf_counter() - t0,
                                        "ppl": _ppl(m, eval_ids, window, bos), **trained})
        log.info("patch %s: %s", settings, res["distill_tradeoff"][-1])
    res["mlp_patch"] = []
    for settings in mlp_grid:  # the least-squares patch and a gated MLP block, by calibration
        settings = dict(settings)
        rows = settings.pop("calib_rows", calib.shape[0])
        c = PassContext(calibration=calib_pool[:rows * calib.shape[1]].reshape(rows, -1),
                        seed=0, precision=torch.float32) if rows != calib.shape[0] else ctx
        t0 = time.perf_counter()
        m, est, _ = _patched(module, c, "mlp", start, fusion_n, **settings)
        res["mlp_patch"].append({**est["mlp"], "calib_rows": rows, "calib_seq": calib.shape[1],
                                 "block": row["block"], "seconds": time.perf_counter() - t0,
                                 "holdout_token_rel": {k: v["token_rel"] for k, v in
                                                       est["holdout_errors"].items()},
                                 "ppl": _ppl(m, eval_ids, window, bos)})
        log.info("mlp patch %s: %s", settings, res["mlp_patch"][-1])
    return res


def _smollm2(distill: bool) -> dict[str, Any]:
    from splice.frontend import load_model
    from splice.frontend.text import module_tokenizer, read_text

    module = load_model("smollm2-135m")
    tok = module_tokenizer(module)
    calib_ids = list(tok.encode(read_text(WIKI_CALIB)))
    calib = torch.tensor(calib_ids[:16 * 512], dtype=torch.int64).reshape(16, 512)
    pool = torch.tensor(calib_ids[:512 * 512], dtype=torch.int64)
    eval_ids = list(tok.encode(read_text(WIKI_TEST)))[:16384]
    prompt = list(tok.encode(read_text(WIKI_TEST)[20000:40000]))[:64]
    # least squares alone on 4x the calibration, then distillation: short sequences (the first
    # setting, fast but it does not carry over to 1024-token windows) and full 512-token rows
    grid = [dict(calib_rows=64),
            dict(samples=32, seq_len=128, steps=50, batch=4, lr=1e-3),
            dict(calib_rows=64, samples=64, seq_len=512, steps=60, batch=2, lr=1e-4),
            dict(calib_rows=64, samples=64, seq_len=512, steps=150, batch=2, lr=3e-4)] \
        if distill else []
    # the MLP patch on 64, 256 and 512 rows of 512 (the validation text holds ~535); the last
    # is the recipe prune4_mlp_patch's
    mlp = [dict(calib_rows=64), dict(calib_rows=256, mlp_steps=4000),
           dict(calib_rows=512, mlp_rank=512, mlp_steps=8000)]
    return _model_section("SmolLM2-135M", module, calib, eval_ids, 1024, None,
                          [(2, None), (4, None), (6, None), (4, 12)], None, 4, prompt, grid,
                          pool, mlp)


def _stories(quick: bool) -> dict[str, Any]:
    from splice.frontend import load_model
    from splice.frontend.text import module_tokenizer, read_text

    module = load_model(str(STORIES))
    tok = module_tokenizer(module)
    text = read_text(TINYSTORIES)
    half = len(text) // 2
    eval_ids = list(tok.encode(text[:half]))
    calib_ids = list(tok.encode(text[half:]))
    rows, seq = (4, 256) if quick else (16, 512)
    if quick:
        eval_ids = eval_ids[:8 * 511]
    calib = torch.tensor(calib_ids[:rows * seq], dtype=torch.int64).reshape(rows, seq)
    pool = torch.tensor(calib_ids[:2 * rows * seq], dtype=torch.int64)
    grid = [dict(calib_rows=2 * rows), dict(samples=8, seq_len=64, steps=5, batch=2, lr=1e-3)]
    bos = module.config.bos_token_id
    window = module.config.max_position - 1
    settings = dict(samples=16, seq_len=64, steps=20, batch=2) if quick else \
        dict(samples=64, seq_len=128, steps=200, batch=4, lr=1e-3)
    prompt = eval_ids[:32]
    mlp = [dict(calib_rows=2 * rows, mlp_rank=32, mlp_steps=50 if quick else 1000)]
    return _model_section("stories260K", module, calib, eval_ids, window, bos, [(1, None)],
                          settings, 1, prompt, grid, pool, mlp)


def run(quick: bool = False, distill_smollm2: bool = False) -> tuple[str, dict]:
    torch.set_num_threads(2)
    sections = [] if quick else [_smollm2(distill_smollm2)]
    sections.append(_stories(quick))
    figures = {"sections": sections, "reference": REFERENCE,
               "calibration_precision": "float32 activations, float64 fits"}
    return markdown(figures), figures


def markdown(figures: dict) -> str:
    lines = ["## Layer pruning with LinearPatch", "",
             "Perplexity (ONNX artefact, float32). Patched columns run estimate_patch -> "
             "prune_layers -> fuse_patch(auto) -> fold_norms; `chosen` is the patch estimate_patch "
             "picks with kind = auto (lower held-out per-token relative error of the stream).", ""]
    for s in figures["sections"]:
        lines += [f"### {s['model']}: {s['layers']} layers, {s['params'] / 1e6:.2f} M parameters, "
                  f"{s['calibration_tokens']} calibration tokens, {s['eval_tokens']} evaluation "
                  f"tokens in {s['window']}-token windows", "",
                  "| block | selected by | parameters | dense | pruned | LinearPatch "
                  "| least squares | chosen | chosen + distill_patch |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in s["rows"]:
            distilled = f"{r['distilled']:.2f}" if "distilled" in r else "-"
            lines.append(f"| [{r['block'][0]}, {r['block'][1]}) | {r['selected_by']} | "
                         f"{r['params'] / 1e6:.2f} M | {s['dense']:.2f} | {r['pruned']:.2f} | "
                         f"{r['linearpatch']:.2f} | {r['lstsq']:.2f} | {r['chosen']:.2f} "
                         f"({r['chosen_kind']}) | {distilled} |")
        lines.append("")
    for s in figures["sections"]:
        f = s.get("fusion")
        if not f:
            continue
        b0, b1 = f["block"]
        base = next(r for r in f["rows"] if r["form"] == "pruned, no patch")
        lines += [f"### {s['model']}: deployed forms of the patch on block [{b0}, {b1})", "",
                  "Decode through the ONNX backend (float32), 64-token prompt + 128 greedy tokens, "
                  "2 threads, best of 3; `vs pruned` compares with the same model without a patch "
                  "(the rotated rows with the rotated model without a patch).", "",
                  "| form | exact | patch parameters | ppl | prefill tok/s | decode tok/s "
                  "| vs pruned |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in f["rows"]:
            ref_row = base
            if r["form"].startswith("LinearPatch in R1"):
                ref_row = next((x for x in f["rows"] if x["form"].startswith("rotated model")),
                               base)
            lines.append(f"| {r['form']} | {r['exact']} | {r['patch_params']:,} | "
                         f"{r['ppl']:.2f} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
                         f"{r['decode_tok_s'] / ref_row['decode_tok_s'] - 1:+.1%} |")
        lines.append("")
        if s.get("distill_tradeoff"):
            lines += ["The least-squares patch of that block by calibration size, and refined by "
                      "distill_patch (top-50 KL to the dense model, AdamW, cosine; sequences cut "
                      "from the calibration rows, one in eight held out):", "",
                      "| calibration | distill: samples x seq_len | steps | batch | lr | seconds "
                      "| held-out KL before -> after | ppl |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- |"]
            for d in s["distill_tradeoff"]:
                cal = f"{d['calib_rows']} x {d['calib_seq']}"
                if "steps" not in d:
                    lines.append(f"| {cal} | - | - | - | - | {d['seconds']:.0f} | - | "
                                 f"{d['ppl']:.2f} |")
                    continue
                lines.append(f"| {cal} | {d['samples']} x {d['seq_len']} | {d['steps']} | "
                             f"{d['batch']} | {d['lr']:g} | {d['seconds']:.0f} | "
                             f"{d['heldout_kl_before']:.4f} -> {d['heldout_kl_after']:.4f} | "
                             f"{d['ppl']:.2f} |")
            lines.append("")
        if s.get("mlp_patch"):
            lines += ["The MLP patch of that block (estimate_patch kind mlp: the least-squares "
                      "patch and a gated MLP block on the stream after it, trained together by "
                      "AdamW on the per-token relative error of the calibration streams, a "
                      "quarter held out), by calibration size:", "",
                      "| calibration | rank | steps | patch parameters | seconds "
                      "| held-out error: none / least squares / MLP | ppl |",
                      "| --- | --- | --- | --- | --- | --- | --- |"]
            for d in s["mlp_patch"]:
                e = d["holdout_token_rel"]
                lines.append(f"| {d['calib_rows']} x {d['calib_seq']} | {d['rank']} | "
                             f"{d['steps']} | {d['parameters']:,} | {d['seconds']:.0f} | "
                             f"{e['none']:.4f} / {e['lstsq']:.4f} / {e['mlp']:.4f} | "
                             f"{d['ppl']:.2f} |")
            lines.append("")
    ref = figures["reference"]
    b0, b1 = ref["block"]
    lines += [f"Reference (the issue, SmolLM2-135M, block [{b0}, {b1})): "
              f"dense {ref['dense']}, pruned {ref['pruned']}, LinearPatch {ref['linearpatch']}, "
              f"ridge least squares {ref['lstsq']}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.prune_patch")
    ap.add_argument("--quick", action="store_true", help="stories260K only, small sizes")
    ap.add_argument("--distill", action="store_true",
                    help="also distil the chosen patch on SmolLM2 (minutes per block)")
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "prune_patch.json"),
                    help="where to write the raw figures")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    text, figures = run(quick=a.quick, distill_smollm2=a.distill)
    sys.stdout.write(text)
    Path(a.json).write_text(json.dumps(figures, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
