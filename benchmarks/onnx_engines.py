"""The engines of the ONNX speed benchmark, each run in a child process of its own
(`python -m benchmarks.onnx_engines KIND PATH IDS_FILE NEW`), so that its peak resident memory
(VmHWM) is its own: splice's runtime (one token a step, threads not spinning, prompt lookup),
onnxruntime-genai, Hugging Face eager, the prompt lookup study over several prompts, and
perplexity through splice's runtime or onnxruntime-genai (NEW is then the window)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
THREADS = 2
LOOKAHEAD = 8  # the most draft tokens a step, prompt lookup rows (runtime/lookahead.py)


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_splice(path: str, ids: list[int], new: int, spinning: bool | None = None,
                lookahead: int = 0) -> dict:
    from splice.runtime import load

    # `spinning` is ONNX Runtime's option: passed only when set, so a TVM artefact loads too
    options = {} if spinning is None else {"spinning": spinning}
    art = load(path, threads=THREADS, **options)
    art.generate_ids(ids[:8], max_new_tokens=4, stop_at_eos=False)  # warm-up
    g = art.generate_ids(ids, max_new_tokens=new, stop_at_eos=False, lookahead=lookahead)
    return {"prefill_tok_s": g.prefill_tok_s, "decode_tok_s": g.decode_tok_s, "tokens": g.ids,
            "decode_steps": g.decode_steps, "drafted": g.drafted, "accepted": g.accepted}


def _lookahead_study(path: str, prompts: list[list[int]], new: int) -> dict:
    """Prompt lookup against one token a step on several prompts, same artefact and process:
    decode tok/s of each (best of 2), the drafts kept, and whether the tokens are the same."""
    from splice.runtime import load

    art = load(path, threads=THREADS)
    art.generate_ids(prompts[0][:8], max_new_tokens=4, stop_at_eos=False)
    rows = []
    for ids in prompts:
        runs = {k: [art.generate_ids(ids, max_new_tokens=new, stop_at_eos=False, lookahead=k)
                    for _ in range(2)] for k in (0, LOOKAHEAD)}
        plain, ahead = runs[0][0].ids, runs[LOOKAHEAD][0].ids
        first = next((i for i, (a, b) in enumerate(zip(plain, ahead)) if a != b), None)
        rows.append({"plain_tok_s": max(g.decode_tok_s for g in runs[0]),
                     "lookahead_tok_s": max(g.decode_tok_s for g in runs[LOOKAHEAD]),
                     "steps": runs[LOOKAHEAD][0].decode_steps,
                     "drafted": runs[LOOKAHEAD][0].drafted,
                     "accepted": runs[LOOKAHEAD][0].accepted,
                     "same_tokens": plain == ahead, "first_difference": first})
    return {"rows": rows}


def _run_genai(path: str, ids: list[int], new: int, spinning: bool = True) -> dict:
    import onnxruntime_genai as og

    config = og.Config(path)
    if not spinning:  # a session option genai_config.json accepts, overlaid on the file's
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "session.intra_op.allow_spinning": "0"}}}}))
    model = og.Model(config)

    def generate(prompt: list[int], n: int) -> tuple[float, float, list[int]]:
        params = og.GeneratorParams(model)
        length = len(prompt) + n
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(prompt)
        t1 = time.perf_counter()
        out = []
        gen.generate_next_token()  # samples from the prompt's logits: no model run
        out.append(int(gen.get_next_tokens()[0]))
        t2 = time.perf_counter()
        for _ in range(n - 1):
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
        t3 = time.perf_counter()
        return t1 - t0, t3 - t2, out
    generate(ids[:8], 4)
    pre, dec, out = generate(ids, new)
    return {"prefill_tok_s": len(ids) / pre, "decode_tok_s": (new - 1) / dec, "tokens": out}


def _run_hf(path: str, ids: list[int], new: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(THREADS)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def generate(prompt: list[int], n: int) -> tuple[float, float, list[int]]:
        with torch.no_grad():
            t0 = time.perf_counter()
            out = hf(input_ids=torch.tensor([prompt]), past_key_values=DynamicCache(
                config=hf.config), use_cache=True)
            t1 = time.perf_counter()
            tok = out.logits[:, -1:].argmax(-1)
            toks = [int(tok)]
            for _ in range(n - 1):
                out = hf(input_ids=tok, past_key_values=out.past_key_values, use_cache=True)
                tok = out.logits[:, -1:].argmax(-1)
                toks.append(int(tok))
            t2 = time.perf_counter()
        return t1 - t0, t2 - t1, toks
    generate(ids[:8], 4)
    pre, dec, out = generate(ids, new)
    return {"prefill_tok_s": len(ids) / pre, "decode_tok_s": (new - 1) / dec, "tokens": out}


def _perplexity(kind: str, path: str, ids: list[int], window: int) -> dict:
    """Perplexity over non-overlapping windows of `ids` (splice.evaluate's protocol), through
    splice's runtime or, for the builder's models, onnxruntime-genai (its logits of a whole
    window from one append)."""
    import numpy as np

    from splice.evaluate import perplexity

    if kind == "splice":
        from splice.runtime import load

        art = load(path, threads=THREADS)

        def logits(x: np.ndarray) -> np.ndarray:
            return art.logits(x)[0]
    else:
        import onnxruntime_genai as og

        model = og.Model(path)

        def logits(x: np.ndarray) -> np.ndarray:
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=x.shape[1] + 1)
            gen = og.Generator(model, params)
            gen.append_tokens(x[0].astype(np.int32))
            return np.asarray(gen.get_output("logits"))
    return {"ppl": perplexity(logits, ids, window=window)["ppl"]}


WORKERS = {"splice": _run_splice, "genai": _run_genai, "hf": _run_hf,
           "splice_nospin": lambda path, ids, new: _run_splice(path, ids, new, spinning=False),
           "splice_lookahead": lambda path, ids, new: _run_splice(path, ids, new,
                                                                  lookahead=LOOKAHEAD),
           "lookahead_study": _lookahead_study,
           "splice_ppl": lambda path, ids, window: _perplexity("splice", path, ids, window),
           "genai_ppl": lambda path, ids, window: _perplexity("genai", path, ids, window),
           "genai_nospin": lambda path, ids, new: _run_genai(path, ids, new, spinning=False),
           "tvm_limits": lambda path, ids, runs: _tvm_limits(path, runs)}


def _tvm_limits(path: str, runs: int) -> dict:
    from benchmarks.tvm_limits import limits

    return limits(Path(path), THREADS, runs=runs)


def worker(argv: list[str]) -> None:
    kind, path, ids_file, new = argv
    ids = json.loads(Path(ids_file).read_text())
    res = WORKERS[kind](path, ids, int(new))
    res["peak_rss_mb"] = _peak_rss_mb()
    sys.stdout.write("\nRESULT " + json.dumps(res) + "\n")


def child(kind: str, path: Path, ids_file: Path, new: int) -> dict:
    r = subprocess.run([sys.executable, "-m", "benchmarks.onnx_engines", kind,
                        str(path), str(ids_file), str(new)], capture_output=True, text=True,
                       cwd=REPO)
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} engine on {path} failed:\n{r.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


if __name__ == "__main__":
    worker(sys.argv[1:])
