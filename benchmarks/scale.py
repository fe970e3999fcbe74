"""Scale: compiling a model larger than memory layer by layer, and calibration across processes.

    python -m benchmarks.scale --quick       # a small random LLaMA: layer-by-layer vs in memory
    python -m benchmarks.scale               # LLaMA-2-7B's shape (bf16 on disk, ~13.5 GB)
    python -m benchmarks.scale --layers 16   # half of it, where time or disk is short
    python -m benchmarks.scale --layers 6 --prune 2 --no-rtn   # whole-model passes at 7B width

A random-weight LLaMA checkpoint (config.json + one safetensors shard per layer + index) is
written to a scratch directory shard by shard, never held whole, then compiled in a child
process (`splice compile --layerwise`, recipe fold_norms + rotate + RTN W4 g128) whose peak
resident memory is read from the kernel (getrusage of the child: its VmHWM). Quick mode also
compiles the same model in memory and checks the two artefacts' ONNX weights are equal; the
distributed figure is a 2-process gloo GPTQ compile against 1 process on the same model
(on a 2-core machine shared with others, expect ~1x: the point is the equality, not speed).
The checkpoint and the artefacts are deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
LLAMA2_7B = dict(layers=32, hidden=4096, intermediate=11008, heads=32, vocab=32000)
QUICK = dict(layers=4, hidden=256, intermediate=688, heads=4, vocab=512)
PRUNE_CALIB = (12, 512)  # 6,144 tokens: a 4096 x 4096 patch fitted on 3/4 of them
QUICK_PRUNE_CALIB = (4, 128)  # 512 tokens: QUICK's 256 x 256 patch fitted on 3/4 of them


def write_random_llama(path: Path, *, layers: int, hidden: int, intermediate: int, heads: int,
                       vocab: int, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> int:
    """A random LLaMA checkpoint directory, one safetensors shard per layer (plus embedding and
    head shards) and model.safetensors.index.json; returns the bytes written. Only one shard is
    in memory at a time."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    path.mkdir(parents=True, exist_ok=True)
    LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                max_position_embeddings=4096, tie_word_embeddings=False,
                rms_norm_eps=1e-5).save_pretrained(path)
    _byte_tokenizer(path)
    g = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0

    def rand(*shape: int, scale: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    def shard(name: str, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        total += (path / name).stat().st_size

    n = layers + 2
    shard(f"model-00001-of-{n:05d}.safetensors",
          {"model.embed_tokens.weight": rand(vocab, hidden, scale=1.0)})
    for i in range(layers):
        p = f"model.layers.{i}."
        shard(f"model-{i + 2:05d}-of-{n:05d}.safetensors", {
            p + "input_layernorm.weight": (1 + rand(hidden, scale=0.1).float()).to(dtype),
            p + "post_attention_layernorm.weight": (1 + rand(hidden, scale=0.1).float()).to(dtype),
            **{p + f"self_attn.{x}_proj.weight": rand(hidden, hidden) for x in "qkvo"},
            p + "mlp.gate_proj.weight": rand(intermediate, hidden),
            p + "mlp.up_proj.weight": rand(intermediate, hidden),
            p + "mlp.down_proj.weight": rand(hidden, intermediate)})
    shard(f"model-{n:05d}-of-{n:05d}.safetensors", {
        "model.norm.weight": (1 + rand(hidden, scale=0.1).float()).to(dtype),
        "lm_head.weight": rand(vocab, hidden)})
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return total


def _byte_tokenizer(path: Path) -> None:
    """tokenizer.json of a byte-level BPE without merges (ids 0..255), so text calibrates."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path / "tokenizer.json"))


def recipe_file(path: Path, method: str, samples: int, seq_len: int, prune: int = 0) -> Path:
    """fold_norms + rotate + W4 g128 (`method`), after `prune` layers pruned and patched
    (select_layers by cosine, the better of LinearPatch and least squares, multiplied out so
    that rotate rotates it) when prune > 0."""
    calib = f"[calibration]\nsamples = {samples}\nseq_len = {seq_len}\n\n" \
        if method == "gptq" or prune else ""
    head = (f'[[pass]]\nname = "select_layers"\nn = {prune}\n\n[[pass]]\nname = '
            '"estimate_patch"\n\n[[pass]]\nname = "prune_layers"\n\n[[pass]]\nname = '
            '"fuse_patch"\nstrategy = "dense"\n\n') if prune else ""
    # the calibration is the pruning passes': RTN is not to run it through every layer again
    tail = "output_error = false\n" if method == "rtn" else ""
    path.write_text(f'name = "scale_{method}"\n{calib}{head}[[pass]]\nname = "fold_norms"\n\n'
                    '[[pass]]\nname = "rotate"\n\n[[pass]]\nname = "quantize_weights"\n'
                    f'method = "{method}"\nbits = 4\ngroup_size = 128\n{tail}')
    return path


def compile_child(model: Path, out: Path, recipe: Path, *, layerwise: bool,
                  calib: Path | None = None, nproc: int = 1, nice: int = 0) -> dict:
    """Run `splice compile` in a child process; its wall time, peak RSS (the largest process's
    VmHWM) and the artefact's size."""
    cmd = [sys.executable, "-m", "splice.cli", "compile", str(model), "--recipe", str(recipe),
           "--out", str(out)] + (["--layerwise"] if layerwise else []) + \
        (["--calib", str(calib)] if calib else [])
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(29500 + os.getpid() % 1000)] + cmd[1:]
    if nice:
        cmd = ["nice", "-n", str(nice)] + cmd
    # GNU time's %M: the largest resident set of the child and every descendant it waited for
    stats = out.parent / f".{out.name}.time"
    cmd = ["/usr/bin/time", "-o", str(stats), "-f", "%M"] + cmd
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get(
                              "OMP_NUM_THREADS", "2")})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"compile failed ({proc.returncode}): {proc.stderr[-2000:]}")
    peak_kb = int(stats.read_text().split()[-1])
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {"wall_s": round(wall, 1), "peak_rss_gb": round(peak_kb * 1024 / 1e9, 2),
            "artefact_gb": round(size / 1e9, 3)}


def onnx_weights_equal(a: Path, b: Path) -> bool:
    import numpy as np
    import onnx
    from onnx import numpy_helper

    ma, mb = onnx.load(str(a / "model.onnx")), onnx.load(str(b / "model.onnx"))
    wa = {i.name: numpy_helper.to_array(i, base_dir=str(a)) for i in ma.graph.initializer}
    wb = {i.name: numpy_helper.to_array(i, base_dir=str(b)) for i in mb.graph.initializer}
    return wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


def run(quick: bool = True, layers: int | None = None, gptq: bool = False,
        distributed: bool = False, scratch: str | None = None,
        rtn: bool = True, prune: int | None = None) -> tuple[str, dict]:
    """Quick: the small model, layer by layer against in memory (RTN). Otherwise LLaMA-2-7B's
    shape (or `layers` of it) layer by layer. `gptq` adds a GPTQ compile on 4 x 64 tokens;
    `distributed` adds GPTQ in 1 and in 2 processes (gloo) on the same checkpoint; `prune` adds
    a compile that first prunes that many layers and patches the cut (the whole-model passes,
    calibrated on PRUNE_CALIB tokens, QUICK_PRUNE_CALIB in quick mode: a d x d patch needs more
    than d tokens; None: 1 in quick mode, against the in-memory compile, else 0); `rtn = False`
    leaves out the RTN compile (full mode with gptq, distributed or prune only)."""
    if prune is None:
        prune = 1 if quick else 0
    if not rtn and (quick or not (gptq or distributed or prune)):
        raise ValueError("rtn = False needs full mode and gptq or distributed: there would be "
                         "nothing to compile")
    shape = dict(QUICK if quick else LLAMA2_7B)
    if layers:
        shape["layers"] = layers
    figures: dict = {"shape": shape}
    root = Path(tempfile.mkdtemp(prefix="splice-scale-", dir=scratch))
    try:
        model = root / "model"
        t0 = time.perf_counter()
        figures["checkpoint_gb"] = round(write_random_llama(model, **shape) / 1e9, 2)
        figures["write_s"] = round(time.perf_counter() - t0, 1)
        nice = 0 if quick else 10
        rows = []
        if rtn:
            recipe = recipe_file(root / "rtn.toml", "rtn", 0, 0)
            figures["layerwise_rtn"] = compile_child(model, root / "lw", recipe, layerwise=True,
                                                     nice=nice)
            figures["disk_peak_gb"] = round(figures["checkpoint_gb"]
                                            + figures["layerwise_rtn"]["artefact_gb"], 2)
            rows.append(("layer by layer, RTN", figures["layerwise_rtn"]))
        if quick:
            figures["in_memory_rtn"] = compile_child(model, root / "mem", recipe, layerwise=False)
            figures["onnx_weights_equal"] = onnx_weights_equal(root / "lw", root / "mem")
            rows.append(("in memory, RTN", figures["in_memory_rtn"]))
        calib = root / "calib.txt"
        calib.write_text(" ".join(f"w{i % 97} {i}" for i in range(40000)))
        if prune:
            samples, seq_len = QUICK_PRUNE_CALIB if quick else PRUNE_CALIB
            recipe = recipe_file(root / "prune.toml", "rtn", samples, seq_len, prune)
            figures["layerwise_prune"] = compile_child(model, root / "lw_prune", recipe,
                                                       layerwise=True, calib=calib, nice=nice)
            rows.append((f"layer by layer, prune {prune} + patch, RTN ({samples} x {seq_len} "
                         "tokens)", figures["layerwise_prune"]))
            if quick:
                figures["in_memory_prune"] = compile_child(model, root / "mem_prune", recipe,
                                                           layerwise=False, calib=calib)
                figures["prune_onnx_weights_equal"] = onnx_weights_equal(root / "lw_prune",
                                                                         root / "mem_prune")
                rows.append((f"in memory, prune {prune} + patch, RTN",
                             figures["in_memory_prune"]))
            figures.setdefault("disk_peak_gb", round(
                figures["checkpoint_gb"] + figures["layerwise_prune"]["artefact_gb"], 2))
        if gptq or distributed:
            recipe = recipe_file(root / "gptq.toml", "gptq", 4, 64)
            figures["layerwise_gptq"] = compile_child(model, root / "lw_gptq", recipe,
                                                      layerwise=True, calib=calib, nice=nice)
            rows.append(("layer by layer, GPTQ (4 x 64 tokens)", figures["layerwise_gptq"]))
            figures.setdefault("disk_peak_gb", round(
                figures["checkpoint_gb"] + figures["layerwise_gptq"]["artefact_gb"], 2))
            if distributed:
                figures["gptq_2proc"] = compile_child(model, root / "lw_gptq2", recipe,
                                                      layerwise=True, calib=calib, nproc=2,
                                                      nice=nice)
                figures["gptq_2proc_speedup"] = round(
                    figures["layerwise_gptq"]["wall_s"] / figures["gptq_2proc"]["wall_s"], 2)
                figures["gptq_2proc_weights_equal"] = onnx_weights_equal(root / "lw_gptq",
                                                                         root / "lw_gptq2")
                rows.append(("layer by layer, GPTQ, 2 processes (gloo)", figures["gptq_2proc"]))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    s = shape
    lines = [f"## Scale: random LLaMA, {s['layers']} layers x hidden {s['hidden']} "
             f"(intermediate {s['intermediate']}, vocab {s['vocab']}), bf16 checkpoint "
             f"{figures['checkpoint_gb']} GB", "",
             "| compile | wall s | peak RSS GB | artefact GB |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {f['wall_s']} | {f['peak_rss_gb']} | {f['artefact_gb']} |"
              for name, f in rows]
    if "onnx_weights_equal" in figures:
        lines += ["", "ONNX weights of the two RTN compiles equal: "
                  f"{figures['onnx_weights_equal']}"]
    if "prune_onnx_weights_equal" in figures:
        lines += ["", "ONNX weights of the two prune + patch compiles equal: "
                  f"{figures['prune_onnx_weights_equal']}"]
    if "gptq_2proc_speedup" in figures:
        lines += ["", f"GPTQ 2 processes vs 1: {figures['gptq_2proc_speedup']}x wall time; "
                  f"ONNX weights equal: {figures['gptq_2proc_weights_equal']} (equal to rounding "
                  "is what is promised: the Hessians are summed in another order)"]
    return "\n".join(lines) + "\n", figures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scale")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than LLaMA-2-7B's 32")
    ap.add_argument("--gptq", action="store_true", help="also GPTQ on 4 x 64 tokens (full mode)")
    ap.add_argument("--distributed", action="store_true",
                    help="also GPTQ in 1 and 2 processes (gloo) on the same checkpoint")
    ap.add_argument("--no-rtn", action="store_true",
                    help="leave out the RTN compile (with --gptq, --distributed or --prune)")
    ap.add_argument("--prune", type=int, default=None, metavar="N",
                    help="also prune N layers + patch the cut, then rotate + RTN (default: 1 in "
                         "quick mode, against the in-memory compile; else 0)")
    ap.add_argument("--scratch", default=None, help="directory for the checkpoint (big)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    try:
        text, figures = run(quick=a.quick, layers=a.layers, gptq=a.gptq,
                            distributed=a.distributed, scratch=a.scratch, rtn=not a.no_rtn,
                            prune=a.prune)
    except ValueError as e:
        ap.error(str(e))
    print(text)
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
