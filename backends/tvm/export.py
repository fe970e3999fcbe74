"""The TVM backend's entry: an ir.Module -> an artefact directory that runtime.load runs.

The artefact holds model.so (the Relax VM executable with every kernel, `export_library`),
params.safetensors (the weights in the layouts the kernels read, context.Param), the tokenizer files
and a manifest: the model config, the decoder's I/O names (common.decoder_io, the `io` section
every backend writes), the parameter list in argument order, and the target (kind,
architecture, the CPU features the code was compiled to use) so that a runtime refuses a library
its machine cannot run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import tvm
from tvm.target import codegen

from splice.errors import InputError
from splice.ir.core import Module
from ..artefact import write_artefact
from ..common import decoder_io, manifest_fields, tokenizer_files
from .attention import KEY_TILE
from .build import POOL_TARGETS, TARGETS, build, export_library, make_target
from .lower import lower

log = logging.getLogger(__name__)

ACTIVATIONS = ("float", "int8")  # the activations the int4/int8 products multiply
KV_CACHES = ("float32", "float16")  # the dtypes the KV cache may store
LIBRARY = "model.so"
PARAMS = "params.safetensors"
# LLVM feature name -> /proc/cpuinfo flag, for the vector extensions kernels may use
CPU_FLAGS = {"sse4.2": "sse4_2", "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c",
             "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512dq": "avx512dq",
             "avx512vl": "avx512vl", "avx512cd": "avx512cd", "avx512vnni": "avx512_vnni",
             "avx512bf16": "avx512_bf16", "avx512vbmi": "avx512vbmi", "avxvnni": "avx_vnni"}


def export(module: Module, out_dir: str | Path, *, target: str = "cpu",
           recipe: dict | None = None, report: list | dict | None = None, threads: int = 2,
           mcpu: str | None = None, prefill_chunk: int = 256, schedule: bool = True,
           cuda_arch: str = "sm_80", activations: str = "float", kv_cache: str = "float32"
           ) -> Path:
    """Lower, schedule and build `module` for `target` ("cpu", "cuda" or "aarch64") and write the
    artefact into `out_dir` atomically. `threads`: the cores the CPU kernels are split over (and
    the runtime's default pool size); `mcpu`: an LLVM CPU name (default: this machine's);
    `cuda_arch`: the GPU architecture cuda code is compiled for ("sm_90" for an H100);
    `schedule`: False builds the CPU kernels unscheduled (for tests; ~20x slower);
    `activations`: "float" (default) or "int8": the int4/int8 products (prefill and decode)
    quantize their input to int8 per block and multiply bytes (qdot.py: the cpu target on x86
    with AVX2, or the aarch64 target, whose library then needs Armv8.2's dot product);
    `kv_cache`: "float32" (default, exact) or "float16" (the cache's keys and values rounded to
    half precision, as llama.cpp's default cache: half the bytes a decode step reads from it,
    which at a long context are as many as the weights')."""
    if target not in TARGETS:
        raise InputError(f"TVM backend: unknown target {target!r}; accepted: {', '.join(TARGETS)}")
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise InputError(f"TVM backend: threads={threads!r}; expected a positive integer")
    if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
        raise InputError(f"TVM backend: prefill_chunk={prefill_chunk!r}; expected a positive "
                         "integer")
    if activations not in ACTIVATIONS:
        raise InputError(f"TVM backend: activations={activations!r}; accepted: "
                         f"{', '.join(ACTIVATIONS)}")
    if activations == "int8" and target != "aarch64" and (
            target != "cpu" or "avx2" not in codegen.llvm_get_cpu_features(
                make_target(target, threads=threads, mcpu=mcpu))):
        raise InputError("TVM backend: activations='int8' needs the cpu target on an x86 CPU "
                         "with AVX2 (its products use vpmaddubsw) or the aarch64 target (sdot: "
                         "Armv8.2's dot product); use activations='float'")
    if kv_cache not in KV_CACHES:
        raise InputError(f"TVM backend: kv_cache={kv_cache!r}; accepted: {', '.join(KV_CACHES)}")
    if not (isinstance(cuda_arch, str) and cuda_arch[:3] == "sm_" and cuda_arch[3:].isdigit()):
        raise InputError(f"TVM backend: cuda_arch={cuda_arch!r}; expected 'sm_' and the compute "
                         "capability's digits, such as 'sm_80' or 'sm_90'")
    t0 = time.perf_counter()
    tgt = make_target(target, threads=threads, mcpu=mcpu, cuda_arch=cuda_arch,
                      dotprod=activations == "int8")
    lowered = lower(module, packed=target != "cuda", activations=activations, kv_cache=kv_cache,
                    isa=dot_isa(target, tgt))
    t1 = time.perf_counter()
    ex = build(lowered.mod, tgt, schedule=schedule)
    t2 = time.perf_counter()

    def write_params(dest: Path) -> None:
        from safetensors.numpy import save_file

        save_file({p.name: p.array(module) for p in lowered.params}, str(dest))

    files: dict[str, Any] = {LIBRARY: lambda dest: export_library(ex, dest, target),
                             PARAMS: write_params}
    tokenizer = tokenizer_files(module, files)
    report = {**(report if isinstance(report, dict) else {"passes": report}),
              "lower_s": round(t1 - t0, 3), "build_s": round(t2 - t1, 3)}
    built = {g.name_hint for g in lowered.mod.get_global_vars()}
    functions = [f for f in ("prefill", "decode", "prefill_last") if f in built]
    fields = manifest_fields(
        module, backend="tvm", target=target, created_by=f"with TVM {tvm.__version__}",
        io=decoder_io(module.graph), tokenizer=tokenizer, recipe=recipe, report=report,
        tvm={
            "library": LIBRARY, "params": PARAMS, "functions": functions,
            "param_list": [{"name": p.name, "source": p.source, "layout": p.layout,
                            "shape": list(p.shape), "dtype": p.dtype} for p in lowered.params],
            "cache": {"key": ["batch", "kv_heads", "head_dim", "capacity"],
                      "value": ["batch", "kv_heads", "capacity", "head_dim"],
                      "capacity_multiple": KEY_TILE, "update": "in place", "dtype": kv_cache},
            "target": str(tgt), "target_kind": tgt.kind.name,
            **_machine(target, tgt, activations),
            "decode_batch": 1 if target != "cuda" else None,
            "pool": "splice" if target in POOL_TARGETS else None,
            "threads": threads, "prefill_chunk": prefill_chunk, "scheduled": schedule,
            "activations": activations,
            "tuning": None,
        })
    path = write_artefact(out_dir, files, fields)
    log.info("TVM artefact %s: lowering %.1f s, build %.1f s, total %.1f s", path, t1 - t0,
             t2 - t1, time.perf_counter() - t0)
    return path


def dot_isa(target: str, tgt: tvm.target.Target) -> str:
    """The integer dot products the int8-activation products use (qdot.ISAS): aarch64's sdot;
    on x86 VNNI's vpdpbusd where the target CPU has it, on 512-bit registers with AVX-512 (VNNI
    and BW), else on 256-bit ones (AVX-VNNI, or AVX-512 VNNI's VL forms); else AVX2's
    vpmaddubsw."""
    if target == "aarch64":
        return "neon"
    features = set(codegen.llvm_get_cpu_features(tgt)) if tgt.kind.name == "llvm" else set()
    if {"avx512vnni", "avx512bw"} <= features:
        return "vnni512"
    if "avxvnni" in features or {"avx512vnni", "avx512vl"} <= features:
        return "vnni"
    return "avx2"


def _machine(target: str, tgt: tvm.target.Target, activations: str) -> dict[str, Any]:
    """The architecture and the CPU features the runtime checks before loading (aarch64's int8
    products: the dot product, /proc/cpuinfo's asimddp)."""
    if tgt.kind.name != "llvm":
        return {"arch": "x86_64"}
    if target == "aarch64":
        return {"arch": "aarch64", "cpu_features": ["asimddp"] if activations == "int8" else []}
    features = codegen.llvm_get_cpu_features(tgt)
    return {"arch": "x86_64",
            "cpu_features": sorted(CPU_FLAGS[f] for f in features if f in CPU_FLAGS)}
