"""Prompt lookup decoding (runtime/lookahead.py): the drafter's choices, and generation with
drafts giving greedy decoding's tokens with fewer steps on a float32 artefact (where a position's
logits do not depend on the step's other rows beyond rounding); what it refuses."""

from __future__ import annotations

import numpy as np
import pytest
from splice.backends.onnx import export
from splice.errors import InputError
from splice.runtime import load
from splice.runtime.generation import Generation
from splice.runtime.lookahead import PromptLookup
from splice.runtime.sampling import Sampling

from tests.tiny import VARIANTS, tiny_module


def test_drafts_follow_the_latest_longest_match():
    d = PromptLookup(3, max_ngram=3, min_ngram=1, start=3)
    d.extend([1, 2, 3, 4, 9, 2, 3, 5, 6, 7, 2, 3])
    # "2 3" last occurred followed by 5 6 7 (the earlier "2 3 4" is older); the trigram
    # "7 2 3" never occurred before
    assert d.draft(10) == [5, 6, 7]
    assert d.draft(2) == [5, 6]
    assert d.draft(0) == []
    d.extend([5, 6, 7, 2])
    # "7 2" -> what followed it last time: 3 5 6
    assert d.draft(3) == [3, 5, 6]
    d.extend([42])
    assert d.draft(3) == []  # 42 never occurred before


def test_min_ngram_ignores_single_token_matches():
    d = PromptLookup(2, max_ngram=3, min_ngram=2, start=2)
    d.extend([1, 2, 3, 8, 3])
    assert d.draft(2) == []  # only the unigram 3 repeats
    d.extend([8])
    assert d.draft(2) == [3, 8]  # "3 8" was followed by "3 8"


def test_the_draft_length_grows_when_kept_and_shrinks_when_rejected():
    d = PromptLookup(8)
    d.extend(list(range(20)) * 2 + [0, 1])  # "0 1" was followed by 2 3 4 ...
    assert d.n == 4 and d.draft(100) == [2, 3, 4, 5]  # half of the most to start
    d.update(4, 4)
    assert d.draft(100) == [2, 3, 4, 5, 6, 7]  # all kept: two more
    d.update(6, 6)
    d.update(8, 8)
    assert d.n == 8 and len(d.draft(100)) == 8  # never past the most
    assert d.draft(3) == [2, 3, 4]  # nor past the caller's limit
    d.update(8, 5)
    assert d.n == 7  # one rejected: one fewer
    for _ in range(10):
        d.update(3, 0)
    assert d.n == 1  # never below one
    d.update(0, 0)
    assert d.n == 1  # a step with nothing drafted changes nothing
    assert PromptLookup(1).n == 1 and PromptLookup(5).n == 2


@pytest.mark.parametrize("bad", [{"k": 0}, {"k": 2, "max_ngram": 0},
                                 {"k": 2, "max_ngram": 2, "min_ngram": 3}, {"k": True},
                                 {"k": 2, "start": 3}, {"k": 2, "start": 0}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(InputError):
        PromptLookup(**bad)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    module = tiny_module(seed=3, **VARIANTS["llama_gqa"])
    d = tmp_path_factory.mktemp("lookahead")
    return load(export(module, d / "contrib")), load(export(module, d / "standard",
                                                           ops="standard"))


# a prompt that repeats itself, so that the drafter has something to propose
PROMPT = [5, 6, 7, 8, 9, 10, 11, 5, 6, 7, 8, 9, 10, 11, 5, 6, 7]


@pytest.mark.parametrize("k", [1, 3, 6])
def test_lookahead_gives_the_greedy_tokens_in_fewer_steps(pair, k):
    contrib, _ = pair
    plain = contrib.generate_ids(PROMPT, max_new_tokens=40, stop_at_eos=False)
    ahead = contrib.generate_ids(PROMPT, max_new_tokens=40, stop_at_eos=False, lookahead=k)
    assert ahead.ids == plain.ids and len(ahead.ids) == 40
    assert plain.decode_steps == plain.decode_tokens == 39 and plain.drafted == 0
    assert ahead.accepted > 0 and ahead.decode_steps < 39
    assert ahead.decode_tokens == ahead.decode_steps + ahead.accepted == 39
    assert ahead.drafted <= k * ahead.decode_steps
    assert contrib.last_stats["accepted"] == ahead.accepted


def test_generation_adapts_the_draft_length_to_each_step(pair, monkeypatch):
    contrib, _ = pair
    seen = []
    update = PromptLookup.update

    def spy(self, drafted, kept):
        seen.append((self.n, drafted, kept))
        update(self, drafted, kept)
    monkeypatch.setattr(PromptLookup, "update", spy)
    ahead = contrib.generate_ids(PROMPT, max_new_tokens=40, stop_at_eos=False, lookahead=6)
    assert seen and sum(d for _, d, _ in seen) == ahead.drafted
    assert sum(k for _, _, k in seen) == ahead.accepted
    # each step drafted at most the length the previous steps left it
    assert all(d <= n for n, d, _ in seen)


def test_lookahead_stops_where_plain_decoding_stops(pair):
    contrib, _ = pair
    plain = contrib.generate_ids(PROMPT, max_new_tokens=30, stop_at_eos=False)
    # an EOS id inside an accepted draft ends generation there, not included
    eos = plain.ids[20]
    contrib.config["eos_token_ids"] = [eos]
    try:
        a = contrib.generate_ids(PROMPT, max_new_tokens=30, lookahead=4)
        b = contrib.generate_ids(PROMPT, max_new_tokens=30)
    finally:
        contrib.config["eos_token_ids"] = None
    assert a.ids == b.ids == plain.ids[:plain.ids.index(eos)] and a.stop == b.stop == "eos"
    # the context's end: drafts never run the cache past it
    n = contrib.max_position - len(PROMPT)
    a = contrib.generate_ids(PROMPT, max_new_tokens=n + 10, stop_at_eos=False, lookahead=5)
    b = contrib.generate_ids(PROMPT, max_new_tokens=n + 10, stop_at_eos=False)
    assert a.ids == b.ids and a.stop == b.stop == "context"


def test_tokens_come_one_at_a_time_with_lookahead(pair):
    """What stream() consumes: every kept token is yielded on its own, in order."""
    contrib, _ = pair
    plain = contrib.generate_ids(PROMPT, max_new_tokens=25, stop_at_eos=False)
    result = Generation(list(PROMPT), [], "length", 0.0, 0.0, 0)
    seen = list(contrib._tokens(PROMPT, 25, Sampling(), False, result, 4))
    assert seen == result.ids == plain.ids and result.accepted > 0


def test_cut_back_cache_equals_the_straight_one(pair):
    contrib, _ = pair
    from splice.runtime.shared_cache import SharedCache

    a, b = SharedCache(contrib, 32), SharedCache(contrib, 32)
    a.step(np.asarray([PROMPT[:8]]))
    b.step(np.asarray([PROMPT[:8]]))
    a.step(np.asarray([[3, 4, 99, 98]]))
    a.truncate(10)  # keep 3 and 4, forget 99 and 98
    b.step(np.asarray([[3, 4]]))
    la, n = a.step(np.asarray([[17]]))
    lb, m = b.step(np.asarray([[17]]))
    assert n == m == 11
    np.testing.assert_allclose(la, lb, atol=1e-5)
    with pytest.raises(InputError, match="cannot cut"):
        a.truncate(12)


def test_standard_ops_artefact_cuts_its_functional_cache(pair):
    _, standard = pair
    plain = standard.generate_ids(PROMPT, max_new_tokens=30, stop_at_eos=False)
    ahead = standard.generate_ids(PROMPT, max_new_tokens=30, stop_at_eos=False, lookahead=3)
    assert ahead.ids == plain.ids and ahead.accepted > 0


def test_lookahead_refuses_sampling_and_caches_it_cannot_cut(pair, monkeypatch):
    contrib, _ = pair
    with pytest.raises(InputError, match="greedy"):
        contrib.generate_ids(PROMPT, max_new_tokens=4, greedy=False, lookahead=2)
    with pytest.raises(InputError, match="lookahead=-1"):
        contrib.generate_ids(PROMPT, max_new_tokens=4, lookahead=-1)
    monkeypatch.setattr(contrib, "cuts_cache", False)  # as the NPU runtime says
    with pytest.raises(InputError, match="cannot cut its cache back"):
        contrib.generate_ids(PROMPT, max_new_tokens=4, lookahead=2)
