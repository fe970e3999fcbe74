"""The `splice compile` command line with the TVM backend: --backend tvm, --activations, and the
CPU presets' default backend (TVM with int8 activations and a float16 KV cache where they run, ONNX otherwise)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install 'splice[tvm]')")

from splice.runtime import load  # noqa: E402
from tests.paths import STORIES  # noqa: E402


def test_cli_compiles_with_the_tvm_backend(tmp_path):
    from splice.cli import main

    out = tmp_path / "art"
    assert main(["compile", str(STORIES), "--backend", "tvm", "--recipe", "none", "--out",
                 str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"] == "tvm" and manifest["tvm"]["target_kind"] == "llvm"
    assert load(out).generate("Once", max_new_tokens=4)


def test_cli_compiles_a_cpu_preset_for_tvm_int8_unless_told_otherwise(tmp_path, capsys):
    """No --backend: a CPU preset becomes a TVM artefact with int8 activations where they run
    (AVX2); --backend onnx, an ONNX-only option, or a recipe that is not a preset: ONNX."""
    from splice.cli import main
    from splice.presets import tvm_int8_runs

    def backend(*flags) -> dict:
        out = tmp_path / f"a{len(list(tmp_path.iterdir()))}"
        assert main(["compile", str(STORIES), *flags, "--out", str(out)]) == 0
        m = json.loads((out / "manifest.json").read_text())
        tvm = m.get("tvm") or {}
        return m["backend"], tvm.get("activations"), (tvm.get("cache") or {}).get("dtype")

    expected = ("tvm", "int8", "float16") if tvm_int8_runs() else ("onnx", None, None)
    assert backend("--recipe", "fastest") == expected
    assert ("backend: tvm, int8 activations, float16 KV cache" in capsys.readouterr().out) == (
        expected[0] == "tvm")
    if expected[0] == "tvm":  # the options reach the TVM artefact (ONNX has none)
        assert backend("--recipe", "fastest", "--activations", "float",
                       "--kv-cache", "float32") == ("tvm", "float", "float32")
    assert backend("--recipe", "fastest", "--backend", "onnx") == ("onnx", None, None)
    assert backend("--recipe", "fastest", "--ops", "standard") == ("onnx", None, None)
    assert backend("--recipe", "w4_rtn") == ("onnx", None, None)


def test_cli_activations_int8_reaches_the_tvm_artefact_and_only_it(tmp_path, capsys):
    from splice.cli import main

    out = tmp_path / "int8"
    assert main(["compile", str(STORIES), "--backend", "tvm", "--recipe", "w4_rtn",
                 "--activations", "int8", "--out", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["tvm"]["activations"] == "int8"
    assert load(out).generate("Once", max_new_tokens=4)
    capsys.readouterr()
    assert main(["compile", str(STORIES), "--recipe", "w4_rtn", "--activations", "int8",
                 "--out", str(tmp_path / "onnx")]) == 2
    assert "the onnx backend has no export option activations" in capsys.readouterr().err
    assert not (tmp_path / "onnx").exists()


def test_cli_aarch64_target_takes_tvm_without_a_backend(tmp_path, capsys):
    """--target aarch64 with no --backend: TVM (the one backend that cross-compiles for it), float
    activations (the int8 products need Armv8.2's sdot: --activations int8, test_tvm.py), a
    float16 cache."""
    import shutil

    from splice.backends.tvm.build import CROSS_CC
    from splice.cli import main

    if shutil.which(CROSS_CC["aarch64"]) is None:
        pytest.skip(f"{CROSS_CC['aarch64']} is not installed (Debian: gcc-aarch64-linux-gnu)")
    out = tmp_path / "arm"
    assert main(["compile", str(STORIES), "--recipe", "fastest", "--target", "aarch64",
                 "--out", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert (m["backend"], m["tvm"]["arch"], m["tvm"]["activations"],
            m["tvm"]["cache"]["dtype"]) == ("tvm", "aarch64", "float", "float16")
    assert "backend: tvm, float activations, float16 KV cache" in capsys.readouterr().out
