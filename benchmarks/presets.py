"""The CPU presets against llama.cpp on the same model, same run: compile time, WikiText-2
perplexity, decode speed at 1 and 2 threads.

SmolLM2-135M (the embedded GGUF). Rows:
- each CPU preset (`splice presets`: fastest, balanced, closest_to_float) and float32 (recipe
  none), compiled as a user would, `python -m splice compile smollm2-135m --recipe P --calib
  WIKITEXT2_VALID --out DIR` in a child process (its wall time is the compile time, import and
  export included; the manifest keeps each pass's time and peak memory);
- the `fastest` preset through the TVM backend with int8 activations (`--backend tvm
  --activations int8`, splice's own kernels; where apache-tvm is installed), the same IR as the
  ONNX row (its prefill and decode products both on int8 activations: +0.2% perplexity on
  SmolLM2 against float activations, docs/tvm.md);
- llama.cpp (llama-cpp-python, `make llama`) on the publisher's Q4_1 file that splice imports, and
  on that file requantized to Q8_0 and Q4_0 by `llama_model_quantize` (timed: the "compile").
Speed: a 64-token WikiText-2 prompt, 128 greedy tokens, no EOS stop, every engine in its own
process (benchmarks/peer_engines.py), 1 and 2 threads, alternating rounds, best of the rounds,
and each round's own ratio to llama.cpp Q4_0 at the same thread count (median [range]).
Perplexity: the first 16,384 tokens of WikiText-2's test text (splice's tokenizer, the same ids for
every engine) in 1024-token windows, no BOS, through each engine's own logits, 2 threads.

Without llama-cpp-python the llama.cpp rows are skipped, and the text says so. Quick mode:
stories260K compiled with each preset on TinyStories text (a preset that tunes its scales end to
end with one tuning step, from the preset's settings written as a TOML file), a 16-token prompt
and 8 tokens, 256 tokens of TinyStories for perplexity, one round; the llama.cpp rows (where
installed) run SmolLM2's GGUF on the same ids (meaningless there: another vocabulary). It checks
that the benchmark runs, not how fast or how good anything is.

`python -m benchmarks.presets --write-presets` also writes each preset's figures into its TOML
file's [preset.measured] table (what `splice presets` shows).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.peer_engines import child, llama_available

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
STORIES = REPO.parent / "shared" / "models" / "stories260K" / "stories260K.bin"
PRESETS = ("fastest", "balanced", "closest_to_float")
FLOAT = "float32"
THREADS = (1, 2)
Q4_0 = "llama.cpp Q4_0"
LLAMA = ("llama.cpp Q4_1 (the publisher's file)", "llama.cpp Q8_0", Q4_0)
# extra rows: (preset, backend, the backend's own compile options)
# the TVM rows: what `splice compile` gives a CPU preset with no --backend on an AVX2 CPU
TVM_DEFAULT = ("--activations", "int8", "--kv-cache", "float16")
BACKEND_ROWS = {"fastest, TVM int8, float16 cache": ("fastest", "tvm", TVM_DEFAULT),
                "balanced, TVM int8, float16 cache": ("balanced", "tvm", TVM_DEFAULT)}


def tvm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tvm") is not None


def _compile(model: str, recipe: str, calib: Path, out: Path, quick: bool,
             backend: str = "onnx", extra: tuple[str, ...] = ()) -> dict:
    """Compile in a child process as a user would; wall time, and the manifest's per-pass report.
    Quick mode gives the child one torch thread: on a toy model a busy machine's second thread
    only adds waiting (6x slower on a loaded 2-core machine)."""
    if not (out / "manifest.json").is_file():
        cmd = [sys.executable, "-m", "splice", "compile", model, "--backend", backend, *extra,
               *(["--target", "npu"] if backend == "npu" else []),
               "--recipe", _recipe_arg(recipe, out, quick), "--out", str(out)]
        from splice.recipe import Recipe

        # only where it calibrates (the NPU backend always does: its activation grids): given
        # text, RTN would also measure its output error (minutes)
        if Recipe.named(recipe).calibration_samples or backend == "npu":
            cmd += ["--calib", str(calib)]
        t0 = time.perf_counter()
        env = dict(os.environ, OMP_NUM_THREADS="1") if quick else None
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"splice compile --recipe {recipe} failed:\n{r.stderr[-3000:]}")
        (out.parent / f"{out.name}.compile_s").write_text(str(time.perf_counter() - t0))
    manifest = json.loads((out / "manifest.json").read_text())
    passes = [{"name": p["name"], "time_s": p.get("time_s"),
               "peak_rss_mb": p.get("timing", {}).get("peak_rss_mb")}
              for p in manifest.get("report", {}).get("passes", [])]
    return {"compile_s": float((out.parent / f"{out.name}.compile_s").read_text()),
            "passes": passes,
            "size_mb": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6}


def _recipe_arg(recipe: str, out: Path, quick: bool) -> str:
    """`--recipe`: the preset's name; in quick mode, for a preset that tunes its scales end to
    end, its settings as a TOML file beside `out` with one tuning step (the tuning code runs;
    closest_to_float's 64 steps were most of the quick run)."""
    from splice.recipe import Recipe

    r = Recipe.named(recipe)
    passes = tuple(dataclasses.replace(p, tune_steps=1) if getattr(p, "tune_steps", 0) > 1 else p
                   for p in r.passes)
    if not quick or passes == r.passes:
        return recipe
    path = out.parent / f"{out.name}.quick.toml"
    path.write_text(dataclasses.replace(r, passes=passes).to_toml(), encoding="utf-8")
    return str(path)


def _texts(art_path: Path, quick: bool) -> tuple[list[int], list[int], int]:
    """(prompt ids, perplexity ids, window), tokenized by the float32 artefact's tokenizer (quick:
    stories260K's, TinyStories text; its ids, under 512, are SmolLM2 ids too)."""
    from splice.runtime import load

    tok = load(art_path).tokenizer
    if quick:
        text = (DATA / "tinystories_val.txt").read_text(encoding="utf-8")[-100000:]
        return tok.encode(text[:2000])[:16], tok.encode(text[:20000])[:256], 64
    text = (DATA / "wikitext2_test.txt").read_text(encoding="utf-8")
    return tok.encode(text[:20000])[:64], tok.encode(text[:200000])[:16384], 1024


def run(quick: bool = False, work: str | Path | None = None, rounds: int | None = None,
        skip_llama: bool = False, presets: tuple[str, ...] = PRESETS,
        llama_passive: bool = False) -> tuple[str, dict]:
    """Compile (kept in `work` when given, so a second run only measures), then measure."""
    rounds = rounds or (1 if quick else 3)
    new = 8 if quick else 128
    tmp = None
    if work is None:
        tmp = tempfile.TemporaryDirectory()
        work = tmp.name
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        model = str(STORIES) if quick else "smollm2-135m"
        calib = DATA / ("tinystories_val.txt" if quick else "wikitext2_valid_tokenized.txt")
        rows: dict[str, dict] = {}
        paths: dict[str, tuple[str, Path]] = {}
        for name in (FLOAT, *presets):
            out = work / name
            rows[name] = _compile(model, "none" if name == FLOAT else name, calib, out, quick)
            paths[name] = ("splice", out)
        for name, (preset, backend, extra) in BACKEND_ROWS.items():
            if preset in presets and tvm_available():
                out = work / name.replace(", ", "_").replace(" ", "_")
                rows[name] = _compile(model, preset, calib, out, quick, backend, extra)
                paths[name] = ("splice", out)
        ids, eval_ids, window = _texts(paths[FLOAT][1], quick)
        llama_note = None
        if skip_llama or not llama_available():
            llama_note = ("skipped the llama.cpp peer: llama-cpp-python is not installed (`make "
                          "llama` builds and installs it)" if not skip_llama else
                          "skipped the llama.cpp peer (--skip-llama)")
        else:
            from splice.frontend.hf import default_model_path

            gguf = default_model_path()
            rows[LLAMA[0]] = {"size_mb": gguf.stat().st_size / 1e6}
            paths[LLAMA[0]] = ("llama", gguf)
            for name, ftype in zip(LLAMA[1:], ("Q8_0", "Q4_0")):
                out = work / f"smollm2-{ftype}.gguf"
                q = child("llama_quantize", gguf, {"out": str(out), "ftype": ftype,
                                                   "threads": max(THREADS)}, work, llama_passive)
                rows[name] = {"compile_s": q["quantize_s"], "size_mb": q["size_mb"]}
                paths[name] = ("llama", out)
        per_round: dict[tuple[str, int], list[float]] = {}
        for _ in range(rounds):
            for threads in THREADS:
                for name, (engine, path) in paths.items():
                    r = child(f"{engine}_speed", path, {"ids": ids, "new": new,
                                                        "threads": threads}, work, llama_passive)
                    per_round.setdefault((name, threads), []).append(r["decode_tok_s"])
                    best = rows[name].setdefault(f"speed_{threads}", dict(r))
                    for k in ("prefill_tok_s", "decode_tok_s"):
                        best[k] = max(best[k], r[k])
        for name, (engine, path) in paths.items():
            rows[name]["ppl"] = child(f"{engine}_ppl", path, {"ids": eval_ids, "window": window,
                                                              "threads": max(THREADS)}, work,
                                      llama_passive)["ppl"]
        if Q4_0 in rows:
            for name, row in rows.items():
                for t in THREADS:
                    ratios = sorted(a / b for a, b in zip(per_round[(name, t)],
                                                          per_round[(Q4_0, t)]))
                    row[f"vs_q4_0_by_round_{t}"] = ratios
        res = {"model": "stories260K (quick)" if quick else "SmolLM2-135M", "rounds": rounds,
               "prompt_tokens": len(ids), "new_tokens": new, "threads": list(THREADS),
               "ppl_tokens": len(eval_ids), "ppl_window": window, "rows": rows,
               "ppl_text": "TinyStories" if quick else "WikiText-2's test text",
               "llama_note": llama_note, "llama_passive": llama_passive, "presets": presets,
               "date": time.strftime("%Y-%m-%d"),
               "machine": _machine()}
        return markdown(res), res
    finally:
        if tmp is not None:
            tmp.cleanup()


def _machine() -> str:
    from benchmarks.run import machine

    return machine()


def _ratio(row: dict, q4: dict | None, t: int) -> str:
    if q4 is None or f"speed_{t}" not in row:
        return ""
    best = row[f"speed_{t}"]["decode_tok_s"] / q4[f"speed_{t}"]["decode_tok_s"]
    r = row[f"vs_q4_0_by_round_{t}"]
    spread = f" [{r[0]:.2f}-{r[-1]:.2f}]" if len(r) > 1 else ""
    return f"{best:.2f}x; {statistics.median(r):.2f}x{spread}"


def markdown(res: dict) -> str:
    rows = res["rows"]
    q4 = rows.get(Q4_0)
    lines = [f"## Presets against llama.cpp: {res['model']}", "",
             f"Prompt {res['prompt_tokens']} tokens, {res['new_tokens']} greedy tokens (no EOS "
             f"stop), every engine in its own process, best of {res['rounds']} alternating "
             f"rounds at 1 and at 2 threads; against llama.cpp Q4_0: best against best, then "
             "the median [range] of the rounds' own ratios. Perplexity: the first "
             f"{res['ppl_tokens']} tokens of {res['ppl_text']} in {res['ppl_window']}-token "
             "windows, no BOS, through each engine's own logits. Compile: `splice compile` in a "
             "child process (import, passes, export), or llama_model_quantize.", ""]
    if res["llama_note"]:
        lines += [f"Note: {res['llama_note']}.", ""]
    if res.get("llama_passive"):
        lines += ["llama.cpp's threads wait passively in this run (OMP_WAIT_POLICY=PASSIVE, "
                  "--llama-passive: a busy machine), not spinning as it does by default.", ""]
    lines += ["| engine | compile s | ppl | decode tok/s 1 thread | vs Q4_0 | "
              "decode tok/s 2 threads | vs Q4_0 | prefill tok/s 2 threads | size MB |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        label = name if name.startswith("llama") else f"splice {name}"
        comp = f"{r['compile_s']:.0f}" if "compile_s" in r else "-"
        s1, s2 = r.get("speed_1", {}), r.get("speed_2", {})
        lines.append(f"| {label} | {comp} | {r['ppl']:.2f} | {s1.get('decode_tok_s', 0):.1f} | "
                     f"{_ratio(r, q4, 1)} | {s2.get('decode_tok_s', 0):.1f} | {_ratio(r, q4, 2)} "
                     f"| {s2.get('prefill_tok_s', 0):.0f} | {r['size_mb']:.1f} |")
    lines += ["", "Per pass of each preset's compile (time s, peak RSS MB of the compile so far): "
              + "; ".join(f"{name}: " + ", ".join(
                  f"{p['name']} {p['time_s']:.1f} s" + (f" ({p['peak_rss_mb']:.0f} MB)"
                                                        if p.get("peak_rss_mb") else "")
                  for p in rows[name]["passes"]) for name in res["presets"]) + "."]
    return "\n".join(lines) + "\n"


def measured(res: dict, name: str) -> dict:
    """The [preset.measured] table of preset `name` from a full run's figures: its TVM row where
    the run has one (what `splice compile` gives the preset here), else its ONNX row."""
    tvm = [k for k, (preset, _, _) in BACKEND_ROWS.items() if preset == name and k in res["rows"]]
    r, q4 = res["rows"][tvm[0] if tvm else name], res["rows"].get(Q4_0)
    m = {"model": res["model"], "machine": res["machine"], "date": res["date"],
         "command": "python -m benchmarks.presets --write-presets (make bench)",
         "backend": "tvm, int8 activations, float16 KV cache" if tvm else "onnx",
         "compile_s": round(r["compile_s"], 1), "wikitext2_ppl": round(r["ppl"], 3),
         "size_mb": round(r["size_mb"], 1)}
    for t in THREADS:
        key = "1_thread" if t == 1 else f"{t}_threads"
        m[f"decode_tok_s_{key}"] = round(r[f"speed_{t}"]["decode_tok_s"], 1)
        if q4 is not None:
            m[f"vs_llama_cpp_q4_0_{key}"] = round(
                r[f"speed_{t}"]["decode_tok_s"] / q4[f"speed_{t}"]["decode_tok_s"], 2)
    if q4 is not None:
        m["llama_cpp_q4_0_ppl"] = round(q4["ppl"], 3)
    return m


def write_presets(res: dict) -> None:
    """Replace each CPU preset file's [preset.measured] table (kept last in the file)."""
    from splice.recipe import _toml_value

    for name in res["presets"]:
        path = REPO / "splice" / "recipes" / f"{name}.toml"
        text = path.read_text(encoding="utf-8")
        cut = text.find("\n[preset.measured]")
        text = (text[:cut] if cut >= 0 else text).rstrip("\n") + "\n"
        block = ["", "[preset.measured]"] + [f"{k} = {_toml_value(v)}"
                                             for k, v in measured(res, name).items()]
        path.write_text(text + "\n".join(block) + "\n", encoding="utf-8")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="python -m benchmarks.presets")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--work", default=None, help="keep the compiled models here and reuse them")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--presets", nargs="+", choices=PRESETS, default=list(PRESETS))
    ap.add_argument("--llama-passive", action="store_true",
                    help="llama.cpp's threads sleep while waiting (a busy machine)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--write-presets", action="store_true",
                    help="write the figures into splice/recipes/<preset>.toml")
    a = ap.parse_args()
    text, figures = run(quick=a.quick, work=a.work, rounds=a.rounds, skip_llama=a.skip_llama,
                        presets=tuple(a.presets), llama_passive=a.llama_passive)
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=2, default=float))
    if a.write_presets and not a.quick:
        write_presets(figures)
    print(text)
