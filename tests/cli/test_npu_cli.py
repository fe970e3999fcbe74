"""`splice run` and `splice inspect` on a tiny NPU artefact, through the CLI (issue 26: `run` handed
every NPU artefact a `threads` option nobody gave, and the NPU runtime refused it).

The HTP is the simulator the onnxruntime-qnn wheel ships for x86-64; the tests skip with the
plugin's reason where it cannot load."""

from __future__ import annotations

import numpy as np
import pytest

from splice.cli import main
from splice.runtime.npu_runtime import NpuUnavailable, qnn_devices
from tests.tiny import tiny_module


def _plugin() -> str | None:
    try:
        qnn_devices()
    except NpuUnavailable as e:
        return str(e)
    return None


@pytest.fixture(scope="module")
def npu_art(tmp_path_factory):
    if _plugin() is not None:
        pytest.skip(f"the QNN plugin cannot load: {_plugin()}")
    from splice.backends.npu import export
    from splice.passes.infra.base import PassContext
    from splice.passes.quantize_weights import QuantizeWeightsPass

    module = QuantizeWeightsPass(method="rtn", bits=8, group_size=0, symmetric=True).call(
        tiny_module(seed=5), PassContext()).module
    calib = np.random.default_rng(0).integers(0, 256, (4, 48))
    return export(module, tmp_path_factory.mktemp("npu") / "art", calibration=calib, chunk=8,
                  context=48)


def test_run_without_threads_generates(npu_art, capsys):
    assert main(["run", str(npu_art), "Once", "--max-new-tokens", "4", "--no-stream"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["run", str(npu_art), "Once", "--max-new-tokens", "4"]) == 0   # streamed
    assert capsys.readouterr().out.startswith("Once")


def test_run_with_threads_is_refused_by_name(npu_art, capsys):
    assert main(["run", str(npu_art), "Once", "--threads", "2"]) == 2
    captured = capsys.readouterr()
    assert "threads" in captured.err and "NPU" in captured.err
    assert captured.out == ""          # nothing printed before the refusal, not even the prompt


def test_inspect_and_run_agree(npu_art, capsys):
    assert main(["inspect", str(npu_art)]) == 0
    assert "backend npu" in capsys.readouterr().out
