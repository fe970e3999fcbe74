"""Foundation figures: import and compile cost, logit agreement along the line, decode speed.

For SmolLM2-135M (or stories260K in quick mode):
- import time, compile time (fold_norms + ONNX lowering) and the compile's peak resident memory,
  measured on `splice compile` in a child process;
- the max |logit| difference at each stage of the line on one prompt: transformers' own load of
  the checkpoint -> splice's import (reference interpreter, float32) -> after fold_norms ->
  the ONNX artefact run by splice's runtime;
- prefill and decode tokens/s of the ONNX float32 artefact beside Hugging Face eager float32, same
  prompt (64 tokens), 128 greedy tokens, 2 threads, in the same run (ratios, not absolutes, are
  what compare across machines).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO.parent / "shared" / "models" / "stories260K" / "stories260K.bin"
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext2_test.txt"
TINYSTORIES = REPO.parent / "shared" / "data" / "tinystories_val.txt"


def _compile_in_child(model: str, out: Path) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "splice", "compile", model, "--recipe", "fold_norms",
                        "--out", str(out)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"compile failed: {r.stderr}")
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    report = json.loads((out / "manifest.json").read_text())["report"]
    passes_s = sum(p.get("time_s", 0) for p in report["passes"])
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {"wall_s": wall, "import_s": report["import_s"], "passes_s": passes_s,
            "peak_rss_mb": peak_mb, "artefact_mb": size / 1e6}


def _hf_reference(model: str):
    """transformers' own float32 model for the same checkpoint."""
    from transformers import AutoModelForCausalLM

    if model == "smollm2-135m":
        from splice.frontend.hf import default_model_path

        path = default_model_path()
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                    dtype=torch.float32).eval()
    return None


def _prompt_ids(art, n: int) -> list[int]:
    text = (WIKITEXT if WIKITEXT.is_file() else TINYSTORIES).read_text()[:20000]
    ids = art.tokenizer.encode(text)[:n]
    if len(ids) < n:
        raise RuntimeError("not enough text for the prompt")
    return ids


def _time_hf(hf, ids: list[int], new: int) -> dict:
    from transformers import DynamicCache

    x = torch.tensor([ids])
    with torch.no_grad():
        t0 = time.perf_counter()
        cache = DynamicCache(config=hf.config)
        out = hf(input_ids=x, past_key_values=cache, use_cache=True)
        t1 = time.perf_counter()
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(new - 1):
            out = hf(input_ids=tok, past_key_values=out.past_key_values, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
        t2 = time.perf_counter()
    return {"prefill_tok_s": len(ids) / (t1 - t0), "decode_tok_s": (new - 1) / (t2 - t1)}


def run(quick: bool = False) -> tuple[str, dict]:
    from splice.frontend import load_model
    from splice.ir import run_logits
    from splice.passes.infra.base import PassContext
    from splice.passes.fold_norms import FoldNormsPass
    from splice.runtime import load

    torch.set_num_threads(2)
    model = str(STORIES) if quick else "smollm2-135m"
    name = "stories260K" if quick else "SmolLM2-135M"
    prompt_len, new = (32, 32) if quick else (64, 128)
    res: dict = {"model": name}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "art"
        res["compile"] = _compile_in_child(model, out)
        art = load(out, threads=2)
        ids = _prompt_ids(art, prompt_len)
        x = torch.tensor([ids])
        module = load_model(model)
        imported = run_logits(module, x)["logits"]
        folded_module = FoldNormsPass()(module.clone(), PassContext()).module
        folded = run_logits(folded_module, x)["logits"]
        onnx_logits = torch.from_numpy(art.logits(np.asarray([ids]))[0])
        stages = {"import vs fold_norms (interpreter)": (folded - imported).abs().max().item(),
                  "fold_norms (interpreter) vs ONNX": (onnx_logits - folded).abs().max().item(),
                  "import vs ONNX": (onnx_logits - imported).abs().max().item(),
                  "max |logit|": imported.abs().max().item()}
        hf = _hf_reference(model)
        if hf is not None:
            with torch.no_grad():
                ref = hf(input_ids=x).logits
            stages = {"transformers vs import": (imported - ref).abs().max().item(),
                      **stages, "transformers vs ONNX": (onnx_logits - ref).abs().max().item()}
        res["logit_diff"] = stages
        gen = art.generate_ids(ids, max_new_tokens=new, stop_at_eos=False)  # warm-up
        gen = art.generate_ids(ids, max_new_tokens=new, stop_at_eos=False)
        res["speed"] = {"splice ONNX float32": {"prefill_tok_s": gen.prefill_tok_s,
                                                "decode_tok_s": gen.decode_tok_s}}
        if hf is not None:
            _time_hf(hf, ids[:8], 4)  # warm-up
            res["speed"]["Hugging Face eager float32"] = _time_hf(hf, ids, new)
    return markdown(res, prompt_len, new), res


def markdown(res: dict, prompt_len: int, new: int) -> str:
    c = res["compile"]
    lines = [f"## Foundation: {res['model']}", "",
             "| import s | passes s | compile wall s (child process) | peak RSS MB | artefact MB |",
             "| --- | --- | --- | --- | --- |",
             f"| {c['import_s']:.1f} | {c['passes_s']:.2f} | {c['wall_s']:.1f} | "
             f"{c['peak_rss_mb']:.0f} | {c['artefact_mb']:.1f} |", "",
             "Max |logit difference| along the line (float32, one prompt):", "",
             "| stage | max abs diff |", "| --- | --- |"]
    lines += [f"| {k} | {v:.3g} |" for k, v in res["logit_diff"].items()]
    lines += ["", f"Speed: prompt {prompt_len} tokens, {new} greedy tokens, 2 threads, same run:", "",
              "| engine | prefill tok/s | decode tok/s |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v['prefill_tok_s']:.1f} | {v['decode_tok_s']:.1f} |"
              for k, v in res["speed"].items()]
    sp = res["speed"]
    if "Hugging Face eager float32" in sp:
        ratio = sp["splice ONNX float32"]["decode_tok_s"] / sp["Hugging Face eager float32"]["decode_tok_s"]
        lines += ["", f"splice ONNX float32 decode / Hugging Face eager: {ratio:.2f}x"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    text, _ = run(quick="--quick" in sys.argv)
    print(text)
