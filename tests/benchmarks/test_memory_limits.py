"""The ONNX speed benchmark's limits: the bytes of weights a decode step reads and the time its
weight products take alone, on hand-built ONNX graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from benchmarks.memory_limits import weight_bytes_per_step, weight_matmul_seconds
from onnx import TensorProto, helper, numpy_helper


def _model(path, *, products: bool = True):
    """ids -> Gather(table) -> MatMul(w) -> Relu -> MatMulNBits(4-bit, K 32, N 16) -> y."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 32), dtype=np.float32), "table"),
             numpy_helper.from_array(rng.standard_normal((32, 32), dtype=np.float32), "w"),
             numpy_helper.from_array(rng.integers(0, 255, (16, 1, 16), dtype=np.uint8), "q"),
             numpy_helper.from_array(np.full(16, 0.1, np.float32), "scales")]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"])]
    if products:
        nodes += [helper.make_node("MatMul", ["e", "w"], ["h"]),
                  helper.make_node("Relu", ["h"], ["r"]),
                  helper.make_node("MatMulNBits", ["r", "q", "scales"], ["y"],
                                   domain="com.microsoft", K=32, N=16, bits=4, block_size=32)]
    else:
        inits = inits[:1]
        nodes.append(helper.make_node("Relu", ["e"], ["y"]))
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("ids", TensorProto.INT64,
                                                                        [1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("com.microsoft", 1)]),
              path)
    return path


def test_weight_bytes_leave_out_gathered_tables(tmp_path):
    # w (32 x 32 float32) + q (16 x 16 bytes) + scales (16 float32); the table is only gathered
    assert weight_bytes_per_step(_model(tmp_path / "m.onnx")) == 32 * 32 * 4 + 256 + 64


def test_weight_products_alone_run(tmp_path):
    assert 0 < weight_matmul_seconds(_model(tmp_path / "m.onnx"), threads=1, runs=2,
                                     repeats=2) < 1


def test_weight_products_need_a_weight(tmp_path):
    with pytest.raises(ValueError, match="no MatMulNBits or MatMul by a weight"):
        weight_matmul_seconds(_model(tmp_path / "m.onnx", products=False), runs=1, repeats=1)
