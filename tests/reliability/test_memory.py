"""A compile that would not fit in memory is refused before anything heavy is loaded, with the
estimate, what it is made of, and what to change (frontend/memory.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import splice
from splice.errors import InputError
from splice.frontend.memory import (BASE_BYTES, BYTES_PER_PARAM, COPIES, available_memory, check_memory,
                           parameter_count)
from splice.recipe import Recipe
from tests.reliability.conftest import TRIED
from tests.reliability.inputs import _llama70b_config, tiny_hf_model

LLAMA2_70B_PARAMS = 68_976_648_192     # the published count of Llama-2-70B


@pytest.fixture(scope="module")
def llama70b(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mem") / "llama70b"
    _llama70b_config(path)
    return path


def test_parameter_counts_without_loading(bases, llama70b):
    n, how = parameter_count(llama70b)
    assert how == "config.json sizes" and n == LLAMA2_70B_PARAMS
    n, how = parameter_count(bases["hf"])
    assert how == "safetensors headers"
    assert n == sum(p.numel() for p in tiny_hf_model().parameters())
    n, _ = parameter_count(bases["stories"])
    assert n == bases["stories"].stat().st_size // 4
    n, _ = parameter_count(bases["gguf"])
    assert n == 2 * bases["gguf"].stat().st_size
    assert parameter_count(bases["hf"] / "nope") is None


def test_a_70b_model_is_refused_before_loading(llama70b, tmp_path):
    out = tmp_path / "out"
    t0 = time.perf_counter()
    with pytest.raises(InputError) as err:
        splice.compile(llama70b, "fold_norms", "cpu", out, memory_limit=64e9)
    assert time.perf_counter() - t0 < 5     # nothing was loaded
    text = str(err.value)
    need = LLAMA2_70B_PARAMS * BYTES_PER_PARAM * COPIES / 1e9
    assert f"{need:.1f} GB" in text and "68.98B parameters" in text
    assert "only 64.0 GB is the given memory_limit" in text and "calibration" in text
    assert not out.exists()
    TRIED["memory"]["refused (70B config)"] += 1


def test_the_limit_decides(bases, tmp_path):
    with pytest.raises(InputError, match="needs about 0.3 GB.*only 0.0 GB"):
        splice.compile(bases["stories"], "fold_norms", "cpu", tmp_path / "a", memory_limit=1e6,
                       load=False)
    assert not (tmp_path / "a").exists()
    assert splice.compile(bases["stories"], "fold_norms", "cpu", tmp_path / "b",
                          memory_limit=2e9, load=False).is_dir()
    TRIED["memory"]["limit checks"] += 2


def test_calibration_activations_count(bases):
    recipe = Recipe("calibrated", calibration_samples=64, calibration_seq_len=512)
    cfg = json.loads((bases["hf"] / "config.json").read_text())
    per_token = (cfg["hidden_size"] * (cfg["num_hidden_layers"] + 1) + cfg["vocab_size"]) * 8
    calib = 64 * 512 * per_token
    weights = parameter_count(bases["hf"])[0] * BYTES_PER_PARAM * COPIES
    limit = BASE_BYTES + weights + calib / 2
    with pytest.raises(InputError, match=f"{calib / 1e9:.1f} GB of float64 calibration "
                                         f"activations for {64 * 512} tokens"):
        check_memory(bases["hf"], recipe, memory_limit=limit)
    check_memory(bases["hf"], Recipe("plain"), memory_limit=limit)


def test_available_memory_is_plausible():
    avail = available_memory()
    total = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text()
                 .splitlines() if line.startswith("MemTotal:"))
    assert avail is not None and 0 < avail <= total
