"""ONNX Runtime speed: splice's artefacts beside onnxruntime-genai's model builder, same run.

SmolLM2-135M (the embedded GGUF, dequantized to float32), a 64-token prompt of WikiText-2 text,
128 greedy tokens with no EOS stop, 2 threads. Rows:
- splice ONNX float32 (contrib ops, and the standard-ops-only mode), int4 RTN groups of 32 and
  128, symmetric g32 (the builder's format), GPTQ g128 (act-order, clip search, 32 x 512
  WikiText-2 validation tokens), the same after fold norms and rotate's R1 and R2, the model
  pruned by 4 layers (prune 4 layers + patch, W4 g128 GPTQ) and the full pipeline (prune 4
  layers + patch, fold norms, rotate, W4 g128 GPTQ), also with rotate's R1 and R2 only (fused
  into the weights: no online Hadamard), all calibrated on the same 32 x 512 tokens, each run by
  splice's runtime; the int4 g32 artefact also by onnxruntime-genai, and by splice's runtime
  with ONNX Runtime's thread spinning off; int4 g32, g128 and the full pipeline also with prompt
  lookup decoding (up to LOOKAHEAD drafts a step, runtime/lookahead.py). The int4 models give
  SmolLM2's tied table an int4 copy for the lm_head (read every step, as the builder does) and
  an int8 one for the embedding (gathered one row per token; the float table would add 113 MB
  on disk for no speed);
- the int4 g32 and g128 graphs through the TVM backend too (its own kernels; the weights a step
  reads and the kernel limit from one recorded decode step, benchmarks/tvm_limits.py);
- the builder's int4 and float32 models of the same checkpoint (saved as a Hugging Face directory,
  `python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT -p int4|fp32 -e cpu`), run by
  onnxruntime-genai with the same thread count;
- Hugging Face eager float32;
- the memory-bandwidth limit of each ONNX model: the bytes of weights one decode step reads (every
  initializer except tables only gathered from) divided by the read bandwidth measured here, in
  every round, best kept: the better of numpy summing a 1 GB array and ONNX Runtime's float32
  GEMV over a 1 GB matrix (the second is the faster on this machine, and a float32 decode step
  already reads faster than the first, so a numpy-only figure overstates the share of the limit
  reached);
- the kernel limit of each ONNX model: one decode step's weight products alone (its MatMulNBits
  and MatMuls by a weight, same weights and threads, nothing else in the graph), measured in every
  round, best kept. A step can be no faster than either limit; where the kernel limit is the
  lower, what bounds a step is how fast ONNX Runtime's kernels compute, not how fast the memory
  reads.

A prompt lookup study runs the int4 g128 artefact on six prompts (WikiText-2 and TinyStories)
with and without drafts: speed-up, drafts kept, and whether the tokens are the same.

Every engine runs in its own child process (so its peak resident memory, VmHWM, is its own), one
after the other in alternating rounds; each figure is the best of the rounds. Quick mode builds a
tiny random Llama in transformers instead and runs one row of each kind of engine and of artefact
build (QUICK_ARTEFACTS; no builder float32): it checks that the benchmark runs, not how fast
anything is.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.memory_limits import (dir_mb, read_bandwidth, weight_bytes_per_step,
                                      weight_matmul_seconds)
from benchmarks.onnx_engines import LOOKAHEAD, THREADS, child

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext2_test.txt"
TINYSTORIES = REPO.parent / "shared" / "data" / "tinystories_val.txt"
WIKI_VALID = REPO.parent / "shared" / "data" / "wikitext2_valid_tokenized.txt"
LM_HEAD = "int4"  # the tied lm_head's own packed copy: see the module docstring's figures
PRUNED = "splice pruned (prune 4 + patch + W4 g128 GPTQ)"
FULL = "splice full pipeline (prune 4 + patch + rotate + W4 g128 GPTQ)"
FULL_R12 = "splice full pipeline, rotate R1 R2 only (no online Hadamard)"
G32_SYM = "splice ONNX int4 g32 symmetric (the builder's format)"
GPTQ = "splice ONNX int4 g128 GPTQ (32 x 512 calibration tokens)"
ROTATED = "splice ONNX int4 g128 GPTQ, rotate R1 R2 (no online Hadamard)"
# quick mode: ONNX float32 (contrib and standard ops), int4 RTN (and at accuracy_level 0), the TVM
# backend and the calibrated full pipeline; the rows that differ only in settings are full-mode
QUICK_ARTEFACTS = ("f32", "f32_standard", "int4_g32", "int4_g32_acc0", "tvm_int4_g32", "full")


# -- building the models -----------------------------------------------------------------------
def _hf_model(quick: bool, hf_dir: Path):
    """The transformers model (float32) and its saved directory with the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if quick:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                          num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=256, tie_word_embeddings=True,
                          bos_token_id=1, eos_token_id=2)
        hf, tok = LlamaForCausalLM(cfg).eval(), _word_tokenizer(cfg.vocab_size)
    else:
        from splice.frontend.hf import default_model_path

        gguf = default_model_path()
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not (hf_dir / "config.json").is_file():
        if getattr(hf, "hf_quantizer", None) is not None:
            # a GGUF load is marked quantized and refuses save_pretrained: the same float32
            # weights in a fresh model of the same config save as plain safetensors
            cfg = hf.config
            if hasattr(cfg, "quantization_config"):
                del cfg.quantization_config
            fresh = type(hf)(cfg).eval()
            fresh.load_state_dict(hf.state_dict())
            hf = fresh
        hf.save_pretrained(hf_dir)
        if tok is not None:
            tok.save_pretrained(hf_dir)
    return hf, tok


def _word_tokenizer(vocab: int):
    """A word-level tokenizer over the tiny model's ids (the builder wants one to load)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0", bos_token="t1",
                                   eos_token="t2")


def _builder(hf_dir: Path, out: Path, precision: str) -> Path:
    """onnxruntime-genai's builder output for `precision`, its sessions set to THREADS threads."""
    if not (out / "genai_config.json").is_file():
        with tempfile.TemporaryDirectory() as cache:
            r = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i",
                                str(hf_dir), "-o", str(out), "-p", precision, "-e", "cpu", "-c",
                                cache], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"builder -p {precision} failed:\n{r.stderr[-3000:]}")
        cfg_path = out / "genai_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["model"]["decoder"]["session_options"].update(intra_op_num_threads=THREADS,
                                                          inter_op_num_threads=1)
        cfg_path.write_text(json.dumps(cfg, indent=2))
    return out


def _splice_artefacts(module, work: Path, calib, quick: bool) -> dict[str, Path]:
    from splice.backends.onnx import export
    from splice.backends.tvm import export as export_tvm
    from splice.passes.infra.base import PassContext
    from splice.passes.quantize_weights import QuantizeWeightsPass
    from splice.recipe import GPTQ_W4, Recipe
    from splice.api import run_passes
    from splice.ir.serialize import load_module, save_module

    arts: dict[str, Path] = {}

    def make(name: str, build, tvm: bool = False, **kw) -> None:
        path = work / name
        if quick and name not in QUICK_ARTEFACTS:
            return
        if not (path / "manifest.json").is_file():
            (export_tvm if tvm else export)(build(), path, threads=THREADS, **kw)
        arts[name] = path

    def w4(group: int, base=None, **settings):
        # the tied table: an int4 copy for the lm_head (read every step), an int8 one gathered
        # for the embedding (instead of the float table: a smaller artefact, the same speed)
        return lambda: QuantizeWeightsPass(method="rtn", bits=4, group_size=group,
                                           lm_head=LM_HEAD, embeddings="int8", **settings)(
            base() if base else module.clone(), PassContext()).module

    make("f32", lambda: module)
    make("f32_standard", lambda: module, ops="standard")
    make("int4_g32", w4(32))
    make("int4_g32_acc0", w4(32), accuracy_level=0)
    make("int4_g32_sym", w4(32, symmetric=True))
    make("int4_g128", w4(128))
    for group in (32, 128):  # the same graphs through the TVM backend
        make(f"tvm_int4_g{group}", w4(group), tvm=True)
    prune = Recipe.named("prune4_patch").passes
    gptq = ("quantize_weights", {**GPTQ_W4, "lm_head": LM_HEAD, "embeddings": "int8"})

    def pipeline(name: str, passes: tuple):
        # the calibrated passes are the slow part: their module is kept in `work`
        saved = work / f"{name}_module.splice"

        def build():
            if saved.is_file():
                return load_module(saved)
            out = run_passes(module.clone(), Recipe(name, passes), calibration=calib)[0]
            save_module(out, saved)
            return out
        return build
    make("int4_g128_gptq", pipeline("gptq", (gptq,)))
    r12 = ("rotate", {"r4": False})
    make("int4_g128_gptq_r12", pipeline("gptq_r12", (("fold_norms", {}), r12, gptq)))
    make("pruned", pipeline("pruned_gptq", (*prune, gptq)))
    make("full", pipeline("full_gptq", (*prune, ("rotate", {}), gptq)))
    # R4 (the online Hadamard before down_proj) is there for activation quantization; with
    # weights only quantized, R1 and R2 (fused into the weights) do nearly all of the good
    make("full_r12", pipeline("full_r12_gptq", (*prune, r12, gptq)))
    return arts


def _prompt(tok, quick: bool, n: int) -> list[int]:
    if quick:
        return [int(x) for x in np.random.default_rng(0).integers(3, 512, n)]
    text = (WIKITEXT if WIKITEXT.is_file() else TINYSTORIES).read_text()[:20000]
    ids = tok(text)["input_ids"][:n]
    if len(ids) < n:
        raise RuntimeError("not enough text for the prompt")
    return ids


def _study_prompts(tok, quick: bool, n: int) -> list[list[int]]:
    """Prompts for the prompt lookup study: WikiText-2 and TinyStories from several places (the
    first is the timing prompt); quick mode, random ids."""
    if quick:
        rng = np.random.default_rng(2)
        return [[int(x) for x in rng.integers(3, 512, n)] for _ in range(3)]
    prompts = [_prompt(tok, quick, n)]
    for path, offset in ((WIKITEXT, 30000), (WIKITEXT, 90000), (WIKITEXT, 200000),
                         (TINYSTORIES, 5000), (TINYSTORIES, 50000)):
        prompts.append(tok(path.read_text()[offset:offset + 2000])["input_ids"][:n])
    return prompts


def _calibration(module, tok, quick: bool):
    """For every calibrated pass (GPTQ, layer selection, the patch): 32 x 512 tokens of
    WikiText-2's validation text (the quantization benchmark's source, a quarter of its recipe's
    128); the perplexity is measured on the test text. Random ids in quick mode."""
    import torch

    if quick:
        return torch.randint(3, 512, (8, 64), generator=torch.Generator().manual_seed(3))
    from splice.api import calibration_batches

    ids = tok(WIKI_VALID.read_text()[:400000])["input_ids"]
    return calibration_batches(module, ids, seq_len=512, max_batches=32)


def _eval_ids(tok, quick: bool) -> tuple[list[int], int]:
    """(tokens, window) for perplexity: the first 16384 tokens of WikiText-2's test text in
    1024-token windows (the quantization benchmark's protocol); quick, 256 random ids in 64s."""
    if quick:
        return [int(x) for x in np.random.default_rng(4).integers(3, 512, 256)], 64
    return tok(WIKITEXT.read_text()[:200000])["input_ids"][:16384], 1024


def run(quick: bool = False, work: str | Path | None = None, rounds: int | None = None
        ) -> tuple[str, dict]:
    """Build every model (kept in `work` when given, so a second run only times), then time the
    engines in alternating rounds."""
    import torch

    torch.set_num_threads(THREADS)
    from splice.frontend import load_model
    from splice.runtime import load

    prompt_len, new = (16, 8) if quick else (64, 128)
    rounds = rounds or (1 if quick else 3)
    tmp = None
    if work is None:
        tmp = tempfile.TemporaryDirectory()
        work = tmp.name
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        hf_dir = work / "hf"
        hf, tok = _hf_model(quick, hf_dir)
        module = load_model(hf) if quick else load_model("smollm2-135m")
        del hf
        ids = _prompt(tok, quick, prompt_len)
        ids_file = work / "prompt.json"
        ids_file.write_text(json.dumps(ids))
        study_file = work / "study_prompts.json"
        study_file.write_text(json.dumps(_study_prompts(tok, quick, prompt_len)))
        t0 = time.perf_counter()
        arts = _splice_artefacts(module, work, _calibration(module, tok, quick), quick)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        b4 = _builder(hf_dir, work / "builder_int4", "int4")
        b32 = None if quick else _builder(hf_dir, work / "builder_fp32", "fp32")
        builder_s = time.perf_counter() - t0
        a = arts.get  # quick mode lacks some: their rows are left out
        engines = {
            "splice ONNX int4 g32": ("splice", arts["int4_g32"]),
            "builder int4 (onnxruntime-genai)": ("genai", b4),
            "splice ONNX int4 g128": ("splice", a("int4_g128")),
            **{f"splice TVM int4 g{g}": ("splice", a(f"tvm_int4_g{g}")) for g in (32, 128)},
            G32_SYM: ("splice", a("int4_g32_sym")),
            GPTQ: ("splice", a("int4_g128_gptq")),
            ROTATED: ("splice", a("int4_g128_gptq_r12")),
            f"splice ONNX int4 g32, prompt lookup (up to {LOOKAHEAD} drafts)":
                ("splice_lookahead", arts["int4_g32"]),
            f"splice ONNX int4 g128, prompt lookup (up to {LOOKAHEAD} drafts)":
                ("splice_lookahead", a("int4_g128")),
            "splice ONNX int4 g32, threads not spinning": ("splice_nospin", arts["int4_g32"]),
            "builder int4 (onnxruntime-genai), threads not spinning": ("genai_nospin", b4),
            "splice int4 g32 run by onnxruntime-genai": ("genai", arts["int4_g32"]),
            PRUNED: ("splice", a("pruned")),
            FULL: ("splice", arts["full"]),
            FULL_R12: ("splice", a("full_r12")),
            f"splice full pipeline, prompt lookup (up to {LOOKAHEAD} drafts)":
                ("splice_lookahead", arts["full"]),
            "splice ONNX float32": ("splice", arts["f32"]),
            "builder float32 (onnxruntime-genai)": ("genai", b32),
            "splice ONNX float32, standard ops only": ("splice", arts["f32_standard"]),
            "Hugging Face eager float32": ("hf", hf_dir),
        }
        engines = {name: e for name, e in engines.items() if e[1] is not None}
        models = {name: engines[name][1] / "model.onnx" for name in (
            "splice ONNX int4 g32", "splice ONNX int4 g128", PRUNED, G32_SYM, GPTQ, ROTATED, FULL,
            FULL_R12, "splice ONNX float32", "builder int4 (onnxruntime-genai)",
            "builder float32 (onnxruntime-genai)") if name in engines}
        tvm_groups = [g for g in (32, 128) if f"tvm_int4_g{g}" in arts]
        best: dict[str, dict] = {}
        bandwidth: dict[str, float] = {}
        products: dict[str, float] = {}  # seconds of a step's weight products alone, best
        tvm_bytes: dict[str, int] = {}
        per_round: dict[str, list[float]] = {}  # decode tok/s of every round
        for _ in range(rounds):
            for name, (kind, path) in engines.items():
                r = child(kind, path, ids_file, new)
                per_round.setdefault(name, []).append(r["decode_tok_s"])
                b = best.setdefault(name, dict(r))
                for k in ("prefill_tok_s", "decode_tok_s"):
                    b[k] = max(b[k], r[k])
                b["peak_rss_mb"] = min(b["peak_rss_mb"], r["peak_rss_mb"])
            # the machine's bandwidth moves as the engines' speed does: measured every round
            # between them, the best kept, as for the engines
            for k, v in read_bandwidth(0.25 if quick else 1.0, threads=THREADS).items():
                bandwidth[k] = max(bandwidth.get(k, 0.0), v)
            for name, path in models.items():
                t = weight_matmul_seconds(path, threads=THREADS, runs=5 if quick else 20)
                products[name] = min(products.get(name, float("inf")), t)
            for g in tvm_groups:  # the TVM artefacts' own (benchmarks/tvm_limits.py)
                r = child("tvm_limits", arts[f"tvm_int4_g{g}"], ids_file, 5 if quick else 20)
                products[f"splice TVM int4 g{g}"] = min(products.get(
                    f"splice TVM int4 g{g}", float("inf")), r["product_s"])
                tvm_bytes[f"splice TVM int4 g{g}"] = r["weight_bytes"]
        study = child("lookahead_study", a("int4_g128", arts["int4_g32"]), study_file, new)
        bw = bandwidth["best"]
        dirs = {k: p for k, (_, p) in engines.items()}
        eval_ids, window = _eval_ids(tok, quick)
        eval_file = work / "eval_ids.json"
        eval_file.write_text(json.dumps(eval_ids))
        for name, row in best.items():
            row["size_mb"] = dir_mb(dirs[name])
            if name in models or name in tvm_bytes:
                row["weight_mb_per_step"] = (tvm_bytes[name] if name in tvm_bytes else
                                             weight_bytes_per_step(models[name])) / 1e6
                row["limit_tok_s"] = bw / (row["weight_mb_per_step"] * 1e6)
                row["kernel_limit_tok_s"] = 1 / products[name]
                # what the speed is bought with: perplexity of each model, in its own process
                kind = "genai_ppl" if name.startswith("builder") else "splice_ppl"
                row["ppl"] = child(kind, dirs[name], eval_file, window)["ppl"]
        # this shared machine's speed moves over minutes: beside best against best, each
        # round's ratio to the builder's int4 (run minutes apart at most), their median and range
        b4_rounds = per_round["builder int4 (onnxruntime-genai)"]
        for name, row in best.items():
            ratios = sorted(t / b for t, b in zip(per_round[name], b4_rounds))
            row["vs_builder_int4_by_round"] = ratios
        # what accuracy_level 4 (int8 activations) costs against 0 (float32 compute)
        a4, a0 = load(arts["int4_g32"], threads=THREADS), load(arts["int4_g32_acc0"],
                                                               threads=THREADS)
        l4, l0 = a4.logits(np.asarray([ids]))[0], a0.logits(np.asarray([ids]))[0]
        lf = load(arts["f32"], threads=THREADS).logits(np.asarray([ids]))[0]

        def error(a: np.ndarray, b: np.ndarray) -> dict:
            return {"max_abs_logit_diff": float(np.abs(a - b).max()),
                    "rel_rms": float(np.sqrt(((a - b) ** 2).mean() / (b ** 2).mean())),
                    "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean())}
        acc = error(l4, l0)
        w4_error = error(l0, lf)
        res = {"model": "tiny random Llama" if quick else "SmolLM2-135M", "rounds": rounds,
               "prompt_tokens": prompt_len, "new_tokens": new, "threads": THREADS,
               "ppl_tokens": len(eval_ids), "ppl_window": window,
               "ppl_text": "random ids" if quick else "WikiText-2's test text",
               "bandwidth_gb_s": bw / 1e9,
               "bandwidth_by_method_gb_s": {k: v / 1e9 for k, v in bandwidth.items()},
               "build_s": build_s, "builder_s": builder_s,
               "accuracy_level_4_vs_0": acc, "int4_g32_vs_float32": w4_error, "speed": best,
               "same_tokens_genai_vs_splice": best["splice int4 g32 run by onnxruntime-genai"][
                   "tokens"] == best["splice ONNX int4 g32"]["tokens"],
               "lookahead": LOOKAHEAD, "lookahead_study": study["rows"],
               "study_on": "int4 g128" if "int4_g128" in arts else "int4 g32",
               "same_tokens_lookahead_vs_plain": {
                   name: best[f"{name}, prompt lookup (up to {LOOKAHEAD} drafts)"]["tokens"]
                   == best[name]["tokens"] for name in ("splice ONNX int4 g32",
                                                        "splice ONNX int4 g128") if name in best}}
        return markdown(res), res
    finally:
        if tmp is not None:
            tmp.cleanup()


def markdown(res: dict) -> str:
    sp = res["speed"]
    lines = [f"## ONNX Runtime speed: {res['model']}", "",
             f"Prompt {res['prompt_tokens']} tokens, {res['new_tokens']} greedy tokens (no EOS "
             f"stop), {res['threads']} threads, every engine in its own process, best of "
             f"{res['rounds']} alternating rounds. Read bandwidth (best of the rounds): "
             f"{res['bandwidth_gb_s']:.1f} GB/s (numpy sum "
             f"{res['bandwidth_by_method_gb_s']['numpy_sum']:.1f}, ONNX Runtime float32 GEMV "
             f"{res['bandwidth_by_method_gb_s']['ort_gemv']:.1f}). Perplexity: the first "
             f"{res['ppl_tokens']} tokens of {res['ppl_text']} in {res['ppl_window']}-token "
             "windows, through the engine's own runtime.", "",
             "| engine | prefill tok/s | decode tok/s | weights read / step MB | limit tok/s | "
             "% of limit | kernel limit tok/s | % of it | WikiText-2 ppl | size MB | "
             "peak RSS MB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in sp.items():
        lim = r.get("limit_tok_s")
        limit = "" if lim is None else f"{lim:.0f} | {100 * r['decode_tok_s'] / lim:.0f}%"
        klim = r.get("kernel_limit_tok_s")
        kernel = "" if klim is None else f"{klim:.0f} | {100 * r['decode_tok_s'] / klim:.0f}%"
        weights = f"{r['weight_mb_per_step']:.1f}" if "weight_mb_per_step" in r else ""
        ppl = f"{r['ppl']:.2f}" if "ppl" in r else ""
        lines.append(f"| {name} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {weights} | "
                     f"{limit or ' | '} | {kernel or ' | '} | {ppl} | {r['size_mb']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} |")
    b4 = sp["builder int4 (onnxruntime-genai)"]["decode_tok_s"]
    b4_ppl = sp["builder int4 (onnxruntime-genai)"]["ppl"]
    nospin = (sp["splice ONNX int4 g32, threads not spinning"]["decode_tok_s"]
              / sp["builder int4 (onnxruntime-genai), threads not spinning"]["decode_tok_s"])
    acc = res["accuracy_level_4_vs_0"]
    def tvm_vs(group: int, what: str) -> str:
        t, o = sp[f"splice TVM int4 g{group}"], sp[f"splice ONNX int4 g{group}"]
        return f"{t[f'{what}_tok_s'] / o[f'{what}_tok_s']:.2f}x"

    def by_round(name: str) -> str:
        r = sp[name]["vs_builder_int4_by_round"]
        return f"{statistics.median(r):.2f}x" + (f" [{r[0]:.2f}-{r[-1]:.2f}]" if len(r) > 1
                                                  else "")

    lines += ["", "Decode against the builder's int4, best against best, then the median "
              "[range] of the rounds' own ratios (perplexity beside it, the builder's "
              f"{b4_ppl:.2f}): " + "; ".join(
                  f"{name[len('splice ONNX '):] if name.startswith('splice ONNX ') else name} "
                  f"{sp[name]['decode_tok_s'] / b4:.2f}x, {by_round(name)} (ppl "
                  f"{sp[name]['ppl']:.2f})"
                  for name in ("splice ONNX int4 g32", G32_SYM, "splice ONNX int4 g128", GPTQ,
                               ROTATED, FULL, FULL_R12) if name in sp)
              + f"; threads not spinning, int4 g32: {nospin:.2f}x.",
              f"onnxruntime-genai and splice's runtime give the same greedy tokens for the g32 "
              f"artefact: {res['same_tokens_genai_vs_splice']}.",
              "TVM against splice's ONNX artefact of the same graph, best against best: "
              + "; ".join(f"g{g} decode {tvm_vs(g, 'decode')}, prefill {tvm_vs(g, 'prefill')}"
                          for g in (32, 128) if f"splice TVM int4 g{g}" in sp) + ".",
              f"MatMulNBits accuracy_level 4 (int8 activations) against 0 (float32), int4 g32, "
              f"prompt logits: max |diff| {acc['max_abs_logit_diff']:.3g}, relative RMS "
              f"{acc['rel_rms']:.2g}, top-1 agreement {100 * acc['top1_agreement']:.0f}%; for "
              f"scale, W4 g32 itself (accuracy_level 0) against float32: relative RMS "
              f"{res['int4_g32_vs_float32']['rel_rms']:.2g}, top-1 agreement "
              f"{100 * res['int4_g32_vs_float32']['top1_agreement']:.0f}%."]
    if all(n in sp for n in (GPTQ, PRUNED, FULL, FULL_R12)):  # not in quick mode
        g128, pruned = sp[GPTQ], sp[PRUNED]
        full, r12 = sp[FULL], sp[FULL_R12]
        lines += ["", "Pruned by 4 layers: decode "
                  f"{pruned['decode_tok_s'] / g128['decode_tok_s']:.2f}x the int4 g128 GPTQ "
                  f"model's, for {g128['weight_mb_per_step'] / pruned['weight_mb_per_step']:.2f}x"
                  f" fewer weights read a step (in proportion when the two agree); with rotation "
                  f"too (the full pipeline: an online Hadamard before each down_proj) "
                  f"{full['decode_tok_s'] / g128['decode_tok_s']:.2f}x, with R1 and R2 only (no "
                  f"online Hadamard) {r12['decode_tok_s'] / g128['decode_tok_s']:.2f}x at ppl "
                  f"{r12['ppl']:.2f} (R4 too: {full['ppl']:.2f})."]
    k = res["lookahead"]
    ahead = {name: sp[f"{name}, prompt lookup (up to {k} drafts)"] for name in (
        "splice ONNX int4 g32", "splice ONNX int4 g128")
        if f"{name}, prompt lookup (up to {k} drafts)" in sp}
    lines += ["", f"Prompt lookup decoding (up to {k} drafts a step, adapted; greedy; the limit "
              f"above is per step, and a step here keeps several tokens): " + "; ".join(
                  f"{name[len('splice ONNX '):]} {r['decode_tok_s']:.0f} tok/s = "
                  f"{r['decode_tok_s'] / b4:.2f}x the builder's int4, "
                  f"{res['new_tokens'] - 1} tokens in {r['decode_steps']} steps, "
                  f"{r['accepted']} of {r['drafted']} drafts kept, same tokens as one token a "
                  f"step: {res['same_tokens_lookahead_vs_plain'][name]}"
                  for name, r in ahead.items()) + ".", "",
              f"Prompt lookup on more prompts ({res['study_on']}, {res['new_tokens']} greedy "
              "tokens, best of 2 each):", "",
              "| prompt | one token a step tok/s | prompt lookup tok/s | speed-up | steps | "
              "drafts kept | same tokens |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for i, r in enumerate(res["lookahead_study"]):
        same = "yes" if r["same_tokens"] else f"from token {r['first_difference']}"
        lines.append(f"| {i} | {r['plain_tok_s']:.0f} | {r['lookahead_tok_s']:.0f} | "
                     f"{r['lookahead_tok_s'] / r['plain_tok_s']:.2f}x | {r['steps']} | "
                     f"{r['accepted']}/{r['drafted']} | {same} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from benchmarks.section import section_main

    section_main("benchmarks.onnx_speed", run)
