"""TVM cuda schedules without a GPU: which rule takes each kernel (decode products as low-batch
GEMVs, prefill products as GEMMs), a decode product compiled to CUDA, and the bundle's parameter
writer against the lowering's (benchmarks/gpu_bundle.py assembles cuda artefacts on the GPU
machine from a library compiled here). The whole-model cuda build is test_tvm.py's."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

tvm = pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install 'splice[tvm]')")

from tvm import relax  # noqa: E402

from splice.backends.tvm.build import make_target  # noqa: E402
from splice.backends.tvm.cuda_schedule import DecodeProducts, rule_of  # noqa: E402
from splice.backends.tvm.lower import lower  # noqa: E402
from splice.passes.infra.base import PassContext  # noqa: E402
from splice.passes.quantize_weights import QuantizeWeightsPass  # noqa: E402
from tests.tiny import tiny_module  # noqa: E402

PRODUCTS = ("qlinear", "linear", "matmul")


def _kernels(module):
    """(name, kind, rows, PrimFunc) of every kernel the cuda lowering emits, legalised."""
    tgt = make_target("cuda", cuda_arch="sm_90")
    with tgt:
        mod = tvm.transform.Sequential([relax.transform.LegalizeOps(),
                                        relax.transform.AnnotateTIROpPattern()])(
            lower(module, packed=False).mod)
    out = []
    for gv, f in mod.functions.items():
        if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and "splice.kernel" in f.attrs:
            out.append((gv.name_hint, str(f.attrs["splice.kernel"]),
                        str(f.attrs["splice.rows"]) if "splice.rows" in f.attrs else None, f))
    return tgt, out


def _int4(module):
    return QuantizeWeightsPass(bits=4, group_size=32, symmetric=True).call(
        module, PassContext()).module


@pytest.mark.parametrize("quantized", [False, True])
def test_decode_products_are_gemvs_and_prefill_products_gemms(quantized):
    module = tiny_module(num_layers=1)
    tgt, kernels = _kernels(_int4(module) if quantized else module)
    products = [(n, k, r, f) for n, k, r, f in kernels if k in PRODUCTS]
    assert {r for _, _, r, _ in products} == {"few", "many"}
    if quantized:
        assert any(k == "qlinear" for _, k, _, _ in products)
    for name, kind, rows, f in products:
        assert rule_of(f, tgt) == ("DecodeProducts" if rows == "few" else "Matmul"), name


def test_the_decode_rule_declines_other_kernels_and_other_targets():
    tgt, kernels = _kernels(tiny_module(num_layers=1))
    rule = DecodeProducts()
    for name, kind, rows, f in kernels:
        if kind not in PRODUCTS or rows != "few":
            assert rule.apply(f, tgt, False) is None, name
    decode = next(f for _, k, r, f in kernels if k in PRODUCTS and r == "few")
    assert rule.apply(decode, make_target("cpu"), False) is None


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not installed")
def test_a_decode_int4_product_compiles_to_a_warp_reduction():
    tgt, kernels = _kernels(_int4(tiny_module(num_layers=1)))
    f = next(f for _, k, r, f in kernels if k == "qlinear" and r == "few")
    scheduled = DecodeProducts().apply(f, tgt, False).mod["main"]
    lib = tvm.compile(scheduled.with_attr("global_symbol", "qlinear_decode"), target=tgt)
    src = lib.mod.imports[0].inspect_source()
    assert "__global__" in src and "threadIdx.x" in src
    assert "__shfl" in src  # the reduction over k is split across a warp's lanes


def test_bundle_writes_the_parameters_the_lowering_would():
    from benchmarks.gpu_bundle import tvm_param_array

    module = _int4(tiny_module(num_layers=1))
    params = lower(module, packed=False).params
    assert {p.layout for p in params} >= {"plain", "q_weight", "q_scales"}
    for p in params:
        spec = {"name": p.name, "source": p.source, "layout": p.layout, "shape": list(p.shape),
                "dtype": p.dtype}
        got, want = tvm_param_array(module, spec), p.array(module)
        assert got.dtype == want.dtype and got.shape == want.shape, p.name
        np.testing.assert_array_equal(got, want, err_msg=p.name)
