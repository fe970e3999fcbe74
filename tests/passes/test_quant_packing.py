"""The qlinear format: packing round-trips, the layout is byte-for-byte MatMulNBits' (checked
against a loop written from the contrib-op spec and against ONNX Runtime itself), the reference op
equals a linear over the dequantized weight, and the ONNX lowering agrees with the reference for
every bits x group x symmetry combination (float32 at accuracy_level 0; ~1% at level 4)."""

from __future__ import annotations

import itertools

import numpy as np
import onnxruntime as ort
import pytest
import torch
from splice.backends.onnx import RULES, lower, save
from splice.backends.onnx.quant import MS_DOMAIN, nbits_block, qlinear_rules
from splice.ir import Graph, IRError, Module, emit, verify
from splice.ir import quant
from splice.passes.numerics import quantizers
from splice.ir.interpreter import Interpreter

from tests.passes.models import config

COMBOS = list(itertools.product((4, 8), (32, 64, 128, 0), (True, False)))


def random_weight(n: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=gen, dtype=torch.float64) * 0.05


def qlinear_module(k: int, n: int, bits: int, group: int, symmetric: bool, *, bias: bool = False,
                   seed: int = 0, float_zero: bool = False) -> tuple[Module, quantizers.QuantizedWeight]:
    """x [batch, k] -> qlinear -> y [batch, n], with an RTN-quantized random weight."""
    group = group or k
    qw = quantizers.rtn(random_weight(n, k, seed), bits, group, symmetric=symmetric,
                   float_zero=float_zero)
    packed, scales, zp = qw.packed()
    weights = {"w.packed": packed, "w.scales": scales}
    g = Graph()
    x = g.add_input("x", "f32", ("batch", k))
    ins = [x, g.const("w.packed", "u8", tuple(packed.shape)),
           g.const("w.scales", "f32", tuple(scales.shape))]
    if zp is not None:
        weights["w.zp"] = zp
        ins.append(g.const("w.zp", "f32" if float_zero else "u8", tuple(zp.shape)))
    if bias:
        weights["w.bias"] = torch.randn(n, generator=torch.Generator().manual_seed(seed + 7)) * 0.1
        ins += [None] * (3 - len(ins) + 1) + [g.const("w.bias", "f32", (n,))]
    y = emit(g, "qlinear", ins, {"bits": bits, "group_size": group, "in_features": k,
                                 "out_features": n, "symmetric": symmetric}, name="y")
    g.outputs = [y.output]
    module = Module(g, weights, config())
    verify(module)
    return module, qw


def ort_run(module: Module, x: np.ndarray, tmp_path, *, level: int = 0, optimize: bool = False):
    path = save(lower(module, rules={**RULES, **qlinear_rules(level)}), tmp_path)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else
                                     ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0], path


def spec_layout(codes: np.ndarray, bits: int, group: int) -> np.ndarray:
    """B as the MatMulNBits spec describes it, written as plain loops: [N][n_blocks][blob], codes
    along K, two 4-bit codes per byte with the first in the low nibble."""
    n, k = codes.shape
    blob = group * bits // 8
    out = np.zeros((n, k // group, blob), np.uint8)
    for r in range(n):
        for b in range(k // group):
            for j in range(group):
                c = int(codes[r, b * group + j])
                if bits == 8:
                    out[r, b, j] = c
                else:
                    out[r, b, j // 2] |= c << (4 * (j % 2))
    return out


# -- packing --------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
def test_pack_unpack_round_trip_and_spec_layout(bits):
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (5, 96), generator=gen, dtype=torch.uint8)
    for group in (32, 96, 64):  # 64: a partial last block, its tail padded with zero codes
        packed = quant.pack_weight(codes, bits, group)
        blocks = -(-96 // group)
        assert packed.dtype == torch.uint8 and packed.shape == (5, blocks, group * bits // 8)
        padded = np.zeros((5, blocks * group), np.uint8)
        padded[:, :96] = codes.numpy()
        assert np.array_equal(packed.numpy(), spec_layout(padded, bits, group))
        assert torch.equal(quant.unpack_weight(packed, bits, group, 96), codes)
    zeros = torch.randint(0, 1 << bits, (5, 3), generator=gen, dtype=torch.uint8)  # odd count
    zp = quant.pack_zero_points(zeros, bits)
    assert zp.shape == quant.zero_points_shape(5, 3, bits)
    if bits == 4:
        assert int(zp[0, 0]) == int(zeros[0, 0]) | int(zeros[0, 1]) << 4
        assert int(zp[0, 1]) == int(zeros[0, 2])  # the padding nibble is zero
    assert torch.equal(quant.unpack_zero_points(zp, bits, 3), zeros)


@pytest.mark.parametrize("bits,group,symmetric", COMBOS)
def test_ort_matmulnbits_equals_float64_dequantized_product(bits, group, symmetric, tmp_path):
    """Bit-exact layout: ONNX Runtime's MatMulNBits reading the packed tensors equals x @ W^T with
    W dequantized in float64, to float32 precision; the interpreter's reference agrees too.
    K = 320 gives groups of 128 a partial last block (MatMulNBits' padding) and per-channel groups
    a non-power-of-two block (lowered as 5 blocks of 64)."""
    k, n = 320, 48
    module, qw = qlinear_module(k, n, bits, group, symmetric, bias=True, seed=bits + group)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(3))
    w64 = qw.dequantize(torch.float64)
    expect = x.double() @ w64.T + module.weights["w.bias"].double()
    got, path = ort_run(module, x.numpy(), tmp_path)
    scale = expect.abs().max().item()
    assert np.abs(got - expect.numpy()).max() / scale < 1e-6
    ref = Interpreter(module, torch.float32).run({"x": x})["y"]
    assert np.abs(got - ref.numpy()).max() / scale <= 1e-4
    ref64 = Interpreter(module, torch.float64).run({"x": x.double()})["y"]
    assert (ref64 - expect).abs().max().item() <= 1e-12 * scale
    # the packed weight reached ONNX Runtime untouched (no repacking at lowering)
    import onnx

    proto = onnx.load(str(path))
    node = next(nd for nd in proto.graph.node if nd.op_type == "MatMulNBits")
    assert node.domain == MS_DOMAIN
    assert {o.domain: o.version for o in proto.opset_import} == {"": 21, MS_DOMAIN: 1}
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"K": k, "N": n, "bits": bits, "block_size": group or 64, "accuracy_level": 0}
    init = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    packed = module.weights["w.packed"].numpy()
    assert np.array_equal(init[node.input[1]].reshape(-1), packed.reshape(-1))  # same bytes
    assert packed.shape[1] == -(-k // (group or k))
    assert (len(node.input) > 3 and node.input[3] != "") == (not symmetric)


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (8, False)])
@pytest.mark.parametrize("k,group", [(96, 0), (172, 0), (40, 24)])
def test_groups_matmulnbits_cannot_take(bits, symmetric, k, group, tmp_path):
    """Per-channel groups of 96 = 3 x 32 lower as MatMulNBits blocks of 32 (scales repeated);
    172 = 4 x 43 has no power-of-two block >= 16, nor has 24 (with a partial last block on 40):
    they fall back to standard ops. All exact."""
    module, qw = qlinear_module(k, 24, bits, group, symmetric, seed=k)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(4))
    expect = (x.double() @ qw.dequantize(torch.float64).T).numpy()
    for optimize in (False, True):
        got, path = ort_run(module, x.numpy(), tmp_path / str(optimize), optimize=optimize)
        assert np.abs(got - expect).max() / np.abs(expect).max() < 1e-6
    import onnx

    ops = {nd.op_type for nd in onnx.load(str(path)).graph.node}
    assert ("MatMulNBits" in ops) == bool(nbits_block(group or k))
    assert nbits_block(96) == 32 and nbits_block(172) == 0


def test_accuracy_level_4_error_is_small(tmp_path):
    module, qw = qlinear_module(512, 64, 4, 32, False, seed=11)
    x = torch.randn(4, 512, generator=torch.Generator().manual_seed(5))
    expect = (x.double() @ qw.dequantize(torch.float64).T).numpy()
    got, _ = ort_run(module, x.numpy(), tmp_path, level=4)
    err = np.abs(got - expect).max() / np.abs(expect).max()
    assert 1e-6 < err < 3e-2  # int8 activations: not float32-exact, but close


@pytest.mark.parametrize("group", [32, 128, 0])
def test_float_zero_points_reach_matmulnbits(group, tmp_path):
    """4-bit with float32 zero points (MatMulNBits' unpacked zero points of A's type), including a
    partial last block (320 = 2.5 x 128) and per-channel sub-blocks."""
    module, qw = qlinear_module(320, 24, 4, group, False, seed=group, float_zero=True)
    assert module.weights["w.zp"].dtype == torch.float32
    x = torch.randn(3, 320, generator=torch.Generator().manual_seed(6))
    expect = (x.double() @ qw.dequantize(torch.float64).T).numpy()
    for level, tol in ((0, 1e-6), (4, 3e-2)):
        got, _ = ort_run(module, x.numpy(), tmp_path / str(level), level=level, optimize=True)
        assert np.abs(got - expect).max() / np.abs(expect).max() < tol


def test_float_zero_points_recover_a_q4_1_grid_exactly():
    """Weights published as Q4_1 (w = d * q + m per group of 32, llama.cpp) come back exactly with
    the min-max float zero point; an integer zero point cannot hold m / d."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randint(0, 16, (8, 128), generator=gen)
    q[:, ::32], q[:, 1::32] = 0, 15  # each group spans its grid, as Q4_1 quantization makes it
    d = (torch.rand(8, 4, 1, generator=gen) * 0.01 + 0.001).half().float()
    m = (-torch.rand(8, 4, 1, generator=gen) * 0.05).half().float()
    w = (q.reshape(8, 4, 32).float() * d + m).reshape(8, 128)
    exact = quantizers.rtn(w, 4, 32, float_zero=True).dequantize(torch.float32)
    assert (exact - w).abs().max() <= 1e-6 * w.abs().max()
    integer = quantizers.rtn(w, 4, 32).dequantize(torch.float32)
    assert (integer - w).abs().max() > 1e-3 * w.abs().max()
    with pytest.raises(IRError, match="float zero points need asymmetric 4-bit quantization"):
        quantizers.rtn(w, 8, 32, float_zero=True)


# -- the op ---------------------------------------------------------------------------------------

def test_reference_dequantizes_with_default_zero_points():
    module, qw = qlinear_module(64, 8, 4, 32, True)
    w = quant.dequantize(module.weights["w.packed"], module.weights["w.scales"], None, 4, 32,
                         torch.float64)
    assert torch.equal(w, qw.dequantize(torch.float64))
    codes = quant.unpack_weight(module.weights["w.packed"], 4, 32).double()
    s = module.weights["w.scales"].double().repeat_interleave(32, dim=1)
    assert torch.equal(w, (codes - 8) * s)


@pytest.mark.parametrize("attrs,match", [
    ({"bits": 3}, "int3 is not supported; bits must be 4 or 8"),
    ({"group_size": 128}, "group_size 128 exceeds in_features 64"),
    ({"symmetric": True}, "symmetric quantization has implicit zero points"),
    ({"out_features": 9}, r"packed weight %w.packed is u8\[8, 2, 16\], expected u8\[9, 2, 16\]"),
])
def test_bad_qlinear_attributes_are_refused(attrs, match):
    module, _ = qlinear_module(64, 8, 4, 32, False)
    node = module.graph.nodes[0]
    g = Graph()
    x = g.add_input("x", "f32", ("batch", 64))
    ins = [x] + [g.const(v.name, v.dtype, v.shape) for v in node.inputs[1:]]
    with pytest.raises(IRError, match=match):
        emit(g, "qlinear", ins, {**node.attrs, **attrs})


def test_quantizers_keep_codes_in_range_and_round_trip_exactly():
    w = random_weight(16, 64, 1)
    w[0] = 0.0  # an all-zero row dequantizes to zeros exactly
    for bits, sym in itertools.product((4, 8), (True, False)):
        for clip in (False, True):
            qw = quantizers.rtn(w, bits, 32, symmetric=sym, clip=clip)
            assert int(qw.codes.max()) < (1 << bits)
            assert torch.equal(qw.dequantize()[0], torch.zeros(64, dtype=torch.float64))
            err = (qw.dequantize() - w).abs()
            # round to nearest: within half a step, except what a clip or the symmetric grid cuts
            step = qw.scales.double().repeat_interleave(32, dim=1)
            if not clip and not sym:
                assert bool((err <= step / 2 + 1e-12).all())
        plain = quantizers.rtn(w, bits, 32, symmetric=False)
        clipped = quantizers.rtn(w, bits, 32, symmetric=False, clip=True)
        assert ((clipped.dequantize() - w) ** 2).sum() <= ((plain.dequantize() - w) ** 2).sum()


@pytest.mark.parametrize("float_zero", [False, True])
def test_rtn_and_its_error_by_blocks_of_rows_equal_the_whole_weight(monkeypatch, float_zero):
    w = random_weight(37, 80, 4)  # 80 inputs: a partial last group of 32
    whole = quantizers.rtn(w, 4, 32, clip=True, float_zero=float_zero)
    direct = float((whole.dequantize() - w.double()).norm() / w.double().norm())
    monkeypatch.setattr(quantizers, "ROW_CHUNK_ELEMENTS", 5 * 80)  # 5 rows a block, 2 in the last
    rows = quantizers.rtn(w, 4, 32, clip=True, float_zero=float_zero)
    for a, b in zip((whole.codes, whole.scales, whole.zeros), (rows.codes, rows.scales, rows.zeros)):
        assert torch.equal(a, b)
    assert rows.rel_error(w) == pytest.approx(direct, rel=1e-12)
    assert quantizers.rtn(torch.zeros(3, 32), 4, 32).rel_error(torch.zeros(3, 32)) == 0.0
