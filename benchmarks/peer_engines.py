"""The engines of the presets benchmark (benchmarks/presets.py), each in a child process of its
own at a given thread count: llama.cpp through llama-cpp-python (`make llama` installs it) and
splice's runtime.

    python -m benchmarks.peer_engines KIND PATH ARGS_JSON

KIND: "llama_quantize" (requantize a GGUF with llama_model_quantize), "llama_speed", "llama_ppl",
"splice_speed", "splice_ppl", "tvm_limits" (benchmarks/tvm_bandwidth.py's). The protocol is the
ONNX speed benchmark's (benchmarks/onnx_engines.py): a warm-up generation, then the prompt in one
batch (prefill) and greedy tokens one a step, no EOS stop; decode tok/s is (new - 1) over the steps
after the first token (which comes from the prompt's logits). Perplexity is splice.evaluate's
protocol through the engine's own logits of each whole window: non-overlapping windows, no BOS, the
first token of a window context only. llama.cpp gets the token ids splice's tokenizer made (the
same GGUF vocabulary), so both engines score the same tokens; greedy picks are numpy's argmax of
the logits for both.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FTYPES = {"Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}


def llama_available() -> bool:
    """Whether llama-cpp-python is installed (`make llama`)."""
    return importlib.util.find_spec("llama_cpp") is not None


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


# -- llama.cpp -----------------------------------------------------------------------------------
def _llama(path: str, threads: int, n_ctx: int, all_logits: bool):
    import llama_cpp

    # verbose=False: llama-cpp-python drops llama.cpp's load messages
    return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                           n_threads=threads, n_threads_batch=threads, logits_all=all_logits,
                           verbose=False)


def llama_quantize(path: str, args: dict) -> dict:
    """args: {"out": file, "ftype": "Q4_0" | "Q8_0", "threads": n}. Requantizes (the embedded
    GGUF is Q4_1: llama.cpp dequantizes it and quantizes again) with llama.cpp's own rules for
    which tensors get which type."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[args["ftype"]])
    params.nthread = args["threads"]
    params.allow_requantize = True
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(path.encode(), args["out"].encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {args['ftype']} returned {rc}")
    return {"quantize_s": time.perf_counter() - t0, "size_mb": Path(args["out"]).stat().st_size / 1e6}


def llama_speed(path: str, args: dict) -> dict:
    """args: {"ids": prompt, "new": tokens, "threads": n}."""
    import llama_cpp

    ids, new = args["ids"], args["new"]
    llm = _llama(path, args["threads"], n_ctx=len(ids) + new + 8, all_logits=False)
    vocab = llm.n_vocab()

    def last() -> int:
        # without logits_all, Llama.eval keeps no logits: the last position's, read in place
        row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(row, shape=(vocab,))))

    def generate(prompt: list[int], n: int) -> tuple[float, float, list[int]]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        tok = last()
        out = [tok]
        t2 = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([tok])
            tok = last()
            out.append(tok)
        t3 = time.perf_counter()
        return t1 - t0, t3 - t2, out
    generate(ids[:8], 4)
    pre, dec, out = generate(ids, new)
    return {"prefill_tok_s": len(ids) / pre, "decode_tok_s": (new - 1) / dec, "tokens": out}


def llama_ppl(path: str, args: dict) -> dict:
    """args: {"ids": tokens, "window": w, "threads": n}: every window one batch, all its logits."""
    from splice.evaluate import perplexity

    window = args["window"]
    llm = _llama(path, args["threads"], n_ctx=window, all_logits=True)

    def logits(x: np.ndarray) -> np.ndarray:
        llm.reset()
        llm.eval([int(t) for t in x[0]])
        return np.array(llm.scores[:x.shape[1]])[None]
    return {"ppl": perplexity(logits, args["ids"], window=window)["ppl"]}


# -- splice --------------------------------------------------------------------------------------
def splice_speed(path: str, args: dict) -> dict:
    from splice.runtime import load

    ids, new = args["ids"], args["new"]
    art = load(path, threads=args["threads"])
    art.generate_ids(ids[:8], max_new_tokens=4, stop_at_eos=False)  # warm-up
    g = art.generate_ids(ids, max_new_tokens=new, stop_at_eos=False)
    return {"prefill_tok_s": g.prefill_tok_s, "decode_tok_s": g.decode_tok_s, "tokens": g.ids}


def splice_ppl(path: str, args: dict) -> dict:
    from splice.evaluate import perplexity
    from splice.runtime import load

    art = load(path, threads=args["threads"])
    return {"ppl": perplexity(lambda x: art.logits(x)[0], args["ids"], window=args["window"],
                              bos=args.get("bos"))["ppl"]}


def tvm_limits(path: str, args: dict) -> dict:
    """A TVM artefact's weight bytes a decode step and its kernel limit (benchmarks.tvm_limits)
    at args["threads"]."""
    from benchmarks.tvm_limits import limits

    return limits(Path(path), args["threads"], runs=args["runs"])


WORKERS = {"llama_quantize": llama_quantize, "llama_speed": llama_speed, "llama_ppl": llama_ppl,
           "splice_speed": splice_speed, "splice_ppl": splice_ppl, "tvm_limits": tvm_limits}


def child(kind: str, path: Path | str, args: dict, work: Path, passive: bool = False) -> dict:
    """Run one worker in its own process; its arguments go through a JSON file in `work`.
    `passive`: llama.cpp's OpenMP threads sleep instead of spinning while they wait
    (OMP_WAIT_POLICY=PASSIVE). Spinning is llama.cpp's default and its best on an idle machine;
    on a busy one (more runnable threads than cores) a spinning 2-thread decode was measured
    at 0.1 tok/s against 7 with one thread. splice's runtime does not spin by default."""
    args_file = Path(work) / f"args_{kind}.json"
    args_file.write_text(json.dumps(args))
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE") if passive and kind.startswith("llama") \
        else None
    r = subprocess.run([sys.executable, "-m", "benchmarks.peer_engines", kind, str(path),
                        str(args_file)], capture_output=True, text=True, cwd=REPO, env=env)
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} on {path} failed:\n{r.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv: list[str]) -> None:
    kind, path, args_file = argv
    res = WORKERS[kind](path, json.loads(Path(args_file).read_text()))
    res["peak_rss_mb"] = _peak_rss_mb()
    sys.stdout.write("\nRESULT " + json.dumps(res) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
