"""The ONNX backend's cuda target, checked without a GPU: the float16 graph (backends/onnx/
cuda.py) passes onnx.checker, has the contrib ops and dtypes the CUDA kernels take, runs on the
CPU provider (which has float16 kernels for every op in it) and matches the float32 reference
interpreter to float16 rounding; the cache works step by step and in place; genai_config.json
names the CUDA provider.

The bound: every activation and weight is rounded to float16 (unit roundoff u = 2^-11), and
the norms and attention softmax accumulate in float32. On these models the logits' largest
error relative to the largest logit is measured at ~1.3e-3 (stories260K, 5 layers); the test
allows F16_BOUND = 5e-3, about 10 u, and asks the top-1 token to agree everywhere. MatMulNBits
runs at accuracy level 0 here: the CPU kernel's level 4 quantizes activations to int8, an error
the CUDA kernels (which ignore the level) do not make."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from splice.backends.onnx import export
from splice.errors import InputError
from splice.ir.interpreter import Interpreter, default_feeds
from splice.passes.infra.base import PassContext
from splice.passes.quantize_weights import QuantizeWeightsPass
from splice.runtime import load
from tests.paths import STORIES
from tests.tiny import tiny_module

F16_BOUND = 5e-3
CPU = ["CPUExecutionProvider"]


def _reference(module, ids: np.ndarray) -> np.ndarray:
    x = torch.as_tensor(ids, dtype=torch.int64)
    return Interpreter(module, torch.float32).run(
        default_feeds(module, x, None, torch.float32), outputs=["logits"])["logits"].numpy()


def _int4(module):
    return QuantizeWeightsPass(bits=4, group_size=32, symmetric=True).call(
        module, PassContext()).module


def _gqa_module():
    """A tiny model whose attention GroupQueryAttention takes (head_dim a multiple of 16)."""
    return tiny_module(num_layers=2, head_dim=16)


@pytest.fixture(scope="module")
def cuda_int4(tmp_path_factory):
    module = _int4(_gqa_module())
    return module, export(module, tmp_path_factory.mktemp("cuda") / "art", target="cuda",
                          accuracy_level=0)


def test_cuda_graph_is_float16_with_the_cuda_kernels_ops(cuda_int4):
    _, path = cuda_int4
    model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    onnx.checker.check_model(str(path / "model.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert {"MatMulNBits", "GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops
    f16, f32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input,
                                                             *model.graph.output]}
    assert types["logits"] == f32
    assert all(t == f16 for n, t in types.items() if n.startswith(("past.", "present.")))
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":  # scales follow the activations (T1)
            assert inits[node.input[2]].data_type == f16
            assert inits[node.input[1]].data_type == onnx.TensorProto.UINT8
    assert not any(i.data_type == f32 for i in inits.values()
                   if any(i.name in n.input for n in model.graph.node
                          if n.op_type in ("MatMulNBits", "Gather", "GroupQueryAttention")))
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["onnx"]["dtype"] == "float16" and manifest["target"] == "cuda"
    assert manifest["session"]["providers"][0] == "CUDAExecutionProvider"


def test_genai_config_names_the_cuda_provider(cuda_int4, tmp_path):
    _, path = cuda_int4
    cfg = json.loads((path / "genai_config.json").read_text())
    assert cfg["model"]["decoder"]["session_options"]["provider_options"] == [{"cuda": {}}]
    assert cfg["search"]["past_present_share_buffer"] is True
    cpu = export(_gqa_module(), tmp_path / "cpu")
    cfg = json.loads((cpu / "genai_config.json").read_text())
    assert cfg["model"]["decoder"]["session_options"]["provider_options"] == []


@pytest.mark.parametrize("optimize", ["all", "disable"])
def test_float16_graph_matches_the_interpreter_on_the_cpu_provider(cuda_int4, optimize):
    module, path = cuda_int4
    ids = np.random.default_rng(0).integers(0, module.config.vocab_size, (2, 12))
    art = load(path, providers=CPU, graph_optimization=optimize)
    got, cache = art.logits(ids)
    ref = _reference(module, ids)
    assert got.dtype == np.float32
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert rel < F16_BOUND, rel
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    # one step more through the float16 cache agrees with the whole sequence at once
    nxt = np.full((2, 1), 5)
    step, _ = art.logits(nxt, cache)
    full = _reference(module, np.concatenate([ids, nxt], 1))[:, -1:]
    assert np.abs(step - full).max() / np.abs(full).max() < F16_BOUND


def test_float16_real_model_standard_attention_matches(tmp_path):
    """stories260K (head_dim 8: standard attention with its Softmax kept float32)."""
    from splice.frontend import load_model

    module = load_model(str(STORIES))
    path = export(module, tmp_path / "art", target="cuda")
    ids = np.arange(1, 25)[None]
    got, _ = load(path, providers=CPU).logits(ids)
    ref = _reference(module, ids)
    assert np.abs(got - ref).max() / np.abs(ref).max() < F16_BOUND
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_in_place_generation_with_a_float16_cache(cuda_int4):
    module, path = cuda_int4
    art = load(path, providers=CPU)
    prompt = [1, 7, 9, 3]
    ids = art.generate_ids(prompt, max_new_tokens=6, stop_at_eos=False).ids
    ref_ids, seq = [], list(prompt)
    for _ in range(6):
        tok = int(_reference(module, np.asarray([seq]))[0, -1].argmax())
        ref_ids.append(tok)
        seq.append(tok)
    assert ids == ref_ids


def test_dtype_is_checked(tmp_path):
    with pytest.raises(InputError, match="dtype='bfloat16'; accepted: float32, float16"):
        export(_gqa_module(), tmp_path / "x", target="cuda", dtype="bfloat16")
    path = export(_gqa_module(), tmp_path / "cpu", target="cpu", dtype="float16")
    assert json.loads((path / "manifest.json").read_text())["onnx"]["dtype"] == "float16"
