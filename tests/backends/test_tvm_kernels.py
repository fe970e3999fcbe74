"""TVM backend: the int4/int8 products for every weight format splice writes, against the
interpreter's semantics (ir.quant.dequantize, then the product in float32: agreement to float32
rounding, bounded per output by the rounding of a K-term sum of |x| |q - z| s and |x| z s, since
the decode kernel takes the zero point out of the inner sum), scheduled as a build schedules them
(decode: one row; prefill: tiles of 8 rows with a partial last tile), on odd sizes: an odd number
of outputs, inputs that leave a partial last group (its tail codes random, not zero: the padding
must meet zeros), groups of 32, 64, 128, 256 and per-channel, symmetric or with integer or float
zero points, bias and residual fused. Also a tiny model whose groups leave a partial last group,
with an int4 lm_head and an int8 embedding, prefill + 32 decode steps against the interpreter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install 'splice[tvm]')")

from splice.ir import past_from_present, run_logits  # noqa: E402
from splice.ir.quant import dequantize  # noqa: E402

from tests.tiny import tiny_module  # noqa: E402

EPS32 = 2.0 ** -24

# (bits, group, zeros, in_features): every group size with a partial last group somewhere, and
# per-channel groups (group = in_features)
FORMATS = [(4, 32, "packed", 200), (4, 64, "symmetric", 200), (4, 128, "packed", 200),
           (4, 128, "float", 328), (4, 256, "symmetric", 328), (4, 328, "packed", 328),
           (8, 32, "symmetric", 200), (8, 64, "packed", 200), (8, 128, "packed", 328),
           (8, 256, "symmetric", 328), (8, 200, "packed", 200), (4, 16, "float", 72)]


def _weight(rng, n: int, k: int, bits: int, group: int, zeros: str):
    blocks = -(-k // group)
    codes = rng.integers(0, 256, (n, blocks, group * bits // 8)).astype(np.uint8)
    scales = (rng.random((n, blocks)) * 0.1 + 0.01).astype(np.float32)
    if zeros == "symmetric":
        zp = None
    elif zeros == "float":
        zp = (rng.random((n, blocks)) * 15).astype(np.float32)
    else:
        zi = rng.integers(0, 1 << bits, (n, blocks + blocks % 2)).astype(np.uint8)
        zp = (zi[:, 0::2] | (zi[:, 1::2] << 4)) if bits == 4 else zi[:, :blocks].copy()
    return codes, scales, zp


def _run(x, codes, scales, zp, bias, residual, *, bits, group, zeros):
    from tvm import te

    from splice.backends.tvm.build import make_target
    from splice.backends.tvm.quant import Q_ROW_TILE, qlinear_kernel
    from splice.backends.tvm.schedule import CPURule

    rows, n = x.shape[0], codes.shape[0]
    arrays = (("x", x), ("w", codes), ("s", scales), ("zp", zp), ("b", bias), ("r", residual))
    ph = {name: te.placeholder(a.shape, str(a.dtype), name=name) for name, a in arrays
          if a is not None}
    y = qlinear_kernel(ph["x"], ph["w"], ph["s"], ph.get("zp"), ph["b"], ph["r"], bits=bits,
                       group_size=group, symmetric=zeros == "symmetric",
                       row_tile=1 if rows == 1 else Q_ROW_TILE)
    func = te.create_prim_func([*ph.values(), y], "int64").with_attrs(
        {"splice.kernel": "qlinear", "splice.rows": "few" if rows == 1 else "many"})
    target = make_target("cpu")
    sch = CPURule().apply(func, target, False)
    assert "qpart" in sch.mod.script()  # the streamed form for every format
    lib = tvm.compile(sch.mod, target)
    out = tvm.runtime.tensor(np.zeros((rows, n), np.float32))
    lib(*[tvm.runtime.tensor(a) for _, a in arrays if a is not None], out)
    return out.numpy()


@pytest.mark.parametrize("bits,group,zeros,k", FORMATS)
@pytest.mark.parametrize("rows", [1, 13])
def test_every_weight_format_product_matches_the_interpreter(bits, group, zeros, k, rows):
    rng = np.random.default_rng(bits * 1000 + group + k + rows)
    n = 45
    codes, scales, zp = _weight(rng, n, k, bits, group, zeros)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    residual = rng.standard_normal((rows, n)).astype(np.float32)
    got = _run(x, codes, scales, zp, bias, residual, bits=bits, group=group, zeros=zeros)

    w = dequantize(torch.from_numpy(codes), torch.from_numpy(scales),
                   None if zp is None else torch.from_numpy(zp), bits, group, torch.float32,
                   k).numpy().astype(np.float64)
    ref = residual + (x.astype(np.float64) @ w.T + bias)
    # float32 rounding of a K-term sum, over the magnitudes the kernel adds up
    z = np.abs(w) + np.abs(dequantize(torch.from_numpy(np.zeros_like(codes)),
                                      torch.from_numpy(scales),
                                      None if zp is None else torch.from_numpy(zp), bits, group,
                                      torch.float64, k).numpy())
    bound = 2 * k * EPS32 * (np.abs(x).astype(np.float64) @ z.T + np.abs(bias)
                             + np.abs(residual)) + 1e-30
    assert np.all(np.abs(got - ref) <= bound), float(np.max(np.abs(got - ref) / bound))
    # and not trivially: a wrong weight breaks it by far more than the bound
    assert np.abs(ref).max() > 100 * bound.max()


def test_partial_groups_int4_lm_head_int8_embedding_prefill_and_32_decode_steps(tmp_path):
    """The SmolLM2 int4 g128 layout in small: groups that leave a partial last group in every
    projection but o_proj (hidden 96, MLP 80, groups of 64), the tied table as an int4 lm_head
    and an int8 embedding; the artefact's logits and cache against the interpreter for a
    12-token prefill and 32 greedy decode steps."""
    from splice.backends.tvm import export
    from splice.passes.infra.base import PassContext
    from splice.passes.quantize_weights import QuantizeWeightsPass
    from splice.runtime import load

    module = tiny_module(seed=3, hidden_size=96, intermediate_size=80, tie_embeddings=True)
    module = QuantizeWeightsPass(bits=4, group_size=64, lm_head="int4", embeddings="int8").call(
        module, PassContext()).module
    assert module.graph.find(op="qembedding")
    assert any(n.role == "lm_head" and n.attrs["bits"] == 4
               for n in module.graph.find(op="qlinear"))
    art = load(export(module, tmp_path / "art"))
    ids = torch.randint(0, module.config.vocab_size, (1, 12),
                        generator=torch.Generator().manual_seed(5))
    ref = run_logits(module, ids)
    logits, cache = art.logits(ids.numpy())
    worst = float(np.abs(logits - ref["logits"].numpy()).max())
    for _ in range(32):
        tok = ref["logits"][:, -1:].argmax(-1)
        ref = run_logits(module, tok, past=past_from_present(ref))
        logits, cache = art.logits(tok.numpy(), cache)
        worst = max(worst, float(np.abs(logits - ref["logits"].numpy()).max()))
    mine = cache.numpy()
    for name, value in past_from_present(ref).items():
        worst = max(worst, float(np.abs(mine[name] - value.numpy()).max()))
    assert worst < 1e-4
