"""The gguf backend's benchmark row: llama.cpp running splice's GGUF files against llama.cpp's own
Q4_0 and Q8_0 of the same model: file size, WikiText-2 perplexity and decode speed, all through
llama.cpp (llama-cpp-python), in one process, rounds alternating between the files.

    python -m benchmarks.gguf_bench --reference DIR [--splice NAME=DIR ...] [--rounds 3]
                                    [--no-speed] [--no-ppl] [--no-peers] [--logits]

--reference is a gguf artefact of the float model (`splice compile MODEL --backend gguf --recipe
none`): llama.cpp's own quantizer (llama_model_quantize, as llama-quantize) makes the Q4_0 and
Q8_0 peers from its model.gguf, each wrapped into an artefact beside it (same manifest config and
tokenizer), so every file runs through the same runtime (runtime/gguf_runtime.py). Perplexity is
splice's protocol (splice.evaluate: the first 16,384 tokens of WikiText-2's test text, 1024-token
windows, the first token of a window context only); speed is 128 greedy tokens after a 64-token
WikiText-2 prompt, `--threads` threads (default 2), the best decode tok/s of the rounds
(--no-speed: size and perplexity only; --no-ppl: size and speed only; --no-peers: the splice
files only). Writes the results as
JSON (--out) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext2_test.txt"
PEERS = {"llama.cpp Q4_0": 2, "llama.cpp Q8_0": 7}  # llama_ftype
PROMPT, NEW = 64, 128


def llama_quantize(src: Path, dest: Path, ftype: int, threads: int) -> None:
    """llama.cpp's own quantizer on a GGUF file (llama-quantize's defaults for `ftype`)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    params.allow_requantize = True
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dest).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src}, ftype {ftype}) returned {rc}")


def peer_artefact(reference: Path, name: str, ftype: int, work: Path, threads: int) -> Path:
    """An artefact holding llama.cpp's own quantization of the reference's model.gguf."""
    from splice.backends.artefact import write_artefact
    from splice.runtime.manifest import read_manifest

    out = work / name.replace(" ", "_").replace(".", "")
    if (out / "manifest.json").is_file():
        return out
    manifest = read_manifest(reference)
    tmp = work / f".{out.name}.gguf"
    llama_quantize(reference / manifest["gguf"]["file"], tmp, ftype, threads)
    files = {manifest["gguf"]["file"]: tmp}
    for rel in (manifest.get("tokenizer") or {}).get("files", ()):
        files[rel] = reference / rel
    fields = {k: v for k, v in manifest.items() if k not in ("format_version", "files")}
    fields["gguf"] = {**fields["gguf"], "tensors": None, "types": None,
                      "made_by": f"llama_model_quantize ftype {ftype}"}
    fields["recipe"] = {"name": name}
    path = write_artefact(out, files, fields)
    tmp.unlink()
    return path


def logit_check(path: Path, tokens: int = 256, threads: int = 2) -> dict:
    """llama.cpp's logits for the first `tokens` WikiText-2 test tokens against splice's reference
    interpreter (float32) on the weights the file holds (the file re-imported and dequantized by
    splice's GGUF frontend, transformers' reader), twice: with float activations ("float") and
    with llama.cpp's own activation rounding (Q8_0 blocks at each quantized linear,
    backends/gguf/reference.py: "llama_rounding"). Each: the largest difference, relative to the
    logits' range, the mean KL of the next-token distributions and how often the argmax agrees."""
    import numpy as np
    import torch

    from splice.backends.gguf.reference import file_types, llama_logits
    from splice.frontend import load_model
    from splice.ir.interpreter import run_logits
    from splice.runtime.gguf_runtime import load
    from splice.runtime.manifest import read_manifest

    art = load(path, threads=threads)
    ids = art.tokenizer.encode(WIKITEXT.read_text()[:20000])[:tokens]
    ours = art.logits(ids)[0][0].astype(np.float64)
    file = path / read_manifest(path)["gguf"]["file"]
    module = load_model(file)
    ref = run_logits(module, torch.tensor([ids]))["logits"][0].double().numpy()
    sim = llama_logits(module, ids, file_types(file)).double().numpy()
    return {"tokens": len(ids), "float": _compare(ours, ref),
            "llama_rounding": _compare(ours, sim)}


def _compare(ours, ref) -> dict:
    import numpy as np

    from splice.evaluate import log_softmax

    p, q = log_softmax(ref), log_softmax(ours)
    return {"max_abs": float(np.abs(ours - ref).max()),
            "max_rel_range": float(np.abs(ours - ref).max() / (ref.max() - ref.min())),
            "mean_kl": float((np.exp(p) * (p - q)).sum(-1).mean()),
            "argmax_agree": float((ours.argmax(-1) == ref.argmax(-1)).mean())}


def measure(reference: Path | None, splice_arts: dict[str, Path], work: Path, rounds: int = 3,
        threads: int = 2, max_tokens: int = 16384, window: int = 1024,
        speed: bool = True, ppl: bool = True) -> dict:
    """The rows: llama.cpp's peers made from `reference` (None: no peers) and `splice_arts`;
    size and (when `ppl`) perplexity each, decode speeds over `rounds` alternating rounds when
    `speed`."""
    from splice.evaluate import perplexity_of
    from splice.runtime.manifest import read_manifest

    arts = {}
    if reference is not None:
        work.mkdir(parents=True, exist_ok=True)
        arts = {name: peer_artefact(reference, name, ft, work, threads)
                for name, ft in PEERS.items()}
    arts.update(splice_arts)
    rows = {}
    for name, path in arts.items():
        m = read_manifest(path)
        size = (path / m["gguf"]["file"]).stat().st_size
        rows[name] = {"path": str(path), "bytes": size, "ppl": None,
                      "decode_tok_s": [], "prefill_tok_s": []}
        if ppl:
            t = time.perf_counter()
            r = perplexity_of(path, WIKITEXT, max_tokens=max_tokens, window=window)
            rows[name].update(ppl=r["ppl"], ppl_tokens=r["tokens"],
                              ppl_s=round(time.perf_counter() - t, 1))
    if speed:
        _speed(arts, rows, rounds, threads)
    return {"threads": threads, "rounds": rounds if speed else 0, "prompt": PROMPT, "new": NEW,
            "window": window, "max_tokens": max_tokens, "rows": rows}


def _speed(arts: dict[str, Path], rows: dict, rounds: int, threads: int) -> None:
    from splice.runtime.gguf_runtime import load

    loaded = {name: load(path, threads=threads) for name, path in arts.items()}
    first = next(iter(loaded.values()))
    prompt = first.tokenizer.encode(WIKITEXT.read_text()[:20000])[:PROMPT]
    for art in loaded.values():  # warm-up
        art.generate_ids(prompt[:8], max_new_tokens=4, stop_at_eos=False)
    for _ in range(rounds):
        for name, art in loaded.items():
            g = art.generate_ids(prompt, max_new_tokens=NEW, stop_at_eos=False)
            rows[name]["decode_tok_s"].append(round(g.decode_tok_s, 1))
            rows[name]["prefill_tok_s"].append(round(g.prefill_tok_s, 1))
    for row in rows.values():
        row["best_decode_tok_s"] = max(row["decode_tok_s"])


def markdown(res: dict) -> str:
    lines = ["| file | MB | WikiText-2 ppl | decode tok/s (best) | rounds |",
             "| --- | ---: | ---: | ---: | --- |"]
    for name, r in res["rows"].items():
        best = f"{r['best_decode_tok_s']:.1f}" if r["decode_tok_s"] else "-"
        ppl = "-" if r["ppl"] is None else f"{r['ppl']:.2f}"
        lines.append(f"| {name} | {r['bytes'] / 1e6:.1f} | {ppl} | {best} | "
                     f"{', '.join(map(str, r['decode_tok_s'])) or 'not timed'} |")
    return "\n".join(lines)


RECIPES = ("gguf_q4_0", "gguf_q4_0_prune4")


def run(quick: bool = False, work: Path | None = None) -> tuple[str, dict]:
    """`make bench`'s gguf section (benchmarks.run): splice's built-in GGUF recipes on SmolLM2-135M
    against llama.cpp's own Q4_0 and Q8_0 of the float file, perplexity at 1 thread's run, decode
    speed at 1 and 2 threads (3 alternating rounds each). Quick mode: stories260K's float file
    and its peers (its widths are not multiples of 32, so no Q4_0 recipe fits it), one round,
    512 tokens of perplexity. Compiles go through `splice compile` in a child process, as a user
    runs them (benchmarks.presets' child compile); `work` keeps them for a second run."""
    import tempfile

    from benchmarks.peer_engines import llama_available
    from benchmarks.presets import DATA, STORIES, _compile

    if not llama_available():
        return ("## GGUF backend\n\nskipped: llama-cpp-python is not installed (`make llama` "
                "builds and installs it)\n", {"skipped": "llama-cpp-python is not installed"})
    tmp = tempfile.TemporaryDirectory() if work is None else None
    work = Path(tmp.name if tmp else work)
    try:
        model = str(STORIES) if quick else "smollm2-135m"
        calib = DATA / "wikitext2_valid_tokenized.txt"
        jobs = [("float", "none")] + ([] if quick else [(r, r) for r in RECIPES])
        arts, compile_s = {}, {}
        for name, recipe in jobs:
            out = work / name
            compile_s[name] = round(_compile(model, recipe, calib, out, quick,
                                             backend="gguf")["compile_s"], 1)
            arts[f"splice {name}"] = out
        ref = arts.pop("splice float")
        splice_rows = arts if arts else {"splice float": ref}
        if quick:
            runs = {1: measure(ref, splice_rows, work / "peers", rounds=1, threads=1,
                               max_tokens=512, window=128)}
        else:
            runs = {t: measure(ref, splice_rows, work / "peers", rounds=3, threads=t,
                               ppl=t == 1) for t in (1, 2)}
        figures = {"threads": runs, "compile_s": compile_s}
        text = ["## GGUF backend: llama.cpp running splice's files (" +
                ("stories260K, quick" if quick else "SmolLM2-135M") + ")", "",
                "`python -m benchmarks.gguf_bench`'s rows: every file through llama.cpp "
                "(llama-cpp-python), rounds alternating between the files; perplexity is "
                "splice's protocol through llama.cpp's logits. Compile s (`splice compile`, "
                "child process): " + ", ".join(f"{k} {v} s" for k, v in compile_s.items()) +
                ".", ""]
        for t, res in runs.items():
            text += [f"{t} thread{'s' if t > 1 else ''}:", "", markdown(res), ""]
        return "\n".join(text), figures
    finally:
        if tmp is not None:
            tmp.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", type=Path, default=None,
                   help="a gguf artefact of the float model; llama.cpp's Q4_0 and Q8_0 peers "
                        "are made from it (needed unless --no-peers)")
    p.add_argument("--splice", action="append", default=[], metavar="NAME=DIR")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--no-speed", action="store_true",
                   help="size and perplexity only (no decode timing)")
    p.add_argument("--no-ppl", action="store_true",
                   help="size and decode speed only (no perplexity)")
    p.add_argument("--no-peers", action="store_true",
                   help="only the --splice files (no llama.cpp Q4_0 / Q8_0 peers)")
    p.add_argument("--max-tokens", type=int, default=16384,
                   help="perplexity over the text's first N tokens")
    p.add_argument("--window", type=int, default=1024, help="perplexity window, tokens")
    p.add_argument("--logits", action="store_true",
                   help="also compare llama.cpp's logits of each splice file with the "
                        "interpreter's on its dequantized weights")
    a = p.parse_args(argv)
    if a.reference is None and not a.no_peers:
        p.error("--reference is required unless --no-peers")
    arts = {}
    for spec in a.splice:
        name, _, path = spec.partition("=")
        arts[name] = Path(path)
    if not arts and a.no_peers:
        p.error("--no-peers needs at least one --splice NAME=DIR")
    reference = None if a.no_peers else a.reference
    work = a.work or (a.reference.parent / "gguf_peers" if a.reference else Path("gguf_peers"))
    res = measure(reference, arts, work, a.rounds, a.threads, max_tokens=a.max_tokens,
                  window=a.window, speed=not a.no_speed, ppl=not a.no_ppl)
    if a.logits:
        res["logits"] = {name: logit_check(path, threads=a.threads) for name, path in arts.items()}
        print(json.dumps(res["logits"], indent=2))
    if a.out:
        a.out.write_text(json.dumps(res, indent=2))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
