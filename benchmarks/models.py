"""The real-model matrix (issue 27): each real checkpoint this machine has, through the recipes,
presets and backends a user would try, compiled as a user would.

Models: SmolLM2-135M (the embedded GGUF) and Gemma 3 270M (the real sandwich-norm model, from
`make gemma`; skipped, saying so, where it is absent). Every row is `python -m splice compile MODEL
--recipe R --backend B [--calib WIKITEXT2_VALID] --out DIR` in a child process (benchmarks.presets'
compile: its wall time is the compile time; the manifest keeps each pass's time and peak memory).
A compile that fails or is refused is a row that says so (its last stderr line), not the end of
the matrix: the issue's goal is that every recipe works or is refused with a reason.

Per row: compile time, artefact size, WikiText-2 test perplexity through the artefact's own
runtime (splice eval's protocol: BOS before every window where the tokenizer adds one, as
Gemma's does; SmolLM2 16,384 tokens in 1,024-token windows, Gemma 1,024 tokens in windows of 512,
the docs' Gemma protocol), and for CPU artefacts decode speed (a 64-token prompt, 64 greedy tokens,
one thread, each artefact in its own process) as a ratio to the model's float32 row, alternating
rounds. NPU rows give HTP partitions and size only: the x86-64 HTP simulator's perplexity takes
minutes a window (benchmarks.npu measures it on SmolLM2).

Quick mode (the suite): stories260K through float32, W4 RTN and the NPU backend on TinyStories
text, 256 tokens, one round: it checks that the matrix runs, not how good anything is.

    python -m benchmarks.models --work DIR [--models gemma] [--rows "W4 RTN" --rows NPU]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.peer_engines import child
from benchmarks.presets import DATA, STORIES, _compile

SPLICE_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "splice"
FLOAT = "float32"
# (label, recipe, backend)
ROWS = ((FLOAT, "none", "onnx"), ("fold_norms", "fold_norms", "onnx"),
        ("rotate", "rotate", "onnx"), ("W4 RTN", "w4_rtn", "onnx"),
        ("W4 GPTQ", "w4_gptq", "onnx"), ("W4 GPTQ + rotate", "w4_gptq_rotate", "onnx"),
        ("prune 4 + patch", "prune4_patch", "onnx"), ("preset fastest", "fastest", "onnx"),
        ("preset balanced", "balanced", "onnx"),
        ("preset closest_to_float", "closest_to_float", "onnx"),
        ("fold_norms, TVM", "fold_norms", "tvm"), ("NPU W8A16", "npu_w8a16", "npu"))
QUICK_ROWS = (ROWS[0], ROWS[3], ROWS[-1])


def models(quick: bool) -> dict[str, dict]:
    """name -> model argument, texts and protocol; Gemma only where `make gemma` put it."""
    if quick:
        return {"stories260K": {"model": str(STORIES), "calib": DATA / "tinystories_val.txt",
                                "text": DATA / "tinystories_val.txt", "tokens": 256,
                                "window": 64}}
    out = {"SmolLM2-135M": {"model": "smollm2-135m", "tokens": 16384, "window": 1024}}
    gemma = SPLICE_CACHE / "gemma-3-270m-q4_k_m.gguf"
    if gemma.is_file():
        out["Gemma 3 270M"] = {"model": str(gemma), "tokens": 1024, "window": 512}
    for m in out.values():
        m.update(calib=DATA / "wikitext2_valid_tokenized.txt", text=DATA / "wikitext2_test.txt")
    return out


def _row(spec: dict, recipe: str, backend: str, out: Path, quick: bool) -> dict:
    try:
        row = _compile(spec["model"], recipe, spec["calib"], out, quick, backend)
    except RuntimeError as e:  # failed or refused: the row says why, the matrix goes on
        lines = [x for x in str(e).splitlines() if x.strip()]
        return {"error": lines[-1] if lines else str(e)}
    if backend == "npu":
        npu = json.loads((out / "manifest.json").read_text())["npu"]
        row["partitions"] = [f["partitions"] for f in npu["figures"].values()]
    return row


def _npu_unavailable() -> str | None:
    """Why the QNN plugin cannot load here, or None."""
    try:
        from splice.runtime.npu_runtime import NpuUnavailable, qnn_devices

        qnn_devices()
    except (ImportError, NpuUnavailable) as e:
        return str(e)
    return None


def _ids(art: Path, spec: dict) -> tuple[list[int], list[int], int | None]:
    """(prompt ids, evaluation ids, the BOS every window gets or None) by the artefact's
    tokenizer."""
    from splice.evaluate import window_bos
    from splice.frontend.text import read_text
    from splice.runtime import load

    tok = load(art).tokenizer
    ids = list(tok.encode(read_text(spec["text"])))
    return ids[:64], ids[:spec["tokens"]], window_bos(tok)


def run(quick: bool = False, work: str | Path | None = None, rounds: int | None = None,
        only_models: tuple[str, ...] = (), only_rows: tuple[str, ...] = ()) -> tuple[str, dict]:
    """Compile (kept in `work` when given, so a second run only measures), then measure."""
    rounds = rounds or 1
    tmp = tempfile.TemporaryDirectory() if work is None else None
    work = Path(tmp.name if tmp else work)
    rows_spec = QUICK_ROWS if quick else ROWS
    if only_rows:
        rows_spec = tuple(r for r in rows_spec if r[0] == FLOAT or r[0] in only_rows)
    found = models(quick)
    res = {"models": {}, "rounds": rounds, "quick": quick,
           "text": "TinyStories" if quick else "WikiText-2's test text",
           "absent": [] if quick or "Gemma 3 270M" in found else [
               f"Gemma 3 270M (`make gemma` puts it in {SPLICE_CACHE})"]}
    npu = _npu_unavailable()
    if npu:
        rows_spec = tuple(r for r in rows_spec if r[2] != "npu")
        res["absent"].append(f"the NPU rows ({npu})")
    try:
        for name, spec in found.items():
            if only_models and not any(m.lower() in name.lower() for m in only_models):
                continue
            base = work / name.replace(" ", "_")
            base.mkdir(parents=True, exist_ok=True)
            rows = {label: _row(spec, recipe, backend, base / label.replace(" ", "_").replace(
                ",", ""), quick) | {"backend": backend, "recipe": recipe}
                for label, recipe, backend in rows_spec}
            paths = {label: base / label.replace(" ", "_").replace(",", "")
                     for label, row in rows.items() if "error" not in row}
            if FLOAT not in paths:
                res["models"][name] = {"rows": rows, "spec": _spec(spec)}
                continue
            prompt, ids, bos = _ids(paths[FLOAT], spec)
            cpu = [label for label in paths if rows[label]["backend"] != "npu"]
            for _ in range(rounds):  # alternating: every artefact once a round
                for label in cpu:
                    r = child("splice_speed", paths[label], {"ids": prompt, "new": 8 if quick
                                                             else 64, "threads": 1}, base)
                    best = rows[label].setdefault("decode_tok_s", 0.0)
                    rows[label]["decode_tok_s"] = max(best, r["decode_tok_s"])
            for label in cpu:
                rows[label]["ppl"] = child("splice_ppl", paths[label], {
                    "ids": ids, "window": spec["window"], "bos": bos, "threads": 2}, base)["ppl"]
            res["models"][name] = {"rows": rows, "spec": _spec(spec), "bos": bos}
        res["date"] = time.strftime("%Y-%m-%d")
        return markdown(res), res
    finally:
        if tmp is not None:
            tmp.cleanup()


def _spec(spec: dict) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in spec.items()}


def markdown(res: dict) -> str:
    lines = ["## Real models through every recipe (issue 27)", "",
             "Each row `splice compile MODEL --recipe R --backend B` in a child process; "
             f"perplexity through the artefact's runtime on {res['text']} (BOS before every "
             "window where the tokenizer adds one); decode: 64-token prompt, 64 greedy tokens, "
             f"1 thread, best of {res['rounds']} alternating round(s), as a ratio to the "
             "model's float32 artefact. NPU rows: size and HTP partitions (prefill, decode); "
             "the simulator's perplexity is benchmarks.npu's.", ""]
    if res["absent"]:
        lines += [f"Not on this machine: {', '.join(res['absent'])}.", ""]
    for name, m in res["models"].items():
        spec, rows = m["spec"], m["rows"]
        lines += [f"### {name} ({spec['tokens']} tokens, windows of {spec['window']})", "",
                  "| row | recipe | backend | compile s | size MB | ppl | vs float | decode "
                  "tok/s | vs float |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: "
                  "| ---: |"]
        ref = rows.get(FLOAT, {})
        for label, r in rows.items():
            head = f"| {label} | {r['recipe']} | {r['backend']} |"
            if "error" in r:
                lines.append(f"{head} failed: {r['error']} | | | | | | |")
                continue
            ppl = r.get("ppl")
            tok = r.get("decode_tok_s")
            rel = (f"{ppl / ref['ppl'] - 1:+.1%}" if ppl and ref.get("ppl") else "")
            speed = (f"{tok / ref['decode_tok_s']:.2f}x" if tok and ref.get("decode_tok_s")
                     else "")
            ppl_s = f"{ppl:.2f}" if ppl else ("partitions " + "/".join(
                map(str, r["partitions"])) if "partitions" in r else "-")
            lines.append(f"{head} {r['compile_s']:.0f} | {r['size_mb']:.1f} | {ppl_s} | {rel} "
                         f"| {f'{tok:.1f}' if tok else '-'} | {speed} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.models")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--work", default=None, help="keep the artefacts here (a rerun measures only)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--models", action="append", default=[], help="a name's part: gemma, smollm2")
    ap.add_argument("--rows", action="append", default=[],
                    help=f"row labels to run (float32 always runs): {', '.join(r[0] for r in ROWS)}")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    text, res = run(a.quick, a.work, a.rounds, tuple(a.models), tuple(a.rows))
    print(text)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
