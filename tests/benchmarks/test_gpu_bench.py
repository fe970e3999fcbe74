"""benchmarks/gpu.py and gpu_bundle.py without a GPU: the arguments, the JSON's shape, a dry
run that compiles the ONNX cuda artefacts of a small real model and runs nothing, and the bundle
(parts cut to size, reassembled with their hashes checked, the staged calls, TVM's wheel without
its compiler). The run itself needs a lent GPU machine (the issue's blocked part)."""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest

from benchmarks import gpu, gpu_bundle as gb
from tests.paths import STORIES


def test_arguments_are_checked():
    a = gpu.parse(["run", "--dry-run", "--backends", "onnx"])
    assert a.cmd == "run" and a.dry_run and a.backends == ["onnx"]
    assert gpu.parse(["run"]).backends == list(gpu.BACKENDS)
    assert gpu.parse(["pack", "--arch", "sm_80"]).arch == "sm_80"
    for bad in (["run", "--backends", "onnx,gguf"], ["run", "--backends", ","],
                ["pack", "--arch", "90"], []):
        with pytest.raises(SystemExit):
            gpu.parse(bad)


def test_results_name_every_figure_before_any_is_measured():
    res = gpu.new_results(True, "m.gguf", ["onnx", "tvm"])
    assert set(res) >= {"schema", "dry_run", "device", "protocol", "artefacts", "checks", "speed",
                        "peer", "bandwidth", "goals", "errors", "seconds"}
    assert set(res["artefacts"]) == {"onnx/int4", "onnx/float", "tvm/int4", "tvm/float"}
    assert res["protocol"]["batches"] == [1, 16]
    json.dumps(res)


def test_compare_and_goals():
    import numpy as np

    ref = np.random.default_rng(0).normal(size=(1, 4, 10)).astype(np.float32)
    ok = gpu.compare(ref + 1e-3, ref)
    assert ok["within_bound"] and ok["top1_agreement"] == 1.0 and ok["finite"]
    assert not gpu.compare(ref * 2, ref)["within_bound"]
    res = gpu.new_results(False, "m", ["onnx", "tvm"])
    res["speed"]["tvm/int4/splice runtime/batch 1"] = {"decode_tok_s": 600.0}
    res["peer"]["builder int4 cuda/batch 1"] = {"decode_tok_s": 400.0}
    res["bandwidth"] = {"tvm/int4": {"limit_decode_tok_s_batch1": 1000.0}}
    g = gpu.goals(res)["tvm/int4/splice runtime/batch 1"]
    assert g["vs_builder_int4"] == 1.5 and g["goal_1_2x_builder"]
    assert g["fraction_of_bandwidth_limit"] == 0.6
    assert gpu.goals(res)["onnx/int4/splice runtime/batch 1"]["decode_tok_s"] is None


def test_dry_run_compiles_the_cuda_artefacts_and_runs_nothing(tmp_path):
    out = tmp_path / "gpu.json"
    assert gpu.main(["run", "--dry-run", "--model", str(STORIES), "--backends", "onnx",
                     "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["dry_run"] and res["errors"] == {}
    for key in ("onnx/int4", "onnx/float"):
        assert res["artefacts"][key]["compute_dtype"] == "float16"
        assert res["artefacts"][key]["compile_s"] >= 0
    assert res["checks"] == {} and res["speed"] == {} and res["peer"] == {}
    assert "tvm/int4" not in res["artefacts"]


def test_bundle_parts_join_back_with_their_hashes(tmp_path):
    root, bundle = tmp_path / "files", tmp_path / ".gpu"
    (root / "model").mkdir(parents=True)
    big = root / "model" / "m.gguf"
    big.write_bytes(bytes(range(256)) * 6000)  # 1.5 MiB: cut across two parts of 1 MiB
    (root / "empty.txt").write_bytes(b"")
    small = root / "w.whl"
    small.write_bytes(b"wheel")
    index = gb.split_parts([big, root / "empty.txt", small], root, bundle, part_mib=1)
    meta = gb.plan(bundle, index, {"model": "m.gguf"})
    assert meta["parts"] == ["part00", "part01"]
    assert all(sum(f.stat().st_size for f in (bundle / p).rglob("*") if f.is_file()) <= 1 << 20
               for p in meta["parts"])
    assert [c["carry"] for c in meta["calls"][:-1]] == [[f"{bundle.as_posix()}/part00"],
                                                         [f"{bundle.as_posix()}/part01"]]
    assert meta["calls"][-1]["carry"] == [] and "benchmarks.gpu run" in meta["calls"][-1]["command"]
    joined = gb.join(bundle, tmp_path / "joined")
    assert joined["model/m.gguf"].read_bytes() == big.read_bytes()
    assert joined["empty.txt"].read_bytes() == b"" and joined["w.whl"].read_bytes() == b"wheel"
    # a part not yet staged on the machine: named, nothing joined
    for f in (bundle / "part01").rglob("*"):
        if f.is_file():
            f.unlink()
    (bundle / "part01" / "model").rmdir()
    (bundle / "part01").rmdir()
    assert gb.staged(bundle) == (["part00"], ["part01"])
    with pytest.raises(SystemExit, match="part01"):
        gb.join(bundle, tmp_path / "joined2")


def test_tvm_wheel_is_repacked_without_its_compiler(tmp_path):
    wheel = tmp_path / "apache_tvm-0.27.0-py3-none-any.whl"
    record = "tvm/__init__.py,sha256=x,1\ntvm/lib/libtvm_compiler.so,sha256=y,2\n"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("tvm/__init__.py", "")
        z.writestr(gb.TVM_COMPILER, b"\0" * 100)
        z.writestr("apache_tvm-0.27.0.dist-info/RECORD", record)
    gb.runtime_only(wheel)
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert gb.TVM_COMPILER not in names and "tvm/__init__.py" in names
        assert b"libtvm_compiler" not in z.read("apache_tvm-0.27.0.dist-info/RECORD")


def test_splice_is_laid_out_as_installed(tmp_path):
    """The GPU machine gets splice by copying pyproject's package-dir folders (no build)."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    gb.install_splice(repo, tmp_path)
    assert (tmp_path / "splice" / "ir" / "core.py").is_file()
    assert (tmp_path / "splice" / "backends" / "onnx" / "cuda.py").is_file()
    code = "import splice.backends.onnx.cuda as c, splice.ir.core; print(c.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True, env={"PYTHONPATH": str(tmp_path)}).stdout
    assert out.startswith(str(tmp_path))


def test_decode_bytes_count_weights_as_the_artefact_stores_them():
    from tests.tiny import tiny_module

    module = tiny_module(num_layers=1)
    mods = gpu.variants(module)
    f2, f4 = gpu.decode_bytes(mods["float"], 2), gpu.decode_bytes(mods["float"], 4)
    assert f4 == 2 * f2 > 0
    q2, q4 = gpu.decode_bytes(mods["int4"], 2), gpu.decode_bytes(mods["int4"], 4)
    assert q2 < f2 and q2 < q4 < f4  # int4 codes are bytes whatever the float width


def test_the_tvm_half_is_packed_first_and_run_as_soon_as_it_is_staged(tmp_path):
    root, bundle = tmp_path / "files", tmp_path / ".gpu"
    (root / "wheels").mkdir(parents=True)
    (root / "model").mkdir()
    names = ["wheels/onnxruntime_gpu-1.whl", "wheels/onnxruntime_genai_cuda-1.whl",
             "wheels/apache_tvm-1.whl", "model/m.gguf"]
    for n in names:
        (root / n).write_bytes(b"x" * (700 << 10))  # 0.7 MiB each: one per part of 1 MiB
    files = sorted((root / n for n in names), key=lambda p: gb.pack_order(
        p.relative_to(root).as_posix()))
    assert [p.name for p in files][-2:] == ["onnxruntime_genai_cuda-1.whl",
                                           "onnxruntime_gpu-1.whl"]
    index = gb.split_parts(files, root, bundle, part_mib=1)
    meta = gb.plan(bundle, index, {})
    ready = gb.tvm_ready_part(index)
    assert ready == "part01" and meta["parts"][-1] == "part02"
    runs = [c for c in meta["calls"] if "benchmarks.gpu run" in c["command"]]
    assert "--backends tvm" in runs[0]["command"] and runs[0]["carry"][0].endswith(ready)
    assert "--backends" not in runs[-1]["command"] and runs[-1]["carry"] == []
    # with ONNX Runtime's last part missing, the TVM half's files join; the rest wait
    shutil.rmtree(bundle / "part02")
    joined = gb.join(bundle, tmp_path / "j", partial=True)
    assert {"model/m.gguf", "wheels/apache_tvm-1.whl"} <= set(joined)
    assert "wheels/onnxruntime_gpu-1.whl" not in joined
