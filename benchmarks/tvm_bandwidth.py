"""TVM decode against the memory-bandwidth limit at every int4 group size, 1 and 2 threads (issue
28's goal: a decode step at >= 60% of the limit).

SmolLM2-135M (stories260K in quick mode) quantized int4 RTN, asymmetric, in groups of 32, 64, 128,
256 and per channel (group_size 0; a group that does not divide a linear's inputs pads its last
block, whose bytes a step reads and the figures count), its tied table an int4 lm_head and an int8
embedding (the presets' choice), each exported to TVM as `splice compile` does for a CPU preset
with no `--backend` where that runs (int8 activations, a float16 KV cache; else float activations).
Per row and thread count, every figure from this run:
- decode tok/s with the presets benchmark's protocol (benchmarks/peer_engines.py: a 64-token
  WikiText-2 prompt, 128 greedy tokens, no EOS stop, each run in its own process), best of the
  alternating rounds;
- the bytes of weights one decode step reads (benchmarks/tvm_limits.py: the parameters its
  product kernels are passed; an embedding only gathered from is not counted);
- the read bandwidth at the same thread count (benchmarks/memory_limits.read_bandwidth: the
  better of numpy's sum and ONNX Runtime's float32 GEMV over 1 GB), measured in every round,
  best kept; the limit is that bandwidth over the step's bytes, and the share of it is the
  decode tok/s over the limit;
- the kernel limit: one decode step's product kernels alone, replayed with the same weights.

Quick mode: stories260K, groups of 32 only, 1 thread, a 16-token prompt and 8 tokens, one round:
it checks that the benchmark runs, not how fast anything is.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.memory_limits import read_bandwidth
from benchmarks.peer_engines import child
from benchmarks.section import section_main, work_dir

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
STORIES = REPO.parent / "shared" / "models" / "stories260K" / "stories260K.bin"
GROUPS = (32, 64, 128, 256, 0)
THREADS = (1, 2)
GOAL = 0.60


def _group_name(group: int) -> str:
    return f"g{group}" if group else "per channel"


def _export(module, group: int, out: Path, options: dict) -> None:
    from splice.backends.tvm import export
    from splice.passes.infra.base import PassContext
    from splice.passes.quantize_weights import QuantizeWeightsPass

    q = QuantizeWeightsPass(method="rtn", bits=4, group_size=group, lm_head="int4",
                            embeddings="int8")(module.clone(), PassContext()).module
    export(q, out, threads=max(THREADS), **options)


def run(quick: bool = False, work: str | Path | None = None, rounds: int | None = None
        ) -> tuple[str, dict]:
    """Export every row (kept in `work` when given, so a second run only measures), then time
    them in alternating rounds."""
    from splice.frontend import load_model
    from splice.presets import backend_for
    from splice.runtime import load

    groups, threads_list = ((32,), (1,)) if quick else (GROUPS, THREADS)
    rounds = rounds or (1 if quick else 3)
    new = 8 if quick else 128
    _, options = backend_for("fastest", "cpu", None, {})
    with work_dir(work) as work:
        module = load_model(str(STORIES) if quick else "smollm2-135m")
        paths = {}
        for g in groups:
            out = work / f"tvm_int4_{_group_name(g).replace(' ', '_')}"
            if not (out / "manifest.json").is_file():
                _export(module, g, out, options)
            paths[_group_name(g)] = out
        tok = load(next(iter(paths.values()))).tokenizer
        text = (DATA / ("tinystories_val.txt" if quick else "wikitext2_test.txt")).read_text(
            encoding="utf-8")[:20000]
        ids = tok.encode(text)[:16 if quick else 64]
        rows: dict[str, dict] = {name: {} for name in paths}
        bandwidth: dict[int, float] = {}
        for _ in range(rounds):
            for t in threads_list:
                for name, path in paths.items():
                    r = child("splice_speed", path, {"ids": ids, "new": new, "threads": t}, work)
                    best = rows[name].setdefault(t, {"decode_tok_s": 0.0, "product_s": 1e9})
                    best["decode_tok_s"] = max(best["decode_tok_s"], r["decode_tok_s"])
                    lim = child("tvm_limits", path, {"threads": t, "runs": 5 if quick else 20},
                                work)
                    best["product_s"] = min(best["product_s"], lim["product_s"])
                    best["weight_bytes"] = lim["weight_bytes"]
                bw = read_bandwidth(0.25 if quick else 1.0, threads=t)["best"]
                bandwidth[t] = max(bandwidth.get(t, 0.0), bw)
        for name, by_t in rows.items():
            for t, row in by_t.items():
                row["limit_tok_s"] = bandwidth[t] / row["weight_bytes"]
                row["share"] = row["decode_tok_s"] / row["limit_tok_s"]
                row["kernel_limit_tok_s"] = 1 / row["product_s"]
        res = {"model": "stories260K (quick)" if quick else "SmolLM2-135M", "rounds": rounds,
               "prompt_tokens": len(ids), "new_tokens": new, "options": options,
               "bandwidth_gb_s": {t: bw / 1e9 for t, bw in bandwidth.items()},
               "rows": {name: {str(t): row for t, row in by_t.items()}
                        for name, by_t in rows.items()}}
        return markdown(res), res


def markdown(res: dict) -> str:
    opts = ", ".join(f"{k} {v}" for k, v in res["options"].items()) or "float activations"
    bw = ", ".join(f"{bw:.1f} GB/s at {t} thread{'s' if int(t) > 1 else ''}"
                   for t, bw in res["bandwidth_gb_s"].items())
    lines = [f"## TVM decode against the bandwidth limit: {res['model']}", "",
             f"int4 RTN (asymmetric) at each group size, lm_head int4, embedding int8; TVM with "
             f"{opts}. A {res['prompt_tokens']}-token prompt, {res['new_tokens']} greedy tokens, "
             f"best of {res['rounds']} alternating rounds; read bandwidth {bw}. Share = decode "
             f"tok/s over (bandwidth / weight bytes a step); the goal is {GOAL:.0%}.", "",
             "| int4 groups | threads | weight MB a step | decode tok/s | limit tok/s | share | "
             "kernel limit tok/s |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, by_t in res["rows"].items():
        for t, row in by_t.items():
            lines.append(f"| {name} | {t} | {row['weight_bytes'] / 1e6:.1f} | "
                         f"{row['decode_tok_s']:.1f} | {row['limit_tok_s']:.1f} | "
                         f"{row['share']:.0%} | {row['kernel_limit_tok_s']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    section_main("benchmarks.tvm_bandwidth", run)
