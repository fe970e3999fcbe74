"""The runtime's in-place KV cache (contrib artefacts whose attentions are all GroupQueryAttention):
generation through shared max-length buffers gives the logits and tokens of the functional
`logits()` path and of the standard-ops artefact; artefacts that cannot share keep working."""

from __future__ import annotations

import numpy as np
import pytest
from splice.backends.onnx import export
from splice.runtime import load

from tests.tiny import VARIANTS, tiny_module

PROMPT = [5, 6, 7, 8, 9, 10, 11]


@pytest.fixture(scope="module", params=["llama_gqa", "gemma2"])
def pair(request, tmp_path_factory):
    module = tiny_module(seed=3, **VARIANTS[request.param])
    d = tmp_path_factory.mktemp(request.param)
    return load(export(module, d / "contrib")), load(export(module, d / "standard",
                                                           ops="standard"))


def test_manifest_says_which_artefact_shares_its_cache(pair):
    contrib, standard = pair
    assert contrib.manifest["io"]["share_buffer"] is True
    assert contrib.manifest["io"]["attention_mask"] == "attention_mask"
    assert standard.manifest["io"]["share_buffer"] is False
    assert "attention_mask" not in standard.manifest["io"]


def test_in_place_steps_equal_the_functional_cache(pair):
    contrib, _ = pair
    step = contrib._stepper(len(PROMPT) + 6)
    assert step.__self__.__class__.__name__ == "SharedCache"
    logits, cache = contrib.logits(np.asarray([PROMPT]))
    shared, length = step(np.asarray([PROMPT]))
    assert length == len(PROMPT)
    np.testing.assert_allclose(shared, logits, atol=1e-5)
    for tok in (3, 200, 17, 99, 42):
        logits, cache = contrib.logits(np.asarray([[tok]]), cache)
        shared, length = step(np.asarray([[tok]]))
        np.testing.assert_allclose(shared, logits, atol=1e-5)
    assert length == cache.length == len(PROMPT) + 5
    # the shared buffers hold the same cache as the functional one, then zeros past its end
    first = step.__self__.buffers[0].numpy()
    np.testing.assert_allclose(first[:, :, :length], cache["past.0.key"], atol=1e-5)
    assert not first[:, :, length:].any()


def test_generation_matches_the_standard_artefact(pair):
    contrib, standard = pair
    a = contrib.generate_ids(PROMPT, max_new_tokens=24, stop_at_eos=False)
    b = standard.generate_ids(PROMPT, max_new_tokens=24, stop_at_eos=False)
    assert a.ids == b.ids and len(a.ids) == 24 and a.decode_steps == 23


def test_generation_stops_at_the_context_end(pair):
    contrib, _ = pair
    n = contrib.max_position - len(PROMPT)
    g = contrib.generate_ids(PROMPT, max_new_tokens=n + 10, stop_at_eos=False)
    assert g.stop == "context" and len(PROMPT) + len(g.ids) == contrib.max_position + 1


def test_onnxruntime_genai_gives_our_greedy_tokens_on_a_quantized_artefact(tmp_path):
    """MatMulNBits (packed q/k/v and gate/up), GQA with rotary inside and the shared cache, run by
    onnxruntime-genai with past_present_share_buffer on, as genai_config.json says."""
    og = pytest.importorskip("onnxruntime_genai")
    from splice.passes.infra.base import PassContext
    from splice.passes.quantize_weights import QuantizeWeightsPass

    module = QuantizeWeightsPass(method="rtn", bits=4, group_size=16, lm_head="int4")(
        tiny_module(seed=3, tie_embeddings=True), PassContext()).module
    path = export(module, tmp_path / "q")
    ours = load(path).generate_ids(PROMPT, max_new_tokens=20, stop_at_eos=False).ids
    model = og.Model(str(path))
    params = og.GeneratorParams(model)
    n = len(PROMPT) + 20
    params.set_search_options(max_length=n, min_length=n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(PROMPT)
    theirs = []
    while not gen.is_done():
        gen.generate_next_token()
        theirs.append(int(gen.get_next_tokens()[0]))
    assert theirs == ours and len(ours) == 20
