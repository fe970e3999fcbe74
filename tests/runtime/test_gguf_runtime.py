"""gguf artefacts through llama.cpp (llama-cpp-python; skipped where it is not installed): the file
loads with no warning; stories260K's and a tiny random model's greedy text equals splice's ONNX
artefact's; logits equal the reference interpreter's (float weights: to float32 rounding;
Q4_0/Q8_0 weights: within the bound of llama.cpp's 8-bit activations); the cache continues and is
cut back (prompt lookup) correctly; llama.cpp's own tokenizer encodes as splice's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed "
                                "(`make llama`)")

from splice.backends.gguf import export  # noqa: E402
from splice.backends.onnx import export as export_onnx  # noqa: E402
from splice.ir.interpreter import run_logits  # noqa: E402
from splice.runtime import load as load_any  # noqa: E402
from splice.runtime.gguf_runtime import load  # noqa: E402

from tests.paths import STORIES, needs_stories  # noqa: E402
from tests.tiny import tiny_module  # noqa: E402


def _tiny(seed):
    """A tiny random llama whose context is a whole llama.cpp context (256: llama.cpp rounds a
    context up to a multiple of 256 and warns beyond the trained one) and that names its EOS."""
    return tiny_module(seed=seed, max_position=256, eos_token_ids=(257,))


def _stories():
    from splice.frontend import load_model

    return load_model(STORIES)


def _quantized(module, **settings):
    from splice.passes.infra.base import PassContext
    from splice.passes.quantize_weights import QuantizeWeightsPass

    qw = QuantizeWeightsPass(group_size=32, symmetric=True, scale_dtype="float16", **settings)
    return qw.call(module, PassContext()).module


def _interp(module, ids):
    return run_logits(module, torch.tensor([ids]))["logits"][0].numpy()


@needs_stories
def test_stories260k_greedy_text_equals_onnx(tmp_path):
    module = _stories()
    art = load(export(module, tmp_path / "g"))
    assert art.load_warnings == []
    onnx = load_any(export_onnx(module, tmp_path / "o"))
    ours = art.generate_ids("Once upon a time", max_new_tokens=60, stop_at_eos=False).ids
    theirs = onnx.generate_ids("Once upon a time", max_new_tokens=60, stop_at_eos=False).ids
    assert ours == theirs
    assert art.generate("Once upon a time", max_new_tokens=20).startswith(", there was a little girl named Lily")
    ids = art.prompt_ids("Once upon a time, Lily saw a cat.")
    logits, _ = art.logits(ids)
    np.testing.assert_allclose(logits[0], _interp(module, ids), atol=2e-4, rtol=0)


@needs_stories
def test_llama_cpp_tokenizer_encodes_as_splice(tmp_path):
    art = load(export(_stories(), tmp_path / "g"))
    for text in ("Once upon a time, there was a dog.", "Tom's cat said: \"hi!\" 123",
                 "  two  spaces\nand a line"):
        assert art.llm.tokenize(text.encode(), add_bos=True) == art.tokenizer.encode(text, bos=True)


def test_tiny_model_greedy_and_cache(tmp_path):
    module = _tiny(5)
    art = load(export(module, tmp_path / "g"))
    onnx = load_any(export_onnx(module, tmp_path / "o"))
    prompt = [256, 72, 101, 108, 108, 111]
    assert art.generate_ids(prompt, max_new_tokens=24, stop_at_eos=False).ids == \
        onnx.generate_ids(prompt, max_new_tokens=24, stop_at_eos=False).ids
    full, _ = art.logits(prompt)
    first, cache = art.logits(prompt[:4])
    second, cache2 = art.logits(prompt[4:], cache)
    np.testing.assert_allclose(np.concatenate([first, second], 1), full, atol=1e-5)
    other, _ = art.logits([1, 2, 3])  # the context now holds another sequence
    again, _ = art.logits(prompt[4:], cache)  # the old cache is re-evaluated, not trusted
    np.testing.assert_allclose(again, second, atol=1e-5)
    assert cache2.length == len(prompt)
    plain = art.generate_ids(prompt * 4, max_new_tokens=20, stop_at_eos=False)
    ahead = art.generate_ids(prompt * 4, max_new_tokens=20, stop_at_eos=False, lookahead=4)
    assert ahead.ids == plain.ids


@pytest.mark.parametrize("settings", [{"bits": 4}, {"bits": 8}], ids=["q4_0", "q8_0"])
def test_quantized_logits_within_8bit_activation_bound(tmp_path, settings):
    """llama.cpp multiplies Q4_0 and Q8_0 weights with activations it quantizes to Q8_0 (groups of
    32, a float16 scale = absmax / 127): each product sees the activation rounded by up to half a
    step, about 0.4% of the group's largest value. On this model the logits come within 0.6%
    (Q4_0) and 0.9% (Q8_0) of their range of the interpreter's on the same (dequantized)
    weights; the test allows 2%."""
    module = _quantized(_tiny(6), **settings)
    art = load(export(module, tmp_path / "g"))
    assert art.load_warnings == []
    assert set(art.manifest["gguf"]["types"]) == {"F32", "Q4_0" if settings["bits"] == 4
                                                  else "Q8_0"}
    ids = [256, 10, 20, 30, 40, 50, 60, 70, 80, 90]
    ours, _ = art.logits(ids)
    ref = _interp(module, ids)
    err = np.abs(ours[0] - ref).max() / (ref.max() - ref.min())
    assert err < 0.02
    exact = _interp(_tiny(6), ids)
    assert np.abs(ours[0] - exact).max() > 0  # the weights really are quantized


@pytest.mark.parametrize("settings", [{"bits": 4}, {"bits": 8}], ids=["q4_0", "q8_0"])
def test_quantized_logits_equal_the_interpreter_with_llama_cpp_rounding(tmp_path, settings):
    """With llama.cpp's Q8_0 rounding of the activations at each quantized linear simulated in
    the interpreter (backends/gguf/reference.py), what is left is float32 accumulation order:
    measured 1.7e-7 (Q4_0) and 2.0e-7 (Q8_0) of the logits' range, against 0.6% and 0.9% with
    float activations; the test allows 1e-5."""
    from splice.backends.gguf.reference import file_types, llama_logits

    module = _quantized(_tiny(6), **settings)
    path = export(module, tmp_path / "g")
    art = load(path)
    types = file_types(path / art.manifest["gguf"]["file"])
    assert types == art.manifest["gguf"]["tensors"]
    ids = [256, 10, 20, 30, 40, 50, 60, 70, 80, 90]
    ours = art.logits(ids)[0][0]
    sim = llama_logits(module, ids, types).numpy()
    plain = _interp(module, ids)
    span = plain.max() - plain.min()
    err, err_plain = np.abs(ours - sim).max() / span, np.abs(ours - plain).max() / span
    assert err < 1e-5 and err < err_plain / 100, (err, err_plain)


def test_missing_file_and_wrong_backend_are_refused(tmp_path):
    from splice.errors import ArtefactError

    path = export(_tiny(5), tmp_path / "g")
    (path / "model.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ArtefactError, match="sha256|hash"):
        load(path)
    onnx = export_onnx(_tiny(5), tmp_path / "o")
    with pytest.raises(ArtefactError, match="runs 'gguf' artefacts"):
        load(onnx)
