"""fold_norms on the real models, under the numeric check: float32 weights, so exactness is proven
on the float64 copy and the stored result may differ by rounding only."""

from __future__ import annotations

import pytest
import torch

from splice.frontend import load_model
from splice.passes import NumericCheckInstrument, PassManager, TimingInstrument
from splice.passes.fold_norms import FoldNormsPass
from tests.paths import STORIES, needs_smollm2, needs_stories


def fold_checked(module, seq: int):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, module.config.vocab_size, (1, seq), generator=gen)
    passes = [FoldNormsPass(), FoldNormsPass()]
    return PassManager(passes, [TimingInstrument(), NumericCheckInstrument(ids)]).run(module)


def check_report(report, num_layers: int, tied: bool) -> None:
    first, second = report
    num = first["numeric"]
    assert first["modified"] and not second["modified"]
    assert len(first["report"]["folded"]) == 2 * num_layers + 1 and first["report"]["left"] == {}
    assert first["report"]["untied"] == (["lm_head.weight"] if tied else [])
    assert num["float64_max_rel_diff"] <= 1e-9
    assert num["max_rel_diff"] <= 1e-5 and num["top1_agreement"] == 1.0


@pytest.mark.slow
@needs_stories
def test_fold_norms_stories260k():
    module = load_model(str(STORIES))
    tied = module.graph.find(role="lm_head")[0].inputs[1].name == "embed.weight"
    _, report = fold_checked(module, 32)
    check_report(report, module.config.num_layers, tied)


@pytest.mark.slow
@needs_smollm2
def test_fold_norms_smollm2_135m(smollm2):
    module = smollm2.module.clone()  # the session's import (tests/conftest.py); fold changes it
    _, report = fold_checked(module, 8)
    check_report(report, module.config.num_layers, tied=True)
