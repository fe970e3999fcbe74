"""Run a cross-compiled TVM artefact on another architecture: TVM's C++ runtime and
edge_runner.cc built with a cross compiler, run under qemu-user.

The apache-tvm wheel is x86-64 only, but it ships the sources of its runtime (tvm/src/runtime,
the VM included) and of tvm-ffi (tvm_ffi/src), which is all a device needs to load the exported
library: this module compiles them with Debian's aarch64-linux-gnu-g++ into one executable, the
runner, cached per TVM version and runner source (a few minutes once). `run_artefact` then runs it
on an artefact under qemu-aarch64 and returns what it printed: the prefill's last logits row and a
greedy continuation, for comparison with the x86 runtime.
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

from ...errors import InputError

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
# TVM's CPU runtime and the Relax VM (no RPC, disco, paged KV cache or accelerator back ends)
RUNTIME_SOURCES = ("device_api.cc", "cpu_device_api.cc", "tensor.cc", "module.cc",
                   "thread_pool.cc", "threading_backend.cc", "workspace_pool.cc", "logging.cc",
                   "file_utils.cc", "const_loader_module.cc", "memory/memory_manager.cc",
                   "builtin_fp16.cc", "timer.cc", "static_library.cc", "vm/vm.cc",
                   "vm/builtin.cc", "vm/executable.cc", "vm/bytecode.cc")


# included by the runtime sources the wheel ships, but not shipped with them
SUPPORT_HEADERS = ("include/tvm/support/io.h", "include/tvm/support/serializer.h",
                   "src/support/bytes_io.h", "src/support/utils.h", "src/support/base64.h")


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


def _root(cache_dir: str | Path | None) -> Path:
    import tvm

    key = hashlib.sha256(f"{tvm.__version__}|{_runner_source().read_bytes()!r}".encode())
    base = Path(cache_dir) if cache_dir else \
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "splice" / "tvm-aarch64"
    return base / key.hexdigest()[:16]


def cached_runner(cache_dir: str | Path | None = None) -> Path | None:
    """The runner if it is already built for this TVM version and runner source, else None."""
    runner = _root(cache_dir) / "edge_runner"
    return runner if runner.is_file() else None


def build_runner(tvm_source: str | Path, cache_dir: str | Path | None = None, *,
                 jobs: int = 2) -> Path:
    """The aarch64 runner executable, built once per TVM version and runner source (the cache
    is $XDG_CACHE_HOME/splice/tvm-aarch64, or `cache_dir`).

    `tvm_source` is a TVM source tree of the installed version (or any directory holding the
    same paths): the wheel ships the runtime's .cc files but not five headers they include,
    SUPPORT_HEADERS, which are taken from there."""
    problem = available()
    if problem:
        raise InputError(f"cannot build the aarch64 runner: {problem}")
    tvm_source = Path(tvm_source)
    missing = [h for h in SUPPORT_HEADERS if not (tvm_source / h).is_file()]
    if missing:
        raise InputError(f"tvm_source {tvm_source} lacks {missing}; give a TVM source tree of "
                         "the installed version (the apache-tvm wheel does not ship them)")
    tvm_dir, ffi_dir = _packages()
    source = _runner_source()
    root = _root(cache_dir)
    runner = root / "edge_runner"
    if runner.is_file():
        return runner
    (root / "obj").mkdir(parents=True, exist_ok=True)
    # "../support/x.h" from src/runtime and "../../support/x.h" from src/runtime/vm resolve
    # against these two (possibly empty) directories of the source tree
    relative = [tvm_source / "src" / "runtime", tvm_source / "src" / "runtime" / "vm"]
    for d in relative:
        d.mkdir(parents=True, exist_ok=True)
    includes = [tvm_dir / "include", tvm_source / "include", ffi_dir / "include",
                ffi_dir / "include" / "dlpack" / "include", tvm_dir / "src",
                tvm_dir / "src" / "runtime", ffi_dir / "src", *relative]
    for extra in ffi_dir.glob("3rdparty/*/include"):
        includes.append(extra)
    flags = ["-std=c++17", "-O2", "-fPIC", "-DNDEBUG", "-DTVM_FFI_USE_LIBBACKTRACE=0",
             "-DTVM_FFI_BACKTRACE_ON_SEGFAULT=0", "-DDMLC_USE_LOGGING_LIBRARY=<tvm/runtime/logging.h>",
             "-DTVM_USE_LIBBACKTRACE=0", "-DTVM_LOG_CUSTOMIZE=0",
             *[f"-I{p}" for p in includes]]
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
