"""calibration_batches: token tensors, id lists, text and text files all give [n, seq] batches."""

from __future__ import annotations

import pytest
import torch

from splice.api import calibration_batches
from splice.errors import InputError
from tests.tiny import tiny_module


def test_long_text_is_text_not_a_path(tmp_path):
    module = tiny_module()
    text = "word " * 5000  # longer than any file name the OS accepts
    batches = calibration_batches(module, text, seq_len=16, max_batches=4)
    assert batches.shape == (4, 16)
    path = tmp_path / "calib.txt"
    path.write_text(text)
    assert torch.equal(calibration_batches(module, str(path), seq_len=16, max_batches=4), batches)
    assert torch.equal(calibration_batches(module, path, seq_len=16, max_batches=4), batches)


def test_too_little_calibration_is_named():
    with pytest.raises(InputError, match="fewer than one window"):
        calibration_batches(tiny_module(), [1, 2, 3], seq_len=16)
