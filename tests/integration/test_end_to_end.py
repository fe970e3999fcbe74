"""The whole line on real models: stories260K's known greedy text through the ONNX artefact, and
SmolLM2-135M's logits through ONNX equal the reference interpreter's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import splice
from splice.frontend import load_model
from splice.ir import past_from_present, run_logits
from tests.paths import STORIES, needs_smollm2, needs_stories

KNOWN = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


@needs_stories
def test_stories260k_greedy_text_through_onnx(tmp_path):
    art = splice.compile(str(STORIES), "fold_norms", "cpu", tmp_path / "a")
    text = art.generate("", max_new_tokens=60)
    assert text.strip().startswith(KNOWN), text


@needs_stories
def test_stories260k_onnx_matches_interpreter_prefill_and_32_decode_steps(tmp_path):
    module = load_model(str(STORIES))
    art = splice.compile(module.clone(), "none", "cpu", tmp_path / "b")
    ids = torch.tensor([[1, 403, 407, 261, 378, 350, 269, 264, 411, 330]])
    ref = run_logits(module, ids)
    got, present = art.logits(ids.numpy())
    assert np.abs(got - ref["logits"].numpy()).max() <= 1e-4
    tok = ids[:, -1:]
    for _ in range(32):
        tok = ref["logits"][:, -1:].argmax(-1)
        ref = run_logits(module, tok, past=past_from_present(ref))
        got, present = art.logits(tok.numpy(), past=present)
        assert np.abs(got - ref["logits"].numpy()).max() <= 1e-4


@pytest.mark.slow
@needs_smollm2
def test_smollm2_logits_through_onnx_equal_interpreter(tmp_path, smollm2):
    module = smollm2.module  # the session's import (tests/conftest.py), not changed here
    art = splice.compile(module.clone(), "fold_norms", "cpu", tmp_path / "s")
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345, 28, 260, 2573, 30]])
    ref = run_logits(module, ids)["logits"].numpy()
    got, present = art.logits(ids.numpy())
    assert np.abs(got - ref).max() <= 1e-3 * max(1.0, np.abs(ref).max()) / 10
    assert (got.argmax(-1) == ref.argmax(-1)).all()
