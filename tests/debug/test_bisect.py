"""Bisection: a deliberately broken pass in a recipe is named, with the layer it broke; a clean
recipe is reported clean; per-layer hybrids of a structural pass are valid modules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from splice.passes.infra.bisect import LayerSpliceError, bisect, splice_layers
from splice.errors import InputError
from splice.ir.interpreter import run_logits
from splice.passes.infra.registry import make_pass
from splice.recipe import Recipe

from tests.debug.helpers import CorruptLayerPass, five_layer_model, registered
from tests.passes.models import token_batch

BATCH = token_batch(seq=16)


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_bisect_names_the_corrupting_pass_and_layer(tmp_path: Path, cache: str):
    module = five_layer_model()
    with registered(CorruptLayerPass):
        # fold_norms twice: the second run is a no-op after the first
        recipe = Recipe("broken", ("fold_norms", "test_corrupt_layer", "fold_norms"))
        result = bisect(module, recipe, metric="kl", tolerance=1e-3, batch=BATCH,
                        cache_dir=tmp_path / "cache" if cache == "disk" else None)
    assert result.found
    assert (result.culprit_step, result.culprit_name, result.layer) == (1, "test_corrupt_layer", 3)
    assert [s["name"] for s in result.steps] == ["fold_norms", "test_corrupt_layer"]
    assert result.steps[0]["value"] < 1e-9 < 1e-3 < result.steps[1]["value"]
    kept = {p["layers_kept"]: p["crosses"] for p in result.layer_probes}
    assert kept[2] is False and kept[3] is True
    assert result.summary.startswith("first bad pass: test_corrupt_layer (step 1), first bad "
                                     "layer: 3; metric kl")
    if cache == "disk":
        assert (tmp_path / "cache" / "001" / "graph.txt").is_file()
    # the caller's module is left as it was
    assert "layers.0.attn_norm.weight" in module.weights


def test_bisect_by_perplexity_finds_layer_0():
    module = five_layer_model()
    with registered(CorruptLayerPass):
        recipe = Recipe("broken", (("test_corrupt_layer", {"layer": 0, "factor": 80.0}),))
        result = bisect(module, recipe, metric="ppl", tolerance=0.01, batch=BATCH)
    assert (result.culprit_name, result.layer) == ("test_corrupt_layer", 0)


def test_a_clean_recipe_crosses_nothing():
    result = bisect(five_layer_model(), Recipe.named("fold_norms"), metric="kl",
                    tolerance=1e-6, batch=BATCH)
    assert not result.found and result.culprit_step is None
    assert result.summary.startswith("no pass crosses the tolerance kl > 1e-06")


def test_structural_hybrids_keep_the_pass_for_low_layers_only():
    pre = five_layer_model(dtype=torch.float64)
    post = make_pass("fold_norms")(pre.clone()).module
    ref = run_logits(pre, BATCH, torch.float64)["logits"]
    for keep in (-1, 2, 4):
        hybrid = splice_layers(pre, post, keep)
        for n in hybrid.graph.find(op="rms_norm"):
            folded = len(n.inputs) == 1
            assert folded == (n.layer is None or n.layer <= keep), (keep, n)
        # fold_norms is exact, so every hybrid computes the same function
        out = run_logits(hybrid, BATCH, torch.float64)["logits"]
        assert torch.allclose(out, ref, rtol=0, atol=1e-10)


def test_a_pass_that_changes_the_layers_cannot_be_split():
    pre = five_layer_model()
    post = pre.clone()
    g = post.graph
    for n in g.nodes:
        if n.layer == 4:
            n.layer = 5
    with pytest.raises(LayerSpliceError, match="set of layers"):
        splice_layers(pre, post, 2)


def test_bad_arguments_are_input_errors():
    with pytest.raises(InputError, match="accepted: kl, ppl"):
        bisect(five_layer_model(), Recipe.named("fold_norms"), metric="mse", tolerance=1.0,
               batch=BATCH)
    with pytest.raises(InputError, match="tolerance"):
        bisect(five_layer_model(), Recipe.named("fold_norms"), metric="kl", tolerance=-1.0,
               batch=BATCH)
