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


def _tile(codes, scales, zp):
    """The codes, scales and zero points in the CPU's tiled layouts (what an artefact stores)."""
    from splice.backends.tvm.context import _tiled
    from splice.backends.tvm.quant import TILE

    tiles = -(-codes.shape[0] // TILE)
    return (_tiled(codes, (tiles, codes.shape[1], TILE, codes.shape[2])),
            _tiled(scales, (tiles, scales.shape[1], TILE)),
            None if zp is None else _tiled(zp, (tiles, zp.shape[1], TILE)))


def _run(x, codes, scales, zp, bias, residual, *, bits, group, zeros, tiled=False):
    from tvm import te

    from splice.backends.tvm.build import make_target
    from splice.backends.tvm.quant import Q_ROW_TILE, qlinear_kernel
    from splice.backends.tvm.schedule import CPURule

    rows, n = x.shape[0], codes.shape[0]
    if tiled:
        codes, scales, zp = _tile(codes, scales, zp)
    arrays = (("x", x), ("w", codes), ("s", scales), ("zp", zp), ("b", bias), ("r", residual))
    ph = {name: te.placeholder(a.shape, str(a.dtype), name=name) for name, a in arrays
          if a is not None}
    y = qlinear_kernel(ph["x"], ph["w"], ph["s"], ph.get("zp"), ph["b"], ph["r"], bits=bits,
                       group_size=group, symmetric=zeros == "symmetric", out_features=n,
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
    # the products' codes and scales in the tiled layouts, the gathered table's as the IR holds it
    layouts = {p["name"]: p["layout"] for p in art.manifest["tvm"]["param_list"]}
    assert layouts["layers.0.mlp.down_proj.qzeros"] == "q_zeros_tiled"
    assert layouts["lm_head.qweight"] == "q_weight_tiled"
    assert layouts["layers.0.mlp.down_proj.scales"] == "q_scales_tiled"
    assert layouts["embed.qweight"] == "q_weight" and layouts["embed.scales"] == "q_scales"
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


# -- int8 activations (export option activations="int8", qdot.py) -------------------------------
# (bits, group, zeros, in_features): groups of 32..256 with a partial last group, per-channel
# groups over 256 channels (activation blocks of 64), every zero-point form
INT8_FORMATS = [(4, 32, "symmetric", 200), (4, 64, "packed", 200), (4, 128, "float", 328),
                (4, 256, "packed", 328), (4, 320, "symmetric", 320), (8, 32, "packed", 200),
                (8, 64, "float", 200), (8, 128, "symmetric", 328), (8, 256, "packed", 328)]


def _act_semantics(x, bits, group, blocks):
    """qdot.py's stated semantics in numpy: per activation block d = max|x| / 127 (1 where 0),
    xq = nearbyint(x / d) in float32; returned in input-channel order with the padding."""
    from splice.backends.tvm.qdot import act_block

    ab = act_block(group)
    rows, k = x.shape
    xp = np.zeros((rows, blocks * group), np.float32)
    xp[:, :k] = x
    xb = xp.reshape(rows, -1, ab)
    amax = np.abs(xb).max(-1)
    d = np.where(amax == 0, np.float32(1), amax / np.float32(127)).astype(np.float32)
    xq = np.clip(np.rint(xb / d[..., None]), -127, 127).astype(np.float32)
    return xq.reshape(rows, -1), d, ab


def _run_int8(x, codes, scales, zp, *, bits, group, zeros, tiled=False, isa="avx2"):
    from tvm import te

    from splice.backends.tvm.build import make_target
    from splice.backends.tvm.qdot import qdot_decode, quantize_activations
    from splice.backends.tvm.schedule import CPURule

    rows, n, blocks = x.shape[0], codes.shape[0], codes.shape[1]
    target = make_target("cpu")
    xp = te.placeholder(x.shape, "float32", name="x")
    outs = quantize_activations(xp, bits=bits, blocks=blocks, group_size=group)
    qf = te.create_prim_func([xp, *outs], "int64").with_attrs(
        {"splice.kernel": "qact", "splice.rows": "few"})
    qlib = tvm.compile(CPURule().apply(qf, target, False).mod, target)
    q = [tvm.runtime.tensor(np.zeros([int(v) for v in o.shape], str(o.dtype))) for o in outs]
    qlib(tvm.runtime.tensor(x), *q)
    form = "symmetric" if zeros == "symmetric" else "float" if zeros == "float" else "uint8"
    if tiled:
        codes, scales, zp = _tile(codes, scales, zp)
    f = qdot_decode(n_out=n, blocks=blocks, group_size=group, bits=bits, zeros=form,
                    zp_shape=None if zp is None else zp.shape, tiled=tiled, isa=isa)
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target)
    y = tvm.runtime.tensor(np.zeros((rows, n), np.float32))
    lib(*q, *(tvm.runtime.tensor(a) for a in (codes, scales, scales if zp is None else zp)), y)
    return y.numpy(), [a.numpy() for a in q]


@pytest.mark.parametrize("bits,group,zeros,k", INT8_FORMATS)
def test_int8_activation_product_matches_its_integer_semantics_and_float_to_its_bound(
        bits, group, zeros, k):
    """The quantized activations exactly as stated (qdot.py); the product equal to the integer
    semantics sum_b s d sum (q - z) xq to float32 rounding; and against float activations within
    the stated bound sum_b (d_b / 2) sum_{i in b} |w_i| (|x - xq d| <= d / 2 per channel)."""
    from splice.backends.tvm.qdot import _source, nibble_span

    rng = np.random.default_rng(bits * 1000 + group + k)
    n, rows = 45, 3
    codes, scales, zp = _weight(rng, n, k, bits, group, zeros)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[1, :40] *= 30  # one block with an outlier range
    x[2] = 0.0  # an all-zero row: d = 1, xq = 0
    got, (xq_t, d_t, ds_t) = _run_int8(x, codes, scales, zp, bits=bits, group=group,
                                       zeros=zeros)
    blocks = codes.shape[1]
    xq, d, ab = _act_semantics(x, bits, group, blocks)
    span = nibble_span(bits, ab)
    order = np.array([(p // ab) * ab + _source(bits, p % ab, span)
                      for p in range(blocks * group)])
    np.testing.assert_array_equal(xq_t.astype(np.float32), xq[:, order])
    np.testing.assert_array_equal(d_t, d)
    np.testing.assert_array_equal(ds_t, d * xq.reshape(rows, -1, ab).sum(-1).astype(np.float32))

    w = dequantize(torch.from_numpy(codes), torch.from_numpy(scales),
                   None if zp is None else torch.from_numpy(zp), bits, group, torch.float64,
                   blocks * group).numpy()
    xd = xq.astype(np.float64) * np.repeat(d, ab, axis=1)
    ref = xd @ w.T
    # float32 rounding: per output, the block terms (magnitudes |s d| sum |q - c| |xq| and the
    # zero point's |z - c| |s d sum xq|) summed in about nab + 8 float32 steps
    c = 0 if bits == 4 else 128
    zf = dequantize(torch.from_numpy(np.full_like(codes, c if bits == 8 else 0)),
                    torch.from_numpy(scales), None if zp is None else torch.from_numpy(zp), bits,
                    group, torch.float64, blocks * group).numpy()  # (c - z) s per weight
    mag = np.abs(xd) @ (np.abs(w) + 2 * np.abs(zf)).T
    nab = blocks * group // ab
    assert np.all(np.abs(got - ref) <= 2 * (nab + 16) * EPS32 * mag + 1e-30), \
        float(np.max(np.abs(got - ref) / (mag + 1e-30)))

    wk = w[:, :k]
    exact = x.astype(np.float64) @ wk.T
    bound = (np.repeat(d, ab, axis=1)[:, :k] / 2) @ np.abs(wk).T + 2 * (nab + 16) * EPS32 * mag
    err = np.abs(got - exact)
    assert np.all(err <= bound), float(np.max(err / bound))
    # and not trivially: float activations' product is far outside the integer rounding bound
    assert np.max(np.abs(exact - ref)) > 100 * np.max(2 * (nab + 16) * EPS32 * mag)


def _host_isa() -> str:
    from splice.backends.tvm.build import make_target
    from splice.backends.tvm.export import dot_isa

    return dot_isa("cpu", make_target("cpu"))


@pytest.mark.skipif(_host_isa() == "avx2", reason="this CPU has no AVX-VNNI / AVX-512 VNNI")
def test_vnni_products_give_the_avx2_products_bit_for_bit():
    """isa="vnni" (vpdpbusd) sums each lane's 4 byte products as vpmaddubsw then vpmaddwd by
    ones do, so its int32 sums, and so its outputs, are AVX2's bit for bit; "vnni512" (where
    the CPU has AVX-512) the same sums two outputs a register: int4 in 16- and 32-byte chunks,
    per-channel blocks, int8 with its sign trick, tiled as the CPU stores them and plain."""
    isas = ["vnni", "vnni512"] if _host_isa() == "vnni512" else ["vnni"]
    for bits, group, zeros, k in [(4, 32, "symmetric", 200), (4, 64, "packed", 200),
                                  (4, 320, "symmetric", 320), (8, 64, "float", 200),
                                  (4, 128, "float", 328)]:
        rng = np.random.default_rng(bits + group + k)
        codes, scales, zp = _weight(rng, 45, k, bits, group, zeros)
        x = rng.standard_normal((3, k)).astype(np.float32)
        x[1, :40] *= 30
        ref, _ = _run_int8(x, codes, scales, zp, bits=bits, group=group, zeros=zeros, tiled=True)
        assert np.abs(ref).max() > 0
        for isa in isas:
            for tiled in (True, False):
                got, _ = _run_int8(x, codes, scales, zp, bits=bits, group=group, zeros=zeros,
                                   tiled=tiled, isa=isa)
                np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("isa", ["avx2", "vnni", "vnni512", "neon"])
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (4, 128), (8, 64)])
def test_tiled_products_prefetch_their_own_stream_prefetch_ahead_bytes_on(bits, group, isa):
    """A decode step's weights come from memory, and only the prefetches keep a task's loads
    ahead of it (without them a step is ~1.7x slower): each prefetch of tile t's weight group g
    must name the codes PREFETCH_AHEAD bytes (and the scales as many groups) past the ones the
    task is reading, in the tiled layout's bytes. (A register-width variable that shadowed the
    group's code width once moved every prefetch near the weight's start; no product changed.)"""
    import re

    from splice.backends.tvm.qdot import LINE, OUTPUTS, PREFETCH_AHEAD, qdot_decode

    blocks, width = 3, group * bits // 8
    script = qdot_decode(n_out=24, blocks=blocks, group_size=group, bits=bits, zeros="uint8",
                         zp_shape=None, tiled=True, isa=isa).script()
    codes = re.findall(r"T\.prefetch\(T\.address_of\(wf\[(.+?)\]\)", script)
    scales = re.findall(r"T\.prefetch\(T\.address_of\(sf\[(.+?)\]\)", script)
    assert len(codes) == 1 and len(scales) == 1, script
    lines = -(-OUTPUTS * width // LINE)
    for t, b, k in [(0, 0, 0), (5, 2, lines - 1), (3, 1, 0)]:
        read = (t * blocks + b) * OUTPUTS * width  # the first code byte of tile t, group b
        assert eval(codes[0], {"t": t, "b": b, "k": k}) == read + PREFETCH_AHEAD + k * LINE
        s_ahead = PREFETCH_AHEAD // (OUTPUTS * width) * OUTPUTS
        assert eval(scales[0], {"t": t, "b": b}) == (t * blocks + b) * OUTPUTS + s_ahead


@pytest.mark.parametrize("mcpu,isa", [("skylake", "avx2"), ("icelake-server", "vnni512"),
                                      ("alderlake", "vnni"), ("znver3", "avx2"),
                                      ("znver4", "vnni512")])
def test_dot_isa_follows_the_target_cpu_and_vnni_code_uses_vpdpbusd(mcpu, isa):
    """The int8 products use VNNI where the compile's target CPU has it (on 512-bit registers
    with AVX-512 VNNI and BW, else AVX-VNNI's 256-bit ones), else AVX2; aarch64 is sdot.
    Compiled for such a CPU (no need to run it), the VNNI product's code has vpdpbusd in place
    of vpmaddubsw, on zmm registers for vnni512."""
    from splice.backends.tvm.build import make_target
    from splice.backends.tvm.export import dot_isa
    from splice.backends.tvm.qdot import qdot_decode

    target = make_target("cpu", mcpu=mcpu)
    assert dot_isa("cpu", target) == isa
    assert dot_isa("aarch64", make_target("aarch64", dotprod=True)) == "neon"
    if isa != "avx2":
        f = qdot_decode(n_out=8, blocks=2, group_size=64, bits=4, zeros="uint8",
                        zp_shape=None, tiled=True, isa=isa)
        asm = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}),
                          target).mod.inspect_source("asm")
        assert "vpdpbusd" in asm and "vpmaddubsw" not in asm
        assert ("vpdpbusd\t%zmm" in asm) == (isa == "vnni512")


def test_int8_activations_option_prefill_and_32_decode_steps(tmp_path):
    """activations="int8": the prefill and the 32 greedy decode steps run the int8 products
    (int4 g64 with partial groups, int8 lm_head and embedding): the same tokens as the
    interpreter, logits within 2% of their range, and not the float path's. A bad option value
    is refused."""
    from splice.backends.tvm import export
    from splice.errors import InputError
    from splice.passes.infra.base import PassContext
    from splice.passes.quantize_weights import QuantizeWeightsPass
    from splice.runtime import load

    module = tiny_module(seed=3, hidden_size=96, intermediate_size=80, tie_embeddings=True)
    module = QuantizeWeightsPass(bits=4, group_size=64, lm_head="int8", embeddings="int8").call(
        module, PassContext()).module
    with pytest.raises(InputError, match="activations"):
        export(module, tmp_path / "bad", activations="int4")
    path = export(module, tmp_path / "art", activations="int8")
    art = load(path)
    assert art.manifest["tvm"]["activations"] == "int8"
    ids = torch.randint(0, module.config.vocab_size, (1, 12),
                        generator=torch.Generator().manual_seed(5))
    ref = run_logits(module, ids)
    logits, cache = art.logits(ids.numpy())
    r = ref["logits"].numpy()
    assert np.array_equal(logits.argmax(-1), r.argmax(-1))
    prefill = float(np.abs(logits - r).max() / np.abs(r).max())
    assert 1e-6 < prefill < 0.02
    worst = 0.0
    for _ in range(32):
        tok = ref["logits"][:, -1:].argmax(-1)
        ref = run_logits(module, tok, past=past_from_present(ref))
        logits, cache = art.logits(tok.numpy(), cache)
        r = ref["logits"].numpy()
        assert logits[0, -1].argmax() == r[0, -1].argmax()
        worst = max(worst, float(np.abs(logits - r).max() / np.abs(r).max()))
    assert 1e-6 < worst < 0.02  # int8 activations: not the float path, and close to it


@pytest.mark.parametrize("bits,group,zeros,k", [(4, 64, "packed", 200), (8, 32, "symmetric", 200),
                                                (4, 16, "float", 72), (4, 128, "packed", 328),
                                                (8, 64, "packed", 200), (4, 32, "float", 200),
                                                (4, 64, "symmetric", 200)])
def test_tiled_layout_gives_the_plain_layouts_products_bit_for_bit(bits, group, zeros, k):
    """The CPU's tiled codes and scales (quant.TILE outputs interleaved per block, the last tile
    padded) are only a storage order: decode, prefill and the int8-activation decode give the
    plain layout's results bit for bit, on 45 outputs (a partial last tile whose padding must
    not be stored over the last output)."""
    rng = np.random.default_rng(bits * 7 + group + k)
    n = 45
    codes, scales, zp = _weight(rng, n, k, bits, group, zeros)
    for rows in (1, 13):
        x = rng.standard_normal((rows, k)).astype(np.float32)
        bias = rng.standard_normal(n).astype(np.float32)
        residual = rng.standard_normal((rows, n)).astype(np.float32)
        plain = _run(x, codes, scales, zp, bias, residual, bits=bits, group=group, zeros=zeros)
        tiled = _run(x, codes, scales, zp, bias, residual, bits=bits, group=group, zeros=zeros,
                     tiled=True)
        np.testing.assert_array_equal(tiled, plain)
    if group % 32 == 0:  # the int8-activation product's groups
        x = rng.standard_normal((2, k)).astype(np.float32)
        plain, _ = _run_int8(x, codes, scales, zp, bits=bits, group=group, zeros=zeros)
        tiled, _ = _run_int8(x, codes, scales, zp, bits=bits, group=group, zeros=zeros,
                             tiled=True)
        np.testing.assert_array_equal(tiled, plain)
        assert np.abs(plain[:, -1]).max() > 0  # the last output is real, not the padding's 0
