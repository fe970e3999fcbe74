"""The `hadamard` op's ONNX lowering strategies (dense MatMul, Kronecker-factored MatMuls, fast
Walsh-Hadamard butterflies): each equals the reference interpreter within 1e-5 in float32 with
ONNX Runtime's optimisations off and on; the size rule picks the measured winner; and a rotated
model (fold_norms + rotate with R3 and R4) lowers and matches the interpreter over decode steps."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from splice.backends.onnx import RULES, LoweringError, lower, save
from splice.backends.onnx.hadamard import (DENSE_MAX, STRATEGIES, choose_strategy, hadamard_rule,
                                           two_sided_split, with_hadamard)
from splice.ir import Graph, Interpreter, ModelConfig, Module, emit, verify
from splice.passes.fold_norms import FoldNormsPass
from splice.passes.rotate import RotatePass
from tests.backends.test_onnx import LEVELS, TOL, compare, reference_trajectory, session
from tests.tiny import tiny_module

CASES = [
    (8, {"size": 8}),                             # Sylvester
    (12, {"size": 12}),                           # a Paley I base on its own
    (96, {"size": 96, "scale": 0.5}),             # 12 x 8, scaled
    (576, {"size": 576}),                         # SmolLM2's hidden: 36 (Paley II) x 16
    (1536, {"size": 1536}),                       # SmolLM2's MLP: 12 x 128
    (256, {"size": 256, "scale": 2.0}),           # Sylvester, two-sided 16 x 16
    (576, {"size": 576, "block": 64}),            # block-diagonal
    (4 * 24, {"size": 24, "group": 4}),           # per head, 12 x 2
    (3 * 64, {"size": 64, "group": 3, "block": 16}),  # per head and block-diagonal
]


def single_op(width: int, attrs: dict) -> Module:
    g = Graph()
    x = g.add_input("x", "f32", ("batch", "seq", width))
    g.outputs = [emit(g, "hadamard", [x], attrs, name="y", role="rot").output]
    module = Module(g, {}, ModelConfig("test", 1, width, 0, 1, 1, 1, 1, 1))
    verify(module)
    return module


def run_ort(model: ir.Model, feed: np.ndarray, level) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": feed})[0]


@pytest.mark.parametrize("strategy", [*STRATEGIES, "auto"])
@pytest.mark.parametrize("width,attrs", CASES)
def test_every_strategy_matches_the_reference(strategy, width, attrs):
    module = single_op(width, attrs)
    feed = torch.randn(2, 3, width, generator=torch.Generator().manual_seed(width))
    ref = Interpreter(module).run({"x": feed})["y"].numpy()
    model = lower(module, rules=with_hadamard(RULES, strategy))
    for level in LEVELS.values():
        assert np.abs(run_ort(model, feed.numpy(), level) - ref).max() <= 1e-5


def _matmul_weights(model: ir.Model) -> list[tuple[int, ...]]:
    return [tuple(v.const_value.shape) for n in model.graph if n.op_type == "MatMul"
            for v in n.inputs if v.const_value is not None]


def test_size_rule_picks_dense_up_to_the_crossover_then_two_sided():
    assert choose_strategy(DENSE_MAX) == "matmul" and choose_strategy(2 * DENSE_MAX) == "two_sided"
    assert choose_strategy(12 * 1024) == "kron"  # 12 x 1024: the left factor would be 384
    dense = lower(single_op(96, {"size": 96}))
    assert _matmul_weights(dense) == [(96, 96)]
    assert [n.op_type for n in dense.graph] == ["MatMul"]  # normalisation folded into H
    two_sided = lower(single_op(1536, {"size": 1536}))
    assert [n.op_type for n in two_sided.graph] == ["Reshape", "MatMul", "MatMul", "Reshape"]
    assert _matmul_weights(two_sided) == [(128, 128), (12, 12)]
    factored = lower(single_op(1536, {"size": 1536}), rules=with_hadamard(RULES, "kron"))
    assert sorted(_matmul_weights(factored)) == [(8, 8), (12, 12), (16, 16)]
    assert [n.op_type for n in factored.graph].count("Transpose") == 3


def test_two_sided_without_a_split_lowers_as_the_kronecker_factors():
    """12 x 1024: a two-sided left factor would be 384 wide, so both rules emit kron's nodes."""
    module = single_op(12 * 1024, {"size": 12 * 1024})
    feed = torch.randn(1, 2, 12 * 1024, generator=torch.Generator().manual_seed(3))
    ref = Interpreter(module).run({"x": feed})["y"].numpy()
    kron = lower(module, rules=with_hadamard(RULES, "kron"))
    for strategy in ("two_sided", "auto"):
        model = lower(module, rules=with_hadamard(RULES, strategy))
        assert [n.op_type for n in model.graph] == [n.op_type for n in kron.graph]
        assert np.abs(run_ort(model, feed.numpy(), LEVELS["on"]) - ref).max() <= 1e-5


@pytest.mark.parametrize("width,split", [(256, (16, 16)), (576, (36, 16)), (1536, (12, 128)),
                                         (11008, (172, 64)), (128, (16, 8)), (12, None),
                                         (12 * 1024, None)])
def test_two_sided_split(width, split):
    assert two_sided_split(width) == split


def test_fwht_is_butterflies_and_one_base_matmul():
    model = lower(single_op(96, {"size": 96}), rules=with_hadamard(RULES, "fwht"))
    ops = [n.op_type for n in model.graph]
    assert ops.count("Split") == ops.count("Concat") == 3  # 96 = 12 x 2^3
    assert _matmul_weights(model) == [(12, 12)]


def test_unknown_strategy_names_the_accepted_ones():
    with pytest.raises(LoweringError, match=r"unknown hadamard strategy 'butterfly'; accepted: "
                                            r"auto, matmul, two_sided, kron, fwht"):
        hadamard_rule("butterfly")


@pytest.mark.parametrize("strategy", ["auto", "fwht"])
def test_rotated_model_lowers_and_matches_the_interpreter(tmp_path, strategy):
    """fold_norms + rotate (R1..R4) on a tiny model, lowered with online transforms of 16 (R3,
    per head) and 256 (R4) channels: prefill and 8 decode steps equal the interpreter's."""
    module = tiny_module(seed=2, intermediate_size=256)
    FoldNormsPass()(module)
    RotatePass(r3=True)(module)
    assert len(module.graph.find(op="hadamard")) == 3 * module.config.num_layers
    path = save(lower(module, rules=with_hadamard(RULES, strategy)), tmp_path)
    ids = torch.randint(0, module.config.vocab_size, (1, 10),
                        generator=torch.Generator().manual_seed(4))
    traj = reference_trajectory(module, ids, 8)
    for level in LEVELS:
        assert compare(session(path, level), module, traj) <= TOL
