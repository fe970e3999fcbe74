"""Run a cross-compiled TVM artefact on another architecture: TVM's C++ runtime and
edge_runner.cc built with a cross compiler, run under qemu-user.

The apache-tvm wheel is x86-64 only, but it ships the sources of its runtime (tvm/src/runtime,
the VM included) and of tvm-ffi (tvm_ffi/src), which is all a device needs to load the exported
library: this module compiles them with Debian's aarch64-linux-gnu-g++ into one executable, the
runner, cached per TVM version and runner source (a few minutes once). `run_artefact` then runs it
on an artefact under qemu-aarch64 and returns what it printed: the prefill's last logits row and a
greedy continuation, for comparison with the x86 runtime.

The runtime sources include six headers the wheel does not ship (SUPPORT_HEADERS: byte streams,
the serializer of the executable's sections, base64, a string helper, the NVTX range the VM
opens). edge_support/ holds splice's own implementations of exactly what the compiled sources use
from them, written from those call sites; the serializer's byte layout is the one TVM's x86
build writes into the library, which the test checks end to end (the aarch64 runner loads an
x86-exported executable and reproduces the x86 logits). No TVM source tree is needed.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import numpy as np

from splice.errors import InputError

log = logging.getLogger(__name__)

CXX = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"
SYSROOT = Path("/usr/aarch64-linux-gnu")

# tvm-ffi: the object system, functions, tensors, modules and the dynamic library loader
FFI_SOURCES = ("function.cc", "backtrace.cc", "init_once.cc", "dtype.cc", "object.cc", "tensor.cc",
               "error.cc", "custom_allocator.cc", "container.cc", "extra/module.cc",
               "extra/library_module.cc", "extra/library_module_dynamic_lib.cc",
               "extra/library_module_system_lib.cc", "extra/env_c_api.cc",
               "extra/env_context.cc", "extra/json_parser.cc", "extra/json_writer.cc",
               "extra/reflection_extra.cc", "extra/serialization.cc", "extra/dataclass.cc",
               "extra/structural_equal.cc", "extra/structural_hash.cc",
               "extra/structural_visit.cc", "extra/structural_mutate.cc",
               "extra/visit_error_context.cc")
# TVM's CPU runtime and the Relax VM (no RPC, disco, paged KV cache or accelerator back ends;
# not builtin_fp16.cc either: its fp16 conversion fallbacks need compiler-rt's header, and
# float32 code on aarch64 calls none of them)
RUNTIME_SOURCES = ("device_api.cc", "cpu_device_api.cc", "tensor.cc", "module.cc",
                   "thread_pool.cc", "threading_backend.cc", "workspace_pool.cc", "logging.cc",
                   "file_utils.cc", "const_loader_module.cc", "memory/memory_manager.cc",
                   "timer.cc", "static_library.cc", "vm/vm.cc",
                   "vm/builtin.cc", "vm/executable.cc", "vm/bytecode.cc")


FLAGS = ("-std=c++17", "-O2", "-fPIC", "-DNDEBUG", "-DTVM_FFI_USE_LIBBACKTRACE=0",
         "-DTVM_FFI_BACKTRACE_ON_SEGFAULT=0", "-DDMLC_USE_LOGGING_LIBRARY=<tvm/runtime/logging.h>",
         "-DTVM_USE_LIBBACKTRACE=0", "-DTVM_LOG_CUSTOMIZE=0")


# included by the runtime sources the wheel ships, but not shipped with them: edge_support/ has
# ours (module docstring)
SUPPORT_HEADERS = ("include/tvm/support/io.h", "include/tvm/support/serializer.h",
                   "include/tvm/support/cuda/nvtx.h", "src/support/bytes_io.h",
                   "src/support/utils.h", "src/support/base64.h")


def available() -> str | None:
    """None when the cross toolchain and qemu are here, else what is missing."""
    missing = [t for t in (CXX, QEMU) if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} not installed (Debian: make cross)"
    return None


def _packages() -> tuple[Path, Path]:
    import tvm
    import tvm_ffi

    return Path(tvm.__file__).parent, Path(tvm_ffi.__file__).parent


def _runner_source() -> Path:
    return Path(str(resources.files("splice.backends.tvm").joinpath("edge_runner.cc")))


def _support_dir() -> Path:
    return Path(str(resources.files("splice.backends.tvm").joinpath("edge_support")))


def _root(cache_dir: str | Path | None) -> Path:
    import tvm

    # everything the runner is made from: TVM's version, the units, flags and our sources
    key = hashlib.sha256(f"{tvm.__version__}|{FFI_SOURCES}|{RUNTIME_SOURCES}|{FLAGS}".encode())
    key.update(_runner_source().read_bytes())
    for h in SUPPORT_HEADERS:
        key.update((_support_dir() / h).read_bytes())
    base = Path(cache_dir) if cache_dir else \
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "splice" / "tvm-aarch64"
    return base / key.hexdigest()[:16]


def cached_runner(cache_dir: str | Path | None = None) -> Path | None:
    """The runner if it is already built for this TVM version and these sources, else None."""
    runner = _root(cache_dir) / "edge_runner"
    return runner if runner.is_file() else None


def build_runner(cache_dir: str | Path | None = None, *, jobs: int = 2) -> Path:
    """The aarch64 runner executable, built once per TVM version, runner source and support
    headers (the cache is $XDG_CACHE_HOME/splice/tvm-aarch64, or `cache_dir`)."""
    problem = available()
    if problem:
        raise InputError(f"cannot build the aarch64 runner: {problem}")
    tvm_dir, ffi_dir = _packages()
    source = _runner_source()
    root = _root(cache_dir)
    runner = root / "edge_runner"
    if runner.is_file():
        return runner
    (root / "obj").mkdir(parents=True, exist_ok=True)
    # the support headers, copied beside the objects: the runtime includes some as
    # "../support/x.h" (from src/runtime) and "../../support/x.h" (from src/runtime/vm), which
    # resolve against the include directories support/src/runtime and support/src/runtime/vm,
    # so those must exist
    support = root / "support"
    for h in SUPPORT_HEADERS:
        (support / h).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_support_dir() / h, support / h)
    relative = [support / "src" / "runtime", support / "src" / "runtime" / "vm"]
    for d in relative:
        d.mkdir(parents=True, exist_ok=True)
    includes = [tvm_dir / "include", support / "include", ffi_dir / "include",
                ffi_dir / "include" / "dlpack" / "include", tvm_dir / "src",
                tvm_dir / "src" / "runtime", ffi_dir / "src", *relative]
    for extra in ffi_dir.glob("3rdparty/*/include"):
        includes.append(extra)
    flags = [*FLAGS, *[f"-I{p}" for p in includes]]
    units = [ffi_dir / "src" / "ffi" / s for s in FFI_SOURCES] + \
        [tvm_dir / "src" / "runtime" / s for s in RUNTIME_SOURCES] + [source]

    def compile_one(src: Path) -> Path:
        obj = root / "obj" / (src.relative_to(src.parents[2]).as_posix().replace("/", "_") + ".o")
        if not obj.is_file():
            cmd = [CXX, *flags, "-c", str(src), "-o", str(obj) + ".tmp"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(f"compiling {src} failed:\n{r.stderr[-3000:]}")
            os.replace(str(obj) + ".tmp", obj)
        return obj

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        objs = list(pool.map(compile_one, units))
    r = subprocess.run([CXX, "-o", str(runner) + ".tmp", *map(str, objs), "-rdynamic", "-ldl",
                        "-lpthread"], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"linking the aarch64 runner failed:\n{r.stderr[-3000:]}")
    os.replace(str(runner) + ".tmp", runner)
    log.info("built the aarch64 TVM runner %s", runner)
    return runner


def run_artefact(runner: Path, artefact: str | Path, prompt: list[int], steps: int, *,
                 timeout: float = 600) -> tuple[np.ndarray, list[int]]:
    """Run the runner on `artefact` under qemu-aarch64: (last logits row, greedy tokens)."""
    cmd = [QEMU, "-L", str(SYSROOT), str(runner), str(artefact), str(steps), *map(str, prompt)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "TVM_NUM_THREADS": "1"})
    if r.returncode:
        raise RuntimeError(f"the aarch64 runner failed ({r.returncode}): {r.stderr[-3000:]}")
    lines = dict(line.split(" ", 1) for line in r.stdout.strip().splitlines() if " " in line)
    logits = np.array([float(v) for v in lines["logits"].split()], dtype=np.float32)
    tokens = [int(t) for t in lines.get("tokens", "").split()]
    return logits, tokens


def main() -> int:
    """`python -m splice.backends.tvm.cross` (`make cross`): build the runner into the cache."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    problem = available()
    if problem:
        log.error("cannot build the aarch64 runner: %s", problem)
        return 1
    log.info("aarch64 runner: %s", build_runner())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
