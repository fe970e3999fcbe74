"""The quantization benchmark runs (quick mode, stories260K): every variant produces its row and
the figures are sane. A benchmark is not a test: nothing here looks at speed."""

from __future__ import annotations

from benchmarks.quantization import run

from tests.paths import needs_stories


@needs_stories
def test_quantization_quick_runs():
    text, figures = run(quick=True)
    rows = figures["rows"]
    assert list(rows) == [
        "float32", "W8 per-channel RTN", "W8 per-channel RTN + rotate", "W4 g32 RTN",
        "W4 g32 RTN after fold_norms", "W4 g32 RTN + rotate", "W4 g32 GPTQ",
        "W4 g32 GPTQ + rotate", "W4A8 (g32 GPTQ + rotate, int8 per-token activations)",
        "W4A8KV8 (same + int8 KV cache per head)",
        "W4 g32 GPTQ + rotate + scale tuning (recipe `w4_gptq_rotate_tuned`)",
        "full pipeline: prune 1 + MLP patch + rotate + GPTQ W4 g32 + scale tuning + A8 "
        "(recipe `prune4_mlp_patch_w4a8`)",
        "W4 per-channel RTN",
        "W4 g32 RTN float-zero", "W4 g32 float-zero + int8 tied table"]
    assert "Weight quantization: stories260K" in text and "accuracy_level" in text
    base = rows["float32"]["ppl"]
    assert abs(rows["W8 per-channel RTN"]["ppl"] / base - 1) < 0.02
    assert rows["W4 g32 RTN"]["size_mb"] < rows["float32"]["size_mb"]
    assert rows["W4 g32 float-zero + int8 tied table"]["size_mb"] < \
        rows["W4 g32 RTN float-zero"]["size_mb"]
    gptq = rows["W4 g32 GPTQ"]
    assert gptq["mean_rel_error"] < gptq["mean_rtn_rel_error"]
    tuned = rows["W4 g32 GPTQ + rotate + scale tuning (recipe `w4_gptq_rotate_tuned`)"]
    assert tuned["tune"]["steps"] == 4 and tuned["tune"]["heldout_kl_before"] > 0
    assert 0 < figures["accuracy_level"]["top1_agreement"] <= 1
    # the rotation flattens the down_proj inputs' outliers (kurtosis ~40 -> ~4 on stories260K)
    act = figures["activations"]
    assert act["fold_norms + rotate"]["down_proj input"]["kurtosis_mean"] < \
        act["fold_norms"]["down_proj input"]["kurtosis_mean"]
    assert "Goal: W4 g32 GPTQ + rotate within 5%" in text
