"""The NPU benchmark runs (quick mode, stories260K, a short evaluation): every figure is produced
and sane. A benchmark is not a test: nothing here looks at speed or simulation time."""

from __future__ import annotations

import pytest

from tests.paths import needs_stories


def _plugin_error() -> str | None:
    from splice.runtime.npu_runtime import NpuUnavailable, qnn_devices

    try:
        qnn_devices()
    except NpuUnavailable as e:
        return str(e)
    return None


@needs_stories
def test_npu_quick_runs():
    if _plugin_error() is not None:
        pytest.skip(f"the QNN plugin cannot load: {_plugin_error()}")
    from benchmarks.npu import run

    text, res = run(quick=True, eval_tokens=512)
    assert "NPU (Qualcomm HTP via QNN" in text and "HTP partitions" in text
    assert all(g["partitions"] == 1 for g in res["graphs"].values())
    assert set(res["graphs"]) == {"prefill64", "decode"}
    ppl = res["ppl"]
    # W8A16 stays within a few percent of float on 512 tokens (either side: rounding noise can
    # lower a small model's perplexity); a broken lowering or calibration lands far outside
    ref = ppl["reference float32"]
    assert 1 < ref and 0.97 * ref < ppl["HTP (W8A16 QDQ)"] < 1.5 * ref
    assert res["logits"]["htp_vs_cpu_qdq"]["argmax_agree"] > 0.8
    assert res["session_s"]["EPContext"] > 0
