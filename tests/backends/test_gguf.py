"""gguf backend: the block packing is bit-exact against the gguf package's own quantize and
dequantize (Q4_0, Q4_1, Q8_0, on random tensors); a tiny model's and stories260K's GGUF read back
by the gguf package equal the IR's weights (float, and quantized on llama.cpp's grids); graphs and
recipes that llama.cpp's graph cannot hold are refused, naming the pass and what fits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")

from splice.backends.gguf import blocks, export  # noqa: E402
from splice.backends.gguf.fits import check_recipe  # noqa: E402
from splice.backends.gguf.llama import _head_rows, llama_layout  # noqa: E402
from splice.errors import InputError  # noqa: E402
from splice.ir import quant  # noqa: E402
from splice.passes.numerics import quantizers
from splice.recipe import Recipe  # noqa: E402

from tests.paths import STORIES, needs_stories  # noqa: E402
from tests.tiny import VARIANTS, tiny_module  # noqa: E402

Q = gguf.GGMLQuantizationType


def _random(rows=37, cols=128, seed=0):
    g = np.random.default_rng(seed)
    w = g.standard_normal((rows, cols)).astype(np.float32) * g.uniform(0.01, 3, (rows, 1))
    w[0, :32] = 0.0  # an all-zero block
    w[1, :32] = 0.5  # a constant block
    return w.astype(np.float32)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_packing_is_bit_exact_against_gguf(kind):
    """gguf's reference quantizer writes bytes; unpacking them and packing the codes and
    parameters again gives the same bytes, and dequantizing gives gguf's floats exactly."""
    w = _random()
    ref = gguf.quants.quantize(w, Q[kind])
    k = w.shape[1]
    parts = blocks.unpack(ref, kind, k)
    if kind == "Q4_0":
        again = blocks.pack_q4_0(parts[0], parts[1])
    elif kind == "Q4_1":
        codes, d, m = parts
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(d == 0, 0.0, -m.astype(np.float64) / d)
        d = np.where(d == 0, np.float32(1.0), d)  # splice never stores a zero scale
        codes = np.where(np.repeat(parts[1] == 0, 32, axis=1), 0, codes)
        again = blocks.pack_q4_1(codes, d, z)
        ref = gguf.quants.quantize(w[2:], Q[kind])  # rows with a zero scale cannot round-trip
        again = again[2:]
    else:
        again = blocks.pack_q8_0(parts[0], parts[1])
    np.testing.assert_array_equal(again, ref)
    k_rows = ref.shape[0]
    ours = blocks.dequantize(ref, kind, k)
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(ref, Q[kind]).reshape(k_rows, k))


def test_splice_codes_pack_to_what_gguf_dequantizes():
    """splice's own 4-bit symmetric grid (scales rounded to float16 first) packed as Q4_0 and
    its 8-bit symmetric grid as Q8_0: gguf's dequantizer returns splice's dequantized weights."""
    w = torch.from_numpy(_random(seed=1)).double()
    for bits, kind in ((4, "Q4_0"), (8, "Q8_0")):
        qw = quantizers.rtn(w, bits, 32, symmetric=True)
        scales = qw.scales.to(torch.float16).float()  # the float16 grid, codes re-chosen on it
        codes = quantizers.quantize_codes(w.reshape(37, 4, 32), scales.double()[..., None],
                                     qw.zeros.double()[..., None], bits).reshape(37, 128)
        c = codes.numpy().astype(np.int16)
        data = blocks.pack_q4_0(c, scales.numpy()) if bits == 4 else \
            blocks.pack_q8_0(c - 128, scales.numpy())
        expect = ((codes.reshape(37, 4, 32) - qw.zeros.double()[..., None])
                  * scales.double()[..., None]).reshape(37, 128).float().numpy()
        got = gguf.quants.dequantize(data, Q[kind]).reshape(37, 128)
        np.testing.assert_array_equal(got, expect)


def _quantize(module, calibration=None, **settings):
    from splice.passes.infra.base import PassContext
    from splice.passes.quantize_weights import QuantizeWeightsPass

    qw = QuantizeWeightsPass(**{"group_size": 32, "symmetric": True, "scale_dtype": "float16",
                                **settings})
    return qw.call(module, PassContext(calibration=calibration)).module


@pytest.mark.parametrize("settings", [
    {"bits": 4}, {"bits": 8}, {"bits": 4, "symmetric": False, "float_zero_points": True},
    {"bits": 4, "method": "gptq", "act_order": True, "clip_search": True},
    {"bits": 4, "lm_head": "int4", "embeddings": "int4"}],
    ids=["q4_0", "q8_0", "q4_1", "q4_0_gptq", "q4_0_head_table"])
def test_float16_scales_write_exactly(tmp_path, settings):
    """quantize_weights with scale_dtype = "float16" stores scales (and Q4_1 minimums) that
    float16 holds, codes chosen on those scales: the file holds exactly the IR's weights."""
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    module = _quantize(tiny_module(seed=2), calib, **settings)
    for n in module.graph.nodes:
        if n.op in ("qlinear", "qembedding"):
            s = module.weight(n.inputs[2])
            assert torch.equal(s.to(torch.float16).float(), s.float()), n.output.name
    tensors, _, _ = _check_readback(module, export(module, tmp_path / "q"))
    kinds = {kind for _, kind in tensors.values()}
    assert kinds - {"F32"} == {"Q8_0" if settings["bits"] == 8 else
                               "Q4_1" if settings.get("float_zero_points") else "Q4_0"}
    if "embeddings" in settings:
        assert tensors["token_embd.weight"][1] == tensors["output.weight"][1] == "Q4_0"


def test_float32_scales_and_other_grids_are_refused(tmp_path):
    with pytest.raises(InputError, match="not a float16 value.*scale_dtype = 'float16'"):
        export(_quantize(tiny_module(seed=2), scale_dtype="float32"), tmp_path / "a")
    with pytest.raises(InputError, match="groups of 64.*groups of 32"):
        export(_quantize(tiny_module(seed=2), group_size=64), tmp_path / "b")
    with pytest.raises(InputError, match="asymmetric 8-bit"):
        export(_quantize(tiny_module(seed=2), bits=8, symmetric=False), tmp_path / "c")
    assert not any(tmp_path.iterdir())


def test_scales_that_are_not_float16_are_refused():
    codes = np.zeros((2, 32), np.uint8)
    with pytest.raises(InputError, match="not a float16 value.*scale_dtype = 'float16'"):
        blocks.pack_q4_0(codes, np.array([[0.1], [0.5]], np.float32))
    with pytest.raises(InputError, match="multiple of 32"):
        blocks.pack_q8_0(np.zeros((2, 48), np.int8), np.ones((2, 1), np.float32))


def _read(path):
    reader = gguf.GGUFReader(path)
    tensors = {}
    for t in reader.tensors:
        data = np.asarray(t.data)
        if t.tensor_type in (Q.F32, Q.F16):
            arr = data.astype(np.float32)
        else:
            arr = gguf.quants.dequantize(data, t.tensor_type)
        tensors[t.name] = (arr.reshape(tuple(int(x) for x in reversed(t.shape))),
                           t.tensor_type.name)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    return tensors, fields


def _ir_weights(module):
    """GGUF name -> the float weight the IR computes with (dequantized for q-ops)."""
    lay = llama_layout(module)
    out = {}
    for e in lay.tensors:
        if e.node is None:
            out[e.name] = e.array
            continue
        n = e.node
        if n.op in ("linear", "embedding"):
            w = module.weight(n.inputs[1]).float().numpy()
        else:
            a = n.attrs
            k = a.get("in_features", a.get("embedding_dim"))
            ins = [module.weight(v) if v is not None else None for v in n.inputs[1:4]]
            ins += [None] * (3 - len(ins))
            w = quant.dequantize(ins[0], ins[1], ins[2], a["bits"], a["group_size"],
                                 torch.float32, k).numpy()
        out[e.name] = w if e.rows is None else w[e.rows]
    return out, lay


def test_head_rows_is_convert_hf_to_gguf_permute():
    n_head, hd, dim = 3, 8, 5
    w = np.arange(n_head * hd * dim).reshape(n_head * hd, dim)
    theirs = w.reshape(n_head, 2, hd // 2, dim).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(w[_head_rows(n_head, hd)], theirs)


def _check_readback(module, path, float_type="f32"):
    tensors, fields = _read(path / "model.gguf")
    expect, lay = _ir_weights(module)
    assert set(tensors) == set(expect)
    for name, w in expect.items():
        got, kind = tensors[name]
        if kind == "F16":
            w = w.astype(np.float16).astype(np.float32)
        if kind == "Q4_1":  # q * d + m against splice's (q - z) * s: float32 rounding apart
            np.testing.assert_allclose(got, w, rtol=0, atol=1e-6 * np.abs(w).max(), err_msg=name)
        else:
            np.testing.assert_array_equal(got, w, err_msg=name)
    cfg = module.config
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == cfg.num_layers
    assert fields["llama.attention.head_count_kv"] == cfg.num_kv_heads
    assert len(fields["tokenizer.ggml.tokens"]) == cfg.vocab_size
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["backend"] == "gguf" and "model.gguf" in manifest["files"]
    return tensors, fields, lay


def test_tiny_float_model_reads_back_equal(tmp_path):
    module = tiny_module(seed=2)
    _, fields, lay = _check_readback(module, export(module, tmp_path / "a"))
    assert not lay.tied and fields["tokenizer.ggml.model"] == "gpt2"
    module16 = tiny_module(seed=2, **VARIANTS["qwen3_qknorm_tied"] | {"qk_norm": False})
    tensors, _, lay = _check_readback(module16, export(module16, tmp_path / "b",
                                                       float_type="f16"), "f16")
    assert lay.tied and "output.weight" not in tensors
    assert tensors["blk.0.attn_q.weight"][1] == "F16"
    assert tensors["blk.0.attn_norm.weight"][1] == "F32"


@needs_stories
def test_stories260k_reads_back_with_its_tokenizer(tmp_path):
    from splice.frontend import load_model

    module = load_model(STORIES)
    _, fields, _ = _check_readback(module, export(module, tmp_path / "s"))
    tokens = fields["tokenizer.ggml.tokens"]
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[3] == "<0x00>"
    assert any(t.startswith("\u2581") for t in tokens) and not any(" " in t for t in tokens)
    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["llama.rope.freq_base"] == pytest.approx(10000.0)


def test_graph_llama_cpp_lacks_is_refused(tmp_path):
    from splice.api import run_passes

    rotated, _ = run_passes(tiny_module(seed=2), Recipe("r", (("fold_norms", {}),
                                                             ("rotate", {"r4": True}))))
    with pytest.raises(InputError, match="hadamard.*made by rotate"):
        export(rotated, tmp_path / "r")
    with pytest.raises(InputError, match="bias"):
        export(tiny_module(seed=2, qkv_bias=True), tmp_path / "b")
    with pytest.raises(InputError, match="attn_post_norm.*is not part of it"):
        export(tiny_module(seed=2, **VARIANTS["gemma2"]), tmp_path / "g")
    assert not (tmp_path / "r").exists()


REFUSED = [
    (("rotate", {}), "rotate.*r4 = true.*set r3 = false and r4 = false"),
    (("rotate", {"r4": False, "r3": True}), "r3 = true"),
    (("quantize_activations", {}), "quantize_activations"),
    (("quantize_kv_cache", {}), "quantize_kv_cache"),
    (("absorb_post_norm", {}), "absorb_post_norm"),
    (("estimate_patch", {"kind": "mlp"}), "kind = 'mlp'"),
    (("estimate_patch", {}), "estimate_patch.*strategy = 'fold'"),
    (("fuse_patch", {"strategy": "auto"}), "fuse_patch.*strategy = 'auto'.*set strategy"),
    (("quantize_weights", {"bits": 4, "group_size": 128}), "group_size = 128.*set group_size"),
    (("quantize_weights", {"bits": 4, "group_size": 32, "symmetric": False}),
     "integer zero points.*float_zero_points"),
]


@pytest.mark.parametrize("spec,message", REFUSED, ids=[s[0][0] + str(i)
                                                        for i, s in enumerate(REFUSED)])
def test_recipes_that_do_not_fit_are_refused(spec, message):
    with pytest.raises(InputError, match=message):
        check_recipe(Recipe("r", (spec,)).build())


def test_recipes_that_fit_pass():
    check_recipe(Recipe("ok", (("fold_norms", {}), ("rotate", {"r4": False}))).build())
    check_recipe(Recipe("prune", (("select_layers", {"n": 1}), ("estimate_patch", {}),
                                  ("prune_layers", {}), ("fuse_patch", {"strategy": "fold"}))
                        ).build())
    for name in ("gguf_q4_0", "gguf_q4_0_prune4"):  # the built-in recipes for this backend
        check_recipe(Recipe.named(name).build())


def test_compile_refuses_before_loading_the_model(tmp_path, monkeypatch):
    import splice.frontend

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the recipe was checked")

    monkeypatch.setattr(splice.frontend, "load_model", no_load)
    from splice.api import compile

    recipe = Recipe("r", (("fold_norms", {}), ("rotate", {}),))
    with pytest.raises(InputError, match="pass 'rotate': r4 = true"):
        compile(tiny_module(seed=2), recipe, out=tmp_path / "x", backend="gguf")
    assert not (tmp_path / "x").exists()


def test_compile_writes_an_artefact(tmp_path):
    from splice.api import compile

    recipe = Recipe("q", (("fold_norms", {}), ("rotate", {"r4": False}), ("quantize_weights", {
        "bits": 4, "group_size": 32, "symmetric": True, "scale_dtype": "float16"})))
    path = compile(tiny_module(seed=2), recipe, out=tmp_path / "a", backend="gguf", load=False)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["gguf"]["types"] == {"F32": 7, "Q4_0": 14}
    assert [p["name"] for p in manifest["recipe"]["passes"]] == ["fold_norms", "rotate",
                                                                 "quantize_weights"]


@pytest.mark.parametrize("quantized", [False, True], ids=["f32", "q4_0"])
def test_file_reimported_by_transformers_computes_the_same_logits(tmp_path, quantized):
    """An independent reader: splice's own GGUF frontend (transformers' GGUF loader, which undoes
    the q/k row permutation and dequantizes the blocks itself) imports the written file, and the
    reference interpreter gives the logits of the module that was written."""
    from splice.frontend import load_model
    from splice.ir.interpreter import run_logits

    module = tiny_module(seed=2)
    if quantized:
        module = _quantize(module, bits=4, lm_head="int4", embeddings="int4")
    path = export(module, tmp_path / "a")
    again = load_model(path / "model.gguf")
    ids = torch.tensor([[256, 72, 101, 108, 108, 111, 3, 200]])
    want = run_logits(module, ids)["logits"]
    got = run_logits(again, ids)["logits"]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
