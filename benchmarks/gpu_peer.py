"""onnxruntime-genai's side of the GPU benchmark (gpu.py): the builder's CUDA models of the same
checkpoint, and the generator that times them and splice's ONNX artefacts alike (its cache stays on
the device, bound in place between steps)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def speed_genai(path: Path, ids: list[int], batch: int, *, steps: int,
                repeats: int) -> dict[str, float]:
    """gpu.py's protocol through onnxruntime-genai: prefill, then `steps` greedy steps, best of
    `repeats` (its cache stays on the device)."""
    import onnxruntime_genai as og

    model = og.Model(og.Config(str(path)))
    rows = np.asarray([ids] * batch, np.int32)
    best = {"prefill_tok_s": 0.0, "decode_tok_s": 0.0}
    for _ in range(repeats):
        params = og.GeneratorParams(model)
        length = len(ids) + steps + 1
        params.set_search_options(max_length=length, min_length=length, do_sample=False,
                                  batch_size=batch)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(rows)
        gen.generate_next_token()  # the first token comes from the prompt's logits
        gen.get_next_tokens()
        t1 = time.perf_counter()
        for _ in range(steps):
            gen.generate_next_token()
        gen.get_next_tokens()
        t2 = time.perf_counter()
        best["prefill_tok_s"] = max(best["prefill_tok_s"], batch * len(ids) / (t1 - t0))
        best["decode_tok_s"] = max(best["decode_tok_s"], batch * steps / (t2 - t1))
    return best


def hf_dir_from_gguf(gguf: Path, out: Path) -> Path:
    """The GGUF as a Hugging Face directory of float32 safetensors (what the builder reads)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                              dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cfg = hf.config
    if hasattr(cfg, "quantization_config"):  # a GGUF load is marked quantized: save a fresh copy
        del cfg.quantization_config
    fresh = type(hf)(cfg).eval()
    fresh.load_state_dict(hf.state_dict())
    fresh.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def builder(hf_dir: Path, out: Path, precision: str) -> Path:
    with tempfile.TemporaryDirectory() as cache:
        r = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i",
                            str(hf_dir), "-o", str(out), "-p", precision, "-e", "cuda", "-c",
                            cache], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"builder -p {precision} -e cuda failed: {r.stderr[-1500:]}")
    return out
