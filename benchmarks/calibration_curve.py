"""Perplexity against calibration size: how many calibration tokens a calibrated preset needs.

    python -m benchmarks.calibration_curve --preset balanced --sizes 4 8 16 32 64

For each size N the preset is compiled on the first N x seq_len tokens of WikiText-2's validation
text (the import done once, the passes and the ONNX export timed in this process, torch at the
threads given), and the artefact's WikiText-2 test perplexity is measured through splice's
runtime with the usual protocol (first 16,384 tokens, 1024-token windows, no BOS; --eval-tokens
fewer to screen; each row also gives the first 4,096 tokens' figure). The presets' calibration sizes are chosen from this curve: the smallest size past
which more tokens stop paying. Each compile's cost is given as wall seconds and as CPU seconds
(user + system of this process, all its threads: on a shared machine the wall time also counts
the waiting), with the load average when it began. Not a `make bench` section (it takes about a
compile per size); quick mode (stories260K, tiny sizes) checks that it runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SCREEN = 4096  # each row also gives the perplexity of the first this many test tokens


def run(preset: str = "balanced", sizes: tuple[int, ...] = (8, 16, 32, 64), quick: bool = False,
        threads: int = 2, eval_tokens: int = 16384) -> dict:
    import torch

    from splice.api import compile as splice_compile
    from splice.evaluate import perplexity
    from splice.frontend import load_model
    from splice.passes.infra.instruments import TimingInstrument
    from splice.recipe import Recipe
    from splice.runtime import load
    from splice.frontend.text import encode_text

    torch.set_num_threads(threads)
    recipe = Recipe.named(preset)
    if quick:
        model = load_model(str(REPO.parent / "shared" / "models" / "stories260K" / "stories260K.bin"))
        calib_text, test_text, seq, window, eval_tokens = (
            DATA / "tinystories_val.txt", DATA / "tinystories_val.txt", 64, 64, 512)
    else:
        model = load_model("smollm2-135m")
        calib_text, test_text, seq, window = (DATA / "wikitext2_valid_tokenized.txt",
                                              DATA / "wikitext2_test.txt",
                                              recipe.calibration_seq_len, 1024)
    calib_ids = encode_text(model, calib_text.read_text()[:2_000_000])
    test_ids = encode_text(model, test_text.read_text()[-400_000 if quick else 0:][:200_000])
    test_ids = test_ids[:eval_tokens]
    rows = []
    for n in sizes:
        if len(calib_ids) < n * seq:
            raise RuntimeError(f"{calib_text} has {len(calib_ids)} tokens, fewer than {n} x {seq}")
        calib = torch.tensor(calib_ids[:n * seq]).reshape(n, seq)
        r = Recipe(recipe.name, recipe.passes, recipe.description, recipe.seed, n, seq)
        with tempfile.TemporaryDirectory() as tmp:
            load_avg, cpu0, t0 = os.getloadavg()[0], time.process_time(), time.perf_counter()
            path = splice_compile(model.clone(), r, "cpu", Path(tmp) / "a", calibration=calib,
                                  instruments=[TimingInstrument()], load=False)
            compile_s, compile_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
            report = json.loads((path / "manifest.json").read_text())["report"]["passes"]
            art = load(path, threads=threads)
            head = perplexity(art_logits := lambda x: art.logits(x)[0], test_ids[:SCREEN],
                              window=window)  # the screening figure too
            rest = perplexity(art_logits, test_ids[SCREEN:], window=window) \
                if len(test_ids) >= SCREEN + window else None
            ppl = head["ppl"] if rest is None else math.exp(
                (head["nll"] * head["tokens"] + rest["nll"] * rest["tokens"])
                / (head["tokens"] + rest["tokens"]))
        rows.append({"samples": n, "seq_len": seq, "tokens": n * seq, "compile_s": compile_s,
                     "compile_cpu_s": compile_cpu_s, "load_avg_1min": load_avg,
                     "passes_s": {p["name"]: round(p.get("time_s", 0.0), 1) for p in report},
                     "ppl": ppl, f"ppl_first_{SCREEN}": head["ppl"]})
        print(json.dumps(rows[-1]), flush=True)
    return {"preset": preset, "threads": threads, "eval_tokens": len(test_ids),
            "window": window, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.calibration_curve")
    ap.add_argument("--preset", default="balanced")
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--eval-tokens", type=int, default=16384,
                    help="test tokens for perplexity (the first N; fewer to screen)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    res = run(a.preset, tuple(a.sizes), quick=a.quick, threads=a.threads,
              eval_tokens=a.eval_tokens)
    print(f"| calibration sequences x {res['rows'][0]['seq_len']} | compile s (wall) | compile "
          f"CPU s | load avg | ppl ({res['eval_tokens']} test tokens) | ppl (first {SCREEN}) |")
    for r in res["rows"]:
        print(f"| {r['samples']} | {r['compile_s']:.0f} | {r['compile_cpu_s']:.0f} | "
              f"{r['load_avg_1min']:.1f} | {r['ppl']:.2f} | {r[f'ppl_first_{SCREEN}']:.2f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
