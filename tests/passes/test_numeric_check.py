"""The numeric-check instrument: exact passes proven in float64, lossy passes measured."""

from __future__ import annotations

import math

import pytest
import torch

from splice.passes import (NumericCheckError, NumericCheckInstrument, PassError, PassFailure,
                           PassManager)
from splice.passes.fold_norms import FoldNormsPass
from splice.passes.infra.instruments import compare_logits
from tests.passes.models import hand_built, tiny_model, token_batch, with_settings
from tests.passes.toys import CountdownPass, LogPass, ScaleWeightPass


def run_checked(module, passes, **kwargs):
    check = NumericCheckInstrument(token_batch(), **kwargs)
    return PassManager(passes, [check]).run(module)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_exact_pass_that_is_secretly_lossy_is_caught(dtype):
    liar = ScaleWeightPass(weight="lm_head.weight", eps=1e-7, claim_exact=True)
    with pytest.raises(PassFailure, match=r"pass 'scale_weight' claims to be exact") as info:
        run_checked(tiny_model("llama", dtype=dtype), [FoldNormsPass(), liar])
    assert isinstance(info.value.__cause__, NumericCheckError)
    assert "ran before it: fold_norms" in str(info.value)


def test_exact_pass_passes_in_float64_and_records_its_error():
    _, report = run_checked(tiny_model("gqa"), [FoldNormsPass()])
    num = report[0]["numeric"]
    assert num["exact"] is True and num["max_rel_diff"] <= 1e-9 and num["rtol"] == 1e-9
    assert num["top1_agreement"] == 1.0 and num["kl"] < 1e-12
    assert "float64_max_rel_diff" not in num  # float64 module: no shadow run needed


def test_exact_pass_on_float32_weights_is_proven_on_a_float64_copy():
    module = tiny_model("tied", dtype=torch.float32)
    out, report = run_checked(module, [FoldNormsPass()])
    num = report[0]["numeric"]
    assert num["float64_max_rel_diff"] <= 1e-9
    # the stored float32 result differs by rounding only, and it is still float32
    assert 0 < num["max_rel_diff"] <= 1e-5
    assert all(t.dtype == torch.float32 for t in out.weights.values() if t.is_floating_point())


def test_lossy_pass_gets_kl_top1_and_perplexity_recorded():
    lossy = ScaleWeightPass(weight="lm_head.weight", eps=0.5)
    _, report = run_checked(tiny_model("llama"), [lossy])
    num = report[0]["numeric"]
    assert num["exact"] is False
    assert num["kl"] > 1e-4 and num["max_rel_diff"] > 0.1
    assert 0.0 <= num["top1_agreement"] <= 1.0
    assert num["ppl_before"] > 1 and num["ppl_after"] > 1
    assert num["ppl_ratio"] == pytest.approx(num["ppl_after"] / num["ppl_before"])
    assert num["ppl_ratio"] != pytest.approx(1.0)
    assert num["tokens"] == token_batch().numel()


def test_one_interpreter_run_per_modifying_pass(monkeypatch):
    calls = []
    original = NumericCheckInstrument.logits

    def counting(self, module):
        calls.append(1)
        return original(self, module)

    monkeypatch.setattr(NumericCheckInstrument, "logits", counting)
    module = with_settings(hand_built(), countdown=2)
    passes = [CountdownPass(), LogPass(), ScaleWeightPass(eps=0.1), CountdownPass(), LogPass()]
    _, report = run_checked(module, passes)
    # one run for the input, one after each of the three passes that modified the module
    assert len(calls) == 4
    assert report[1]["numeric"]["skipped"] and report[4]["numeric"]["skipped"]
    # scaling the only head weight uniformly by 1.1 cannot change the top-1 token
    assert report[2]["numeric"]["top1_agreement"] == 1.0 and report[2]["numeric"]["kl"] > 0


def test_compare_logits_of_identical_logits():
    logits = torch.randn(2, 5, 11, dtype=torch.float64)
    ids = torch.randint(0, 11, (2, 5))
    stats = compare_logits(logits, logits.clone(), ids)
    assert stats["max_rel_diff"] == 0 and stats["kl"] == 0 and stats["top1_agreement"] == 1
    assert stats["ppl_ratio"] == 1.0
    assert "ppl_ratio" not in compare_logits(logits[:, :1], logits[:, :1], ids[:, :1])



def test_compare_logits_in_slices_equals_the_whole_batch_formula(monkeypatch):
    """The sliced computation (bounded memory) gives the textbook figures of the whole batch."""
    import splice.passes.infra.instruments as mod

    gen = torch.Generator().manual_seed(3)
    b = torch.randn(3, 7, 13, generator=gen, dtype=torch.float64) * 3
    a = b + 0.3 * torch.randn(3, 7, 13, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, 13, (3, 7), generator=gen)
    lb, la = torch.log_softmax(b, -1), torch.log_softmax(a, -1)
    nb = -lb[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    na = -la[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    expected = {"max_rel_diff": ((a - b).abs().max() / b.abs().max()).item(),
                "kl": (lb.exp() * (lb - la)).sum(-1).mean().item(),
                "top1_agreement": (b.argmax(-1) == a.argmax(-1)).double().mean().item(),
                "ppl_before": math.exp(nb.item()), "ppl_after": math.exp(na.item())}
    for elements in (1 << 24, 13 * 5, 1):  # one slice; 5 tokens (across rows); 1 token
        monkeypatch.setattr(mod, "COMPARE_ELEMENTS", elements)
        stats = compare_logits(b, a, ids)
        for k, v in expected.items():
            assert stats[k] == pytest.approx(v, rel=1e-12), (elements, k)

@pytest.mark.parametrize("batch, message", [
    (torch.rand(2, 4), "integer token ids"),
    (torch.zeros(2, 3, 4, dtype=torch.int64), r"\[batch, seq\], got shape \[2, 3, 4\]"),
    ([[1, -2]], "negative token id"),
    ([["a"]], "token ids"),
])
def test_bad_batch_is_rejected(batch, message):
    with pytest.raises(PassError, match=message):
        NumericCheckInstrument(batch)


def test_token_id_outside_the_vocabulary_is_rejected():
    with pytest.raises(PassFailure, match=r"token id 999.*64 tokens") as info:
        PassManager([FoldNormsPass()], [NumericCheckInstrument([[1, 999]])]).run(hand_built())
    assert isinstance(info.value.__cause__, PassError)


def test_tolerances_must_be_numbers():
    with pytest.raises(PassError, match="rtol must be a number"):
        NumericCheckInstrument([[1, 2]], rtol=-1)
