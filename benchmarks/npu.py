"""NPU backend figures: what an NPU user needs to know about a compiled model, measured on the HTP
backend that the onnxruntime-qnn wheel ships for x86-64 (it simulates Qualcomm's NPU on this CPU:
its wall times are simulation times, not device times, and are not reported as speed).

Per graph (prefill chunk, decode): HTP partitions (must be 1), ops by type, weight bytes,
activation bit-widths, context binary size. Then on real text: logit differences between the HTP,
ONNX Runtime CPU on the same QDQ graphs and splice's reference interpreter (float32, the IR's
integer semantics for its quantized nodes); where greedy text first differs; perplexity through
the HTP, through the QDQ graphs on the CPU and through the float32 reference; and the EPContext
load time (the pre-compiled binary) beside compiling the QDQ source on the HTP, best of
`REPEATS` alternating rounds.

Full mode: SmolLM2-135M, calibrated on WikiText-2 valid, evaluated on the first EVAL_TOKENS tokens
of WikiText-2 test. Quick mode: stories260K, calibrated on the start of TinyStories valid and
evaluated on its last tokens (the model knows no other text). The recipe is npu_w8a16 (int8
symmetric per-channel weights, 16-bit activations).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
STORIES = REPO.parent / "shared" / "models" / "stories260K" / "stories260K.bin"
REPEATS = 3
EVAL_TOKENS = 4096


def run(quick: bool = False, eval_tokens: int | None = None) -> tuple[str, dict]:
    from benchmarks.npu_compare import compare, cpu_decoder, greedy, greedy_reference, localize
    from splice.api import run_passes
    from splice.backends.npu import export
    from splice.evaluate import perplexity
    from splice.frontend import load_model
    from splice.ir import run_logits
    from splice.recipe import Recipe
    from splice.runtime import load
    from splice.frontend.text import encode_text, read_text

    name = "stories260K" if quick else "SmolLM2-135M"
    module = load_model(str(STORIES) if quick else "smollm2-135m")
    chunk, context = 64, 256
    if quick:
        ids = encode_text(module, read_text(DATA / "tinystories_val.txt"))
        calib_ids, eval_ids = ids[:8 * context], ids[-(eval_tokens or 2048):]
        eval_text = "TinyStories valid (last tokens)"
    else:
        calib_ids = encode_text(module, read_text(DATA / "wikitext2_valid_tokenized.txt")[:200000])
        eval_ids = encode_text(module, read_text(DATA / "wikitext2_test.txt"))[
            :eval_tokens or EVAL_TOKENS]
        eval_text = "WikiText-2 test (first tokens)"
    calib = torch.tensor(calib_ids[:8 * context]).reshape(8, context)
    recipe = Recipe.named("npu_w8a16")
    res: dict = {"model": name, "recipe": recipe.name, "chunk": chunk, "context": context,
                 "eval_text": eval_text, "eval_tokens": len(eval_ids)}
    qmodule, _ = run_passes(module, recipe, calibration=calib)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = export(qmodule, Path(tmp) / "npu", calibration=calib, chunk=chunk,
                      context=context)
        res["export_s"] = time.perf_counter() - t0
        art = load(path)
        npu = art.manifest["npu"]
        res["graphs"] = npu["figures"]
        res["act_bits"], res["weight_bits"] = npu["act_bits"], npu["weight_bits"]
        res["artefact_mb"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6
        # EPContext load against compiling the QDQ source on the HTP, alternating
        loads = {"EPContext": [], "QDQ source (compile)": []}
        res["repeats"] = REPEATS if quick else 1  # a SmolLM2 compile takes the simulator minutes
        for _ in range(res["repeats"]):
            for label, source in (("EPContext", False), ("QDQ source (compile)", True)):
                a = load(path, source=source)
                loads[label].append(sum(a.session_s.values()))
        res["session_s"] = {k: min(v) for k, v in loads.items()}
        # decode steps cost the simulator ~30 s each on SmolLM2 (2 shared cores): fewer there
        probe = eval_ids[:chunk + (64 if quick else 4)]
        res["logits"] = compare(qmodule, art, probe, prompt=chunk)
        rows = localize(art, eval_ids[:chunk])
        res["localize"] = {"tensors": len(rows), "final_rel_rms": rows[-1]["rel_rms"],
                           "largest_jumps": [r for r in rows if r.get("flag")]}
        prompt = eval_ids[:16]
        steps = 16 if quick else 6
        texts = {"HTP": greedy(art.decoder, prompt, steps),
                 "ORT CPU (same QDQ)": greedy(cpu_decoder(art), prompt, steps),
                 "reference (W8 IR)": greedy_reference(qmodule, prompt, steps)}
        res["greedy"] = {k: {"ids": v, "text": art.tokenizer.decode(v),
                             "first_diff_vs_htp": _first_diff(texts["HTP"], v)}
                         for k, v in texts.items()}
        window = context - 1
        bos = module.config.bos_token_id if module.tokenizer.kind == "llama2c" else None
        window = window if bos is not None else context
        cpu = cpu_decoder(art)

        def npu_fn(dec):
            def fn(x: np.ndarray) -> np.ndarray:
                return dec.forward([int(t) for t in x[0]], dec.empty())[None]
            return fn

        res["ppl"] = {}
        t0 = time.perf_counter()
        res["ppl"]["HTP (W8A16 QDQ)"] = perplexity(npu_fn(art.decoder), eval_ids, window=window,
                                                   bos=bos)["ppl"]
        res["htp_eval_sim_s"] = time.perf_counter() - t0
        res["ppl"]["ORT CPU (same QDQ graphs)"] = perplexity(npu_fn(cpu), eval_ids,
                                                             window=window, bos=bos)["ppl"]
        res["ppl"]["reference W8 (IR, float activations)"] = perplexity(
            lambda x: run_logits(qmodule, torch.from_numpy(x))["logits"].numpy(), eval_ids,
            window=window, bos=bos)["ppl"]
        res["ppl"]["reference float32"] = perplexity(
            lambda x: run_logits(module, torch.from_numpy(x))["logits"].numpy(), eval_ids,
            window=window, bos=bos)["ppl"]
    return markdown(res), res


def _first_diff(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token, None when equal over the shorter."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def markdown(res: dict) -> str:
    lines = [f"## NPU (Qualcomm HTP via QNN, simulated on x86-64): {res['model']}", "",
             f"Recipe {res['recipe']}: int{res['weight_bits']} symmetric per-channel weights, "
             f"{res['act_bits']}-bit static activations (calibrated min/max), prefill chunk "
             f"{res['chunk']}, context {res['context']}. CPU fallback disabled; simulator time "
             "is not device time, so no speed is reported.", "",
             "| graph | HTP partitions | nodes (compute) | weight bytes | activation types | "
             "context binary MB |", "| --- | --- | --- | --- | --- | --- |"]
    for g, f in res["graphs"].items():
        compute = sum(f["compute_ops"].values())
        lines.append(f"| {g} | {f['partitions']} | {f['nodes']} ({compute}) | "
                     f"{_bytes(f['weight_bytes'])} | "
                     f"{', '.join(f'{k} x{v}' for k, v in f['activation_types'].items())} | "
                     f"{f['context_binary_bytes'] / 1e6:.1f} |")
    g0 = next(iter(res["graphs"].values()))
    lines += ["", "Compute ops by type (prefill): " + ", ".join(
        f"{k} {v}" for k, v in g0["compute_ops"].items()), ""]
    lg = res["logits"]
    lines += [f"Logits over {lg['tokens']} tokens ({lg['prompt']} prefill, then decode):", "",
              "| pair | max abs | mean abs | rel RMS | top-1 agreement |",
              "| --- | --- | --- | --- | --- |"]
    for k in ("htp_vs_cpu_qdq", "htp_vs_reference", "cpu_qdq_vs_reference"):
        d = lg[k]
        lines.append(f"| {k.replace('_', ' ')} | {d['max_abs']:.3g} | {d['mean_abs']:.3g} | "
                     f"{d['rel_rms']:.3g} | {d['argmax_agree']:.3f} |")
    loc = res["localize"]
    lines += ["", f"Where the HTP departs from the CPU inside the prefill graph ({loc['tensors']} "
              "quantized activations compared; the largest steps in relative RMS difference):",
              "", "| tensor | IR op | role | layer | rel RMS | step |", "| --- | --- | --- | --- "
              "| --- | --- |"]
    lines += [f"| {r['tensor']} | {r['ir_op']} | {r['role']} | {r['layer']} | "
              f"{r['rel_rms']:.3g} | {r['jump']:.3g} |"
              for r in sorted(loc["largest_jumps"], key=lambda r: -r["jump"])[:5]]
    lines += ["", f"Perplexity, {res['eval_tokens']} tokens of {res['eval_text']}:", "",
              "| engine | perplexity |", "| --- | --- |"]
    lines += [f"| {k} | {v:.3f} |" for k, v in res["ppl"].items()]
    lines += ["", "Greedy continuation of the first 16 eval tokens (index of the first token "
              "that differs "
              "from the HTP's):", "", "| engine | first diff | text |", "| --- | --- | --- |"]
    for k, v in res["greedy"].items():
        text = v["text"].replace("\n", " ").replace("|", "/")[:80]
        lines.append(f"| {k} | {v['first_diff_vs_htp']} | {text} |")
    s = res["session_s"]
    lines += ["", f"Session creation, best of {res['repeats']}: EPContext {s['EPContext']:.3f} s, "
              f"compiling the QDQ source {s['QDQ source (compile)']:.3f} s "
              f"({s['QDQ source (compile)'] / max(s['EPContext'], 1e-9):.0f}x). Export "
              f"{res['export_s']:.0f} s; artefact {res['artefact_mb']:.1f} MB (QDQ sources and "
              "context binaries of both graphs)."]
    return "\n".join(lines) + "\n"


def _bytes(d: dict) -> str:
    return ", ".join(f"{k} {v / 1e6:.2f} MB" if v >= 1e5 else f"{k} {v} B"
                     for k, v in sorted(d.items(), key=lambda kv: -kv[1]))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="python -m benchmarks.npu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--eval-tokens", type=int, default=None)
    a = ap.parse_args()
    print(run(quick=a.quick, eval_tokens=a.eval_tokens)[0])
