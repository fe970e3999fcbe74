"""The pruning benchmark runs (quick mode, stories260K): every column and deployed form gets its
figures. A benchmark is not a test: nothing here looks at speed."""

from __future__ import annotations

from benchmarks.prune_patch import run

from tests.paths import needs_stories


@needs_stories
def test_prune_patch_quick_runs():
    text, figures = run(quick=True)
    (section,) = figures["sections"]
    (row,) = section["rows"]
    assert row["n"] == 1 and row["chosen_kind"] in ("linearpatch", "lstsq")
    # a patch fitted to the cut does better than no patch on held-out text
    assert min(row["linearpatch"], row["lstsq"]) < row["pruned"]
    forms = {r["form"]: r for r in section["fusion"]["rows"]}
    d = 64  # stories260K's hidden size
    assert forms["LinearPatch, dense matmul"]["patch_params"] == d * d
    assert forms["LinearPatch, FWHT + scale + FWHT"]["patch_params"] == d
    assert forms["least squares, folded into down_proj"]["patch_params"] == 0
    # the exact forms of one patch are the same function
    assert abs(forms["LinearPatch, dense matmul"]["ppl"]
               - forms["LinearPatch, FWHT + scale + FWHT"]["ppl"]) < 1e-3
    rotated = forms["LinearPatch in R1's basis, rotated: channel scale"]
    assert rotated["patch_params"] == d
    assert all(r["decode_tok_s"] > 0 for r in forms.values())
    assert "deployed forms of the patch" in text
    # the trade-off table: least squares on twice the calibration, then a short distillation
    more, distilled = section["distill_tradeoff"]
    assert more["calib_rows"] == 8 and "steps" not in more and more["ppl"] > 0
    assert distilled["steps"] == 5 and distilled["ppl"] > 0
    assert "| 8 x 256 | - |" in text
    # the MLP patch: least squares and a gated MLP block of rank 32, on twice the calibration
    (mlp,) = section["mlp_patch"]
    assert mlp["calib_rows"] == 8 and mlp["rank"] == 32 and mlp["ppl"] > 0
    assert mlp["parameters"] == d * d + 3 * 32 * d
    assert set(mlp["holdout_token_rel"]) == {"none", "lstsq", "mlp"}
    assert forms["least squares + MLP block (estimate_patch kind mlp), as it is"][
        "patch_params"] == d * d + 3 * 32 * d
    assert "The MLP patch of that block" in text
