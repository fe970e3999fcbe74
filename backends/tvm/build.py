"""Targets and the build: Relax module -> scheduled -> a VM executable -> an exported library.

Targets. "cpu" is llvm for this machine's CPU (its `-mcpu`, as LLVM detects it, and the cores
the parallel loops split over); "cuda" is an NVIDIA GPU (sm_80 by default, llvm host code);
"aarch64" is llvm for 64-bit ARM Linux, cross-compiled and linked with Debian's
aarch64-linux-gnu-gcc. The manifest records the target's full description so the runtime can
refuse to load code compiled for a CPU it is not running on.

The pipeline is TVM's default for the target kind (library dispatch, legalisation, dataflow
lowering, memory planning, VM lowering) with two changes: no FuseOps/FuseTIR, because the
lowering already emits fused kernels (linear + bias + residual) and keeps every other kernel
whole, and our schedule rules (schedule.py) in place of the default ones, applied after reshapes
have become views (a scheduled reshape kernel is no longer recognised as one, and copies).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import tvm
from tvm import relax
from tvm.s_tir import dlight as dl
from tvm.target import codegen

from splice.errors import InputError
from .cuda_schedule import cuda_rules
from .schedule import cpu_rules

log = logging.getLogger(__name__)

TARGETS = ("cpu", "cuda", "aarch64")
CROSS_CC = {"aarch64": "aarch64-linux-gnu-gcc"}
AARCH64_TRIPLE = "aarch64-linux-gnu"
POOL_SOURCE = Path(__file__).with_name("pool.c")
REPLAY_SOURCE = Path(__file__).with_name("replay.c")
POOL_TARGETS = ("cpu", "aarch64")  # llvm libraries whose parallel loops splice's pool runs


def make_target(target: str, *, threads: int = 2, mcpu: str | None = None,
                cuda_arch: str = "sm_80", dotprod: bool = False) -> tvm.target.Target:
    """The tvm Target for a splice target name (see TARGETS). `dotprod`: aarch64 code may use
    the Armv8.2 dot-product instructions (the int8-activation products need them)."""
    if target == "cpu":
        return tvm.target.Target({"kind": "llvm", "mcpu": mcpu or codegen.llvm_get_system_cpu(),
                                  "num-cores": threads})
    if target == "aarch64":
        return tvm.target.Target({"kind": "llvm", "mtriple": AARCH64_TRIPLE,
                                  "mcpu": mcpu or "generic",
                                  "mattr": ["+neon", "+dotprod"] if dotprod else ["+neon"],
                                  "num-cores": threads})
    if target == "cuda":
        return tvm.target.Target({"kind": "cuda", "arch": cuda_arch},
                                 host={"kind": "llvm"})
    raise InputError(f"TVM backend: unknown target {target!r}; accepted: {', '.join(TARGETS)}")


def pipeline(target: tvm.target.Target, *, schedule: bool = True) -> tvm.transform.Pass:
    """TVM's pipeline for the target kind, without operator fusion, with our schedules.
    schedule=False leaves the CPU kernels as the lowering wrote them (plain loop nests; tests
    compare both, so a schedule cannot hide a lowering bug, nor a lowering bug a schedule's);
    GPU kernels always need their thread bindings."""
    rules = cuda_rules() if target.kind.name == "cuda" else cpu_rules() if schedule else []
    passes = [relax.backend.DispatchSampling(), relax.backend.DispatchSortScan(),
              relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
              # reshapes become views before anything schedules their copy kernels
              relax.transform.RewriteDataflowReshape(), relax.transform.DeadCodeElimination(),
              dl.ApplyDefaultSchedule(*rules), relax.transform.ToNonDataflow(),
              relax.transform.RemovePurityChecking(), relax.transform.CallTIRRewrite(),
              relax.transform.StaticPlanBlockMemory()]
    if target.kind.name == "cuda":
        passes.append(relax.transform.RewriteCUDAGraph())
    passes += [relax.transform.LowerAllocTensor(), relax.transform.KillAfterLastUse(),
               relax.transform.LowerRuntimeBuiltin(), relax.transform.ComputePrimValue(),
               relax.transform.VMShapeLower(), relax.transform.AttachGlobalSymbol()]

    @tvm.transform.module_pass(opt_level=0, name="SplicePipeline")
    def _pipeline(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
        with target:
            return tvm.transform.Sequential(passes)(mod)
    return _pipeline


def build(mod: tvm.ir.IRModule, target: tvm.target.Target, *,
          schedule: bool = True) -> relax.VMExecutable:
    """Schedule and compile the Relax module for `target`."""
    t0 = time.perf_counter()
    ex = tvm.compile(mod, target, relax_pipeline=pipeline(target, schedule=schedule))
    log.info("TVM build for %s took %.1f s", target.kind.name, time.perf_counter() - t0)
    return ex


def export_library(ex: relax.VMExecutable, path: Path, target_name: str) -> None:
    """Write the executable as a shared library; cross targets link with their toolchain. CPU
    libraries carry splice's thread pool (pool.c, which the runtime installs in place of TVM's
    for the library's parallel loops) and its decode replay loop (replay.c)."""
    cc = CROSS_CC.get(target_name)
    if cc is not None and shutil.which(cc) is None:
        raise InputError(f"cross-compiling for {target_name} needs {cc} on PATH (Debian: apt-get "
                         "install gcc-aarch64-linux-gnu, or `make cross`)")
    with tempfile.TemporaryDirectory(prefix="splice-pool-") as tmp:
        extra: dict = {} if cc is None else {"cc": cc}
        if target_name in POOL_TARGETS:
            extra.update(addons=[_compile_c(cc or "gcc", src, Path(tmp))
                                 for src in (POOL_SOURCE, REPLAY_SOURCE)], options=["-pthread"])
        ex.export_library(str(path), **extra)


def _compile_c(cc: str, source: Path, tmp: Path) -> str:
    """A C source of ours as an object file for the library (C, not the C++ TVM links with)."""
    if shutil.which(cc) is None:
        raise InputError(f"the TVM CPU library needs a C compiler ({cc}) on PATH")
    obj = tmp / f"{source.stem}.o"
    r = subprocess.run([cc, "-O2", "-fPIC", "-pthread", "-c", str(source), "-o", str(obj)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{cc} failed on {source.name}:\n{r.stderr[-2000:]}")
    return str(obj)
