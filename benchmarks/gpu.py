"""The GPU benchmark (issue 30): SmolLM2-135M int4 and float on an NVIDIA GPU through both
backends, checked against the reference interpreter and timed beside onnxruntime-genai's
builder, in one JSON.

    python -m benchmarks.gpu pack  [--bundle .gpu] [--arch sm_90]     # here: wheels, model, libs
    python3 -m benchmarks.gpu stage --bundle .gpu                     # there: one call per part
    python3 -m benchmarks.gpu run  --bundle .gpu --json $OUT/gpu.json # there: the run (< 10 min)
    python -m benchmarks.gpu run --dry-run [--model M] [--json F]     # here: compile, run nothing

Why three steps: the device tool carries 64 MiB a call and the GPU machine reaches no index, and
the wheels plus the model are ~385 MB (gpu_bundle.py): seven parts. `pack` writes plan.json with
the calls; the one that brings the TVM half's last part also runs it (`run --backends tvm`).

What `run` does, in this order, each step's failure recorded in "errors" and the next step run:
1. the model from the bundle's GGUF (the same frontend as everywhere); int4 = RTN 4-bit
   symmetric groups of 32 (the builder's format, and the one MatMulNBits' CUTLASS fpA_intB path
   takes; lm_head kept float), float = the model as imported;
2. the reference: splice's interpreter on the CPU in float32, logits of a CHECK-token prompt;
3. per backend and variant, the artefact: ONNX compiled there for `--target cuda` (float16
   compute, MatMulNBits int4 with float16 scales, GroupQueryAttention over a device-resident
   cache); TVM from the library `pack` compiled for the GPU's architecture and parameters
   written there; its logits of the same prompt against the reference (max |diff| relative to
   max |reference|, and top-1 agreement), then prefill and decode speed at batch 1 and 16;
4. the peer: the builder's CUDA int4 and fp16 models of the same checkpoint (`-e cuda`), timed
   through onnxruntime-genai, as splice's ONNX artefacts are (the same generator drives both);
5. the memory-bandwidth limit: the bytes a decode step reads (every product's weights, the
   lm_head) over the device-to-device copy bandwidth measured in the same run.

Speed protocol: a PROMPT-token prompt of English text copied over the batch,
STEPS greedy steps without stopping, best of REPEATS; decode tok/s = batch x steps / time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import gpu_bundle as gb
from benchmarks.gpu_peer import builder, hf_dir_from_gguf, speed_genai

log = logging.getLogger("benchmarks.gpu")

BATCHES = (1, 16)
PROMPT, STEPS, REPEATS, CHECK = 64, 128, 3, 32
VARIANTS = ("int4", "float")
BACKENDS = ("onnx", "tvm")
SCHEMA = 1
# float16 compute against the float32 reference: each of 30 layers rounds its activations to
# float16 (unit roundoff 2^-11 ~ 4.9e-4). SmolLM2-135M's float16 ONNX graph on the CPU
# provider, 32 tokens: 3.7e-3 (float) and 5.4e-3 (int4) of the largest logit, top-1 all equal;
# the bound leaves ~4x for the CUDA kernels' other summation orders
LOGIT_BOUND = 0.02  # max |logit diff| / max |reference logit|
TEXT = ("The history of the city begins with a small settlement on the river, where farmers and "
        "traders met every spring to exchange grain, wool and salt. Over the following centuries "
        "the market grew into a town with stone walls, a bridge and a cathedral, and its "
        "merchants sent boats down the river to the sea. In the nineteenth century the railway "
        "arrived, factories were built along the banks, and the population doubled in thirty "
        "years, as families moved in from the countryside to work in the mills and workshops.")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="here: download the wheels, compile the TVM cuda libraries, "
                       "split everything into parts for the device calls")
    p.add_argument("--bundle", default=".gpu", help="bundle folder (git-ignored)")
    p.add_argument("--arch", default="sm_90", help="cuda architecture (sm_90: H100, H200)")
    p.add_argument("--part-mib", type=int, default=gb.PART_MIB)
    p.add_argument("--model", default=None, help="GGUF to carry (default: SmolLM2-135M)")
    s = sub.add_parser("stage", help="there: report which parts of the bundle have arrived")
    s.add_argument("--bundle", default=".gpu")
    r = sub.add_parser("run", help="there: the benchmark; with --dry-run, compile only (no GPU)")
    r.add_argument("--bundle", default=".gpu")
    r.add_argument("--json", default=None, help="write the results here")
    r.add_argument("--dry-run", action="store_true",
                   help="compile every artefact for cuda and run nothing (no GPU needed)")
    r.add_argument("--model", default=None, help="with --dry-run: the model (default: SmolLM2)")
    r.add_argument("--backends", default=",".join(BACKENDS),
                   help=f"comma-separated subset of {','.join(BACKENDS)}")
    r.add_argument("--arch", default="sm_90", help="with --dry-run: the cuda architecture")
    r.add_argument("--budget-s", type=float, default=540.0,
                   help="stop starting new steps after this many seconds")
    a = ap.parse_args(argv)
    if a.cmd == "run":
        chosen = [b for b in a.backends.split(",") if b]
        bad = [b for b in chosen if b not in BACKENDS]
        if bad or not chosen:
            ap.error(f"--backends {a.backends!r}: accepted a comma-separated subset of "
                     f"{','.join(BACKENDS)}")
        a.backends = chosen
    if getattr(a, "arch", None) is not None and not (a.arch.startswith("sm_")
                                                     and a.arch[3:].isdigit()):
        ap.error(f"--arch {a.arch!r}: expected sm_ and the compute capability, such as sm_90")
    return a


def new_results(dry_run: bool, model: str, backends: list[str]) -> dict[str, Any]:
    """The JSON's skeleton: every key present, measured or not (BENCHMARKS.md reads it)."""
    return {"schema": SCHEMA, "dry_run": dry_run, "model": model, "device": None,
            "host": platform.node(),
            "protocol": {"prompt": PROMPT, "steps": STEPS, "repeats": REPEATS, "batches":
                         list(BATCHES), "check_tokens": CHECK, "logit_bound": LOGIT_BOUND},
            "artefacts": {f"{b}/{v}": None for b in backends for v in VARIANTS},
            "checks": {}, "speed": {}, "peer": {}, "bandwidth": None, "goals": {},
            "errors": {}, "seconds": {}}


class Steps:
    """Runs named steps, recording each one's time or error, within a time budget."""

    def __init__(self, res: dict, budget_s: float):
        self.res, self.t0, self.budget = res, time.perf_counter(), budget_s

    def __call__(self, name: str, fn, *args, **kw):
        if time.perf_counter() - self.t0 > self.budget:
            self.res["errors"][name] = "skipped: the time budget was spent"
            return None
        t = time.perf_counter()
        try:
            return fn(*args, **kw)
        except Exception as e:  # one failing step must not lose the rest of a single-shot run
            self.res["errors"][name] = f"{type(e).__name__}: {e}"[:2000]
            log.error("step %s failed:\n%s", name, traceback.format_exc())
            return None
        finally:
            self.res["seconds"][name] = round(time.perf_counter() - t, 2)


def variants(module) -> dict[str, Any]:
    from splice.passes.infra.base import PassContext
    from splice.passes.quantize_weights import QuantizeWeightsPass

    int4 = QuantizeWeightsPass(bits=4, group_size=32, symmetric=True).call(
        module.clone(), PassContext()).module  # the pass rewrites the module it is given
    return {"int4": int4, "float": module}


def prompt_ids(module, n: int) -> list[int]:
    """n token ids of TEXT (repeated when the tokenizer needs more text)."""
    from splice.frontend.text import encode_text

    ids: list[int] = []
    while len(ids) < n:
        ids += encode_text(module, TEXT)
    return ids[:n]


def reference_logits(module, ids: list[int]) -> np.ndarray:
    import torch

    from splice.ir.interpreter import Interpreter, default_feeds

    x = torch.tensor([ids], dtype=torch.int64)
    out = Interpreter(module, torch.float32).run(default_feeds(module, x, None, torch.float32),
                                                 outputs=["logits"])
    return out["logits"].numpy()


def compare(got: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    got = np.asarray(got, np.float32).reshape(ref.shape)
    scale = float(np.abs(ref).max())
    rel = float(np.abs(got - ref).max() / scale)
    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
    return {"max_abs_diff": float(np.abs(got - ref).max()), "max_abs_reference": scale,
            "relative": rel, "top1_agreement": top1, "within_bound": rel <= LOGIT_BOUND,
            "finite": bool(np.isfinite(got).all())}


def compile_onnx(module, out: Path) -> Path:
    from splice.backends.onnx import export

    return export(module, out, target="cuda")


def speed_splice(art, ids: list[int], batch: int) -> dict[str, float]:
    """Prefill then STEPS greedy steps through splice's runtime, best of REPEATS."""
    rows = np.asarray([ids] * batch, np.int64)
    best = {"prefill_tok_s": 0.0, "decode_tok_s": 0.0}
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        logits, cache = art.logits(rows)  # host logits: the step is synchronised
        t1 = time.perf_counter()
        tok = logits[:, -1].argmax(-1)[:, None]
        for _ in range(STEPS):
            logits, cache = art.logits(tok, cache)
            tok = logits[:, -1].argmax(-1)[:, None]
        t2 = time.perf_counter()
        best["prefill_tok_s"] = max(best["prefill_tok_s"], batch * len(ids) / (t1 - t0))
        best["decode_tok_s"] = max(best["decode_tok_s"], batch * STEPS / (t2 - t1))
    return best


def decode_bytes(module, float_bytes: int) -> int:
    """Bytes of weights a decode step reads: every product's weight tensors, their float ones
    (weights, scales) at `float_bytes` each as the artefact stores them (ONNX cuda 2, TVM 4);
    the embedding table's gather reads one row per token, and counts only as the tied lm_head."""
    total = 0
    for node in module.graph.nodes:
        if node.op in ("linear", "qlinear", "matmul"):
            for v in node.inputs[1:]:
                if v is not None and v.is_const:
                    t = module.weights[v.const]
                    total += t.numel() * (float_bytes if t.is_floating_point()
                                          else t.element_size())
    return total


def bandwidth_gbs() -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), torch's, best of 10."""
    import torch

    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    best = 0.0
    for _ in range(10):
        torch.cuda.synchronize()
        t = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        best = max(best, 2 * a.numel() / (time.perf_counter() - t))
    return best / 1e9


def measure(a: argparse.Namespace, gguf: Path | None, tvm_libs: Path | None) -> dict[str, Any]:
    """The whole run (module docstring); with a.dry_run, compile only, on any machine."""
    from splice.frontend import load_model

    model = str(gguf) if gguf is not None else (a.model or "smollm2-135m")
    res = new_results(a.dry_run, Path(model).name, a.backends)
    step = Steps(res, a.budget_s)
    module = load_model(model)
    mods = variants(module)
    ids = prompt_ids(module, PROMPT)
    refs = {v: step(f"reference/{v}", reference_logits, mods[v], ids[:CHECK]) for v in VARIANTS}
    if not a.dry_run:
        import torch

        res["device"] = torch.cuda.get_device_name(0)
        step("cuda-libraries", _cuda_libraries, res, a.backends)
    work = Path(tempfile.mkdtemp(prefix="splice-gpu-"))
    try:
        for backend in a.backends:
            for v in VARIANTS:
                key = f"{backend}/{v}"
                path = step(f"compile/{key}", _artefact, a, backend, v, mods[v], work, tvm_libs)
                if path is None:
                    continue
                manifest = json.loads((path / "manifest.json").read_text())
                res["artefacts"][key] = {
                    "size_mb": round(sum(f.stat().st_size for f in path.rglob("*")
                                         if f.is_file()) / 1e6, 1),
                    "compile_s": res["seconds"][f"compile/{key}"],
                    # the TVM lowering computes in float32 (its float16 form is not written)
                    "compute_dtype": manifest.get("onnx", {}).get("dtype", "float32")}
                if a.dry_run:
                    continue
                art = step(f"load/{key}", _load, path)
                if art is None:
                    continue
                got = step(f"check/{key}", lambda: art.logits(np.asarray([ids[:CHECK]]))[0])
                if got is not None and refs[v] is not None:
                    res["checks"][key] = compare(got, refs[v])
                for batch in BATCHES:
                    res["speed"][f"{key}/splice runtime/batch {batch}"] = step(
                        f"speed/{key}/{batch}", speed_splice, art, ids, batch)
                    if backend == "onnx":
                        res["speed"][f"{key}/onnxruntime-genai/batch {batch}"] = step(
                            f"speed-genai/{key}/{batch}", speed_genai, path, ids, batch,
                            steps=STEPS, repeats=REPEATS)
        if not a.dry_run and "onnx" in a.backends:  # the peer runs on ONNX Runtime too
            _peer(a, res, step, gguf, work, ids)
            res["bandwidth"] = step("bandwidth", _bandwidth, mods, a.backends)
            res["goals"] = goals(res)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return res


def _artefact(a, backend: str, variant: str, module, work: Path, tvm_libs: Path | None) -> Path:
    out = work / f"{backend}_{variant}"
    if backend == "onnx":
        return compile_onnx(module, out)
    if a.dry_run or tvm_libs is None:
        from splice.backends.tvm import export

        return export(module, out, target="cuda", cuda_arch=a.arch)
    lib = tvm_libs / f"tvm_{variant}"
    fields = json.loads((lib / "fields.json").read_text())
    path = gb.write_tvm_artefact(module, lib / fields["tvm"]["library"], fields, out)
    packed = lib / gb.PARAMS_SHA
    if packed.is_file() and gb.sha256(path / fields["tvm"]["params"]) != packed.read_text():
        # a different torch/transformers there imported other weights than pack's: the library
        # still fits (same shapes), and the logits check compares with this machine's reference
        log.warning("tvm/%s: the parameters differ from those pack wrote", variant)
    return path


def _cuda_libraries(res: dict, backends: list[str]) -> None:
    """ONNX Runtime's CUDA provider loads cuBLAS/cuDNN from the nvidia packages torch brought
    (preload_dlls); TVM's CUDA runtime must have found libcudart (gpu_bundle sets the path)."""
    if "onnx" in backends:
        import onnxruntime as ort

        ort.preload_dlls()
        res["onnxruntime"] = {"version": ort.__version__,
                              "providers": ort.get_available_providers()}
    if "tvm" not in backends:
        return
    import tvm

    res["tvm"] = {"version": tvm.__version__, "cuda_visible": bool(tvm.cuda(0).exist)}
    if not res["tvm"]["cuda_visible"]:
        raise RuntimeError("TVM sees no CUDA device: libtvm_runtime_cuda.so did not load "
                           "(libcudart.so.13 not on LD_LIBRARY_PATH?)")


def _load(path: Path):
    from splice.runtime import load

    return load(path)


def _peer(a, res: dict, step: Steps, gguf: Path, work: Path, ids: list[int]) -> None:
    hf = step("peer/hf-dir", hf_dir_from_gguf, gguf, work / "hf")
    if hf is None:
        return
    for precision in ("int4", "fp16"):
        path = step(f"peer/build/{precision}", builder, hf, work / f"builder_{precision}",
                    precision)
        if path is None:
            continue
        for batch in BATCHES:
            res["peer"][f"builder {precision} cuda/batch {batch}"] = step(
                f"peer/speed/{precision}/{batch}", speed_genai, path, ids, batch,
                steps=STEPS, repeats=REPEATS)


def _bandwidth(mods: dict, backends: list[str]) -> dict[str, Any]:
    """Per artefact: the bytes a batch-1 decode step reads and the tok/s they allow at the
    copy bandwidth measured here."""
    gbs = bandwidth_gbs()
    out: dict[str, Any] = {"copy_gb_s": round(gbs, 1)}
    for backend in backends:
        for v, m in mods.items():
            b = decode_bytes(m, 2 if backend == "onnx" else 4)
            out[f"{backend}/{v}"] = {"decode_weight_bytes": b,
                                     "limit_decode_tok_s_batch1": round(gbs * 1e9 / b, 1)}
    return out


def goals(res: dict) -> dict[str, Any]:
    """The issue's goals, read off the figures (None where a figure is missing)."""
    def dec(key):
        r = res["speed"].get(key) or res["peer"].get(key)
        return r["decode_tok_s"] if r else None

    peer = dec("builder int4 cuda/batch 1")
    bw = res.get("bandwidth") or {}
    out = {}
    for key in ("onnx/int4/onnxruntime-genai/batch 1", "onnx/int4/splice runtime/batch 1",
                "tvm/int4/splice runtime/batch 1"):
        d = dec(key)
        limit = (bw.get(key.split("/")[0] + "/int4") or {}).get("limit_decode_tok_s_batch1")
        out[key] = {"decode_tok_s": d,
                    "vs_builder_int4": round(d / peer, 3) if d and peer else None,
                    "goal_1_2x_builder": bool(d and peer and d >= 1.2 * peer),
                    "fraction_of_bandwidth_limit": round(d / limit, 3) if d and limit else None}
    out["logits_within_float16_rounding"] = {k: c["within_bound"] for k, c in
                                             res["checks"].items()}
    return out


def cmd_pack(a: argparse.Namespace) -> int:
    from splice.backends.tvm import export
    from splice.frontend import load_model
    from splice.frontend.hf import default_model_path

    bundle = Path(a.bundle)
    files = bundle / "files"
    if bundle.exists():
        shutil.rmtree(bundle)
    gb.download_wheels(files / "wheels")
    gguf = Path(a.model) if a.model else default_model_path()
    (files / "model").mkdir(parents=True)
    shutil.copyfile(gguf, files / "model" / gguf.name)
    mods = variants(load_model(str(gguf)))
    with tempfile.TemporaryDirectory() as tmp:
        for v in gb.TVM_VARIANTS:
            art = export(mods[v], Path(tmp) / v, target="cuda", cuda_arch=a.arch)
            gb.copy_library_fields(art, files / f"tvm_{v}")
    index = gb.split_parts(sorted((p for p in files.rglob("*") if p.is_file()), key=lambda p:
                                  gb.pack_order(p.relative_to(files).as_posix())),
                           files, bundle, a.part_mib)
    meta = gb.plan(bundle, index, {"model": gguf.name, "arch": a.arch})
    print(json.dumps(meta["calls"], indent=2))
    return 0


def cmd_stage(a: argparse.Namespace) -> int:
    have, missing = gb.staged(Path(a.bundle))
    print(json.dumps({"have": have, "missing": missing}))
    return 0


def cmd_run(a: argparse.Namespace, argv: list[str]) -> int:
    if a.dry_run:
        res = measure(a, None, None)
    else:
        bundle = Path(a.bundle)
        joined = bundle / "joined"
        if "SPLICE_GPU_SITE" not in os.environ:  # the TVM half runs before ORT's parts arrive
            files = gb.join(bundle, joined, partial=a.backends == ["tvm"])
            gb.install([p for k, p in files.items() if k.endswith(".whl")], Path.cwd())
            gb.reexec_with(gb.SITE, argv)  # does not return
        gguf = next((joined / "model").glob("*.gguf"))
        res = measure(a, gguf, joined)
    text = json.dumps(res, indent=2, default=float)
    if a.json:
        Path(a.json).write_text(text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if a.cmd == "pack":
        return cmd_pack(a)
    if a.cmd == "stage":
        return cmd_stage(a)
    return cmd_run(a, argv)


if __name__ == "__main__":
    sys.exit(main())
