"""Lazy GGUF loading (frontend/lazy_gguf.py) against the eager `load_gguf`: the same graph text,
config and tokenizer, and every weight equal bit for bit (name, dtype, shape, value), on tiny
random GGUF files of every supported family (with F32, F16, BF16, Q8_0, Q4_0 and Q4_1 tensors)
and on the embedded SmolLM2-135M Q4_1; reads keep nothing and leave no mapping of the file; bad
files are refused with a FrontendError naming what was wrong; and splice.compile(layerwise=True)
of a GGUF file equals the in-memory compile."""

from __future__ import annotations

import gc
import itertools
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers as T

import splice
from splice.errors import FrontendError
from splice.frontend.hf import default_model_path, load_gguf
from splice.frontend.lazy import LazyWeights
from splice.frontend.lazy_gguf import GGUFTensorRef, gguf_source, load_gguf_lazy
from tests.frontend.test_hf import randomise
from tests.paths import needs_smollm2

Q = gguf.GGMLQuantizationType
SIZES = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, num_hidden_layers=2,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)
# per family: (GGUF architecture, general.name, HF config), saying only what GGUF metadata says
FAMILIES = {
    "llama": ("llama", "tiny", lambda: T.LlamaConfig(tie_word_embeddings=True, **SIZES)),
    "qwen2": ("qwen2", "tiny", lambda: T.Qwen2Config(tie_word_embeddings=True, **SIZES)),
    # Qwen3's head_dim is not in its GGUF metadata: the config's default, 128
    "qwen3": ("qwen3", "tiny", lambda: T.Qwen3Config(tie_word_embeddings=False, head_dim=128,
                                                     **SIZES)),
    "gemma2": ("gemma2", "tiny", lambda: T.Gemma2Config(tie_word_embeddings=True, head_dim=16,
                                                        sliding_window=5, **SIZES)),
    "gemma3": ("gemma3", "tiny", lambda: T.Gemma3TextConfig(tie_word_embeddings=False,
                                                            head_dim=16, sliding_window=5,
                                                            **SIZES)),
    # fused qkv_proj / gate_up_proj: the canonical q/k/v and gate/up are row ranges of them
    "phi3": ("phi3", "tiny", lambda: T.Phi3Config(tie_word_embeddings=False, **SIZES)),
}
# matrices cycle through these (rows of 64 or 96 values: whole blocks of 32); vectors stay F32
MATRIX_TYPES = (Q.Q8_0, Q.Q4_0, Q.F16, Q.F32, Q.Q4_1, Q.BF16)


def gguf_names(model, arch: str) -> dict[str, str]:
    """Parameter name -> GGUF tensor name, from transformers' own map (inverted)."""
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    model_type = {"gemma3_text": "gemma3", "mistral": "llama"}.get(model.config.model_type)
    return {hf: name for name, hf in
            get_gguf_hf_weights_map(model, TensorProcessor(), model_type=model_type).items()}


def write_gguf(path: Path, family: str, *, types=MATRIX_TYPES, drop: str | None = None,
               override: dict[str, tuple[np.ndarray, int]] | None = None) -> torch.nn.Module:
    """A GGUF file of a random tiny `family` model: its config as metadata, each parameter under
    its GGUF name, matrices in `types` by turns. The values are written as they are (not
    permuted or offset the way llama.cpp's converter would), which is all an eager-vs-lazy
    comparison needs. `drop` leaves a tensor out; `override` writes raw bytes of a given type."""
    arch, name, make_config = FAMILIES[family]
    config = make_config()
    model = randomise(T.AutoModelForCausalLM.from_config(config))
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(config.max_position_embeddings)
    w.add_block_count(config.num_hidden_layers)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_bos_token_id(config.bos_token_id)
    w.add_eos_token_id(config.eos_token_id)
    w.add_pad_token_id(config.pad_token_id)
    if arch == "llama":
        w.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    if arch.startswith("gemma"):
        w.add_key_length(config.head_dim)
        w.add_value_length(config.head_dim)
        w.add_sliding_window(config.sliding_window)
    names = gguf_names(model, arch)
    kinds = itertools.cycle(types)
    override = override or {}
    for param, p in model.named_parameters():  # a tied lm_head is not a second parameter
        tensor = names[param]
        if tensor == drop:
            continue
        if tensor in override:
            raw, kind = override[tensor]
            w.add_tensor(tensor, raw, raw_dtype=kind)
            continue
        data = p.detach().numpy().astype(np.float32)
        kind = next(kinds) if data.ndim == 2 else Q.F32
        if kind == Q.F32:
            w.add_tensor(tensor, data)
        elif kind == Q.F16:
            w.add_tensor(tensor, data.astype(np.float16))
        else:
            w.add_tensor(tensor, gguf.quants.quantize(data, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def assert_same(eager, lazy) -> None:
    """Same graph text, config and tokenizer; every weight the same name, dtype, shape and bits."""
    assert str(eager.graph) == str(lazy.graph)
    assert eager.config == lazy.config
    assert eager.tokenizer == lazy.tokenizer
    assert isinstance(lazy.weights, LazyWeights)
    assert sorted(eager.weights) == sorted(lazy.weights)
    for k in eager.weights:
        a, b = eager.weights[k], lazy.weights[k]
        assert a.dtype == b.dtype and a.shape == b.shape, k
        assert torch.equal(a, b), k
        assert lazy.weights.shape(k) == tuple(a.shape) and lazy.weights.dtype(k) == a.dtype, k


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lazy_equals_eager_bit_for_bit(tmp_path, family):
    path = tmp_path / f"{family}.gguf"
    write_gguf(path, family)
    eager, lazy = load_gguf(path), load_gguf_lazy(path)
    assert_same(eager, lazy)
    assert eager.config.architecture == FAMILIES[family][2]().model_type
    assert lazy.weights.resident_bytes() < 4096  # only the made-up weights (rope frequencies)
    refs = [lazy.weights.ref(k) for k in lazy.weights if lazy.weights.ref(k) is not None]
    assert refs and all(isinstance(r, GGUFTensorRef) and r.path == path for r in refs)
    kinds = {Q(r.ggml_type) for r in refs}
    assert {Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.F16, Q.BF16, Q.F32} <= kinds  # every kind was read
    if family == "phi3":  # q, k and v are row ranges of one fused GGUF tensor
        q, k, v = (lazy.weights.ref(f"layers.0.attn.{n}_proj.weight") for n in "qkv")
        assert q.name == k.name == v.name == "blk.0.attn_qkv.weight"
        assert (q.rows, k.rows, v.rows) == ((0, 64), (64, 96), (96, 128))


def test_llama_q_and_k_rows_are_unpermuted_as_transformers_does(tmp_path):
    """The LLaMA processor reorders q/k rows after dequantizing: the lazy q weight is not the
    dequantized tensor as stored, and equals the eager one (test above); here, directly."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    path = tmp_path / "llama.gguf"
    write_gguf(path, "llama", types=(Q.Q8_0,))
    ref = load_gguf_lazy(path).weights.ref("layers.0.attn.q_proj.weight")
    assert isinstance(ref.processor, LlamaTensorProcessor) and ref.name == "blk.0.attn_q.weight"
    stored = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == ref.name)
    plain = torch.from_numpy(gguf.quants.dequantize(stored.data, stored.tensor_type).copy())
    assert not torch.equal(ref.load(), plain)
    assert torch.equal(ref.load().sort(dim=0).values, plain.sort(dim=0).values)  # rows moved


def test_reading_a_weight_keeps_nothing_and_maps_no_page(tmp_path):
    path = tmp_path / "llama.gguf"
    write_gguf(path, "llama")
    lazy = load_gguf_lazy(path)
    held = lazy.weights.resident_bytes()
    a = lazy.weights["layers.1.mlp.down_proj.weight"]
    a.zero_()  # the caller owns what it read: a second read is the file again
    b = lazy.weights["layers.1.mlp.down_proj.weight"]
    assert b is not a and b.abs().sum() > 0 and b.is_contiguous()
    assert lazy.weights.resident_bytes() == held
    assert lazy.weights.ref("layers.1.mlp.down_proj.weight") is not None
    gc.collect()
    maps = Path("/proc/self/maps")
    if maps.is_file():  # the reader's memory map is gone once the table is parsed
        assert str(path) not in maps.read_text()


def test_layerwise_compile_of_a_gguf_file_equals_in_memory(tmp_path, monkeypatch):
    import onnx
    from onnx import numpy_helper

    from splice.frontend import lazy_gguf
    from splice.runtime import load

    calls = []
    real = lazy_gguf.load_gguf_lazy
    monkeypatch.setattr(lazy_gguf, "load_gguf_lazy", lambda p: calls.append(p) or real(p))
    path = tmp_path / "llama.gguf"
    write_gguf(path, "llama")
    a = splice.compile(path, "fold_norms", out=tmp_path / "a", load=False)
    assert not calls  # the in-memory compile imports eagerly
    b = splice.compile(path, "fold_norms", out=tmp_path / "b", load=False, layerwise=True)
    assert calls == [path]
    wa, wb = ({i.name: numpy_helper.to_array(i, base_dir=str(p))
               for i in onnx.load(str(p / "model.onnx")).graph.initializer} for p in (a, b))
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert np.array_equal(load(a).logits([1, 2, 3])[0], load(b).logits([1, 2, 3])[0])
    assert not list(tmp_path.glob(".splice-layers-*"))


def test_gguf_source_names_what_load_model_reads_as_gguf(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    assert gguf_source(path) == path and gguf_source(str(path)) == path
    assert gguf_source(tmp_path / "absent.gguf") is None  # load_model reports it
    assert gguf_source(tmp_path) is None and gguf_source(object()) is None


# -- bad input -----------------------------------------------------------------------------------

def test_bad_files_are_refused(tmp_path):
    with pytest.raises(FrontendError, match="nope.gguf does not exist"):
        load_gguf_lazy(tmp_path / "nope.gguf")
    with pytest.raises(FrontendError, match="is not a file; expected a .gguf file"):
        load_gguf_lazy(tmp_path)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(FrontendError, match="empty.gguf is empty"):
        load_gguf_lazy(empty)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(FrontendError, match=r"other.gguf is not a GGUF file \(it starts with "
                                            r"b'PK\\x03\\x04', not b'GGUF'\)"):
        load_gguf_lazy(other)
    header = tmp_path / "header.gguf"
    header.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 8)
    with pytest.raises(FrontendError, match="header.gguf is a truncated or corrupt GGUF file"):
        load_gguf_lazy(header)


def test_truncated_files_are_refused(tmp_path):
    path = tmp_path / "llama.gguf"
    write_gguf(path, "llama")
    data = path.read_bytes()
    for name, cut in (("table", gguf.GGUFReader(str(path)).data_offset // 2),  # in the table
                      ("tail", len(data) - 100)):  # in the last tensor's bytes
        (tmp_path / f"{name}.gguf").write_bytes(data[:cut])
        with pytest.raises(FrontendError, match=f"{name}.gguf is a truncated or corrupt GGUF "
                                                "file"):
            load_gguf_lazy(tmp_path / f"{name}.gguf")
    lazy = load_gguf_lazy(path)  # cut after loading: the read says so
    path.write_bytes(data[:-100])
    with pytest.raises(FrontendError, match=r"llama.gguf is truncated: tensor \S+ needs bytes"):
        for k in lazy.weights:
            lazy.weights[k]


def test_a_file_transformers_cannot_map_is_refused_as_load_gguf_refuses_it(tmp_path):
    """A llama-architecture file named "mistral" becomes a Mistral model in transformers, whose
    GGUF tensor names gguf-py does not know: both imports say so."""
    path = tmp_path / "mistral.gguf"
    FAMILIES["mistral"] = ("llama", "mistral", lambda: T.MistralConfig(**SIZES))
    try:
        write_gguf(path, "mistral")
    finally:
        del FAMILIES["mistral"]
    with pytest.raises(FrontendError, match="Unknown gguf model_type: mistral"):
        load_gguf(path)
    with pytest.raises(FrontendError, match="transformers cannot map the tensors of .*"
                                            "mistral.gguf: NotImplementedError: Unknown gguf "
                                            "model_type: mistral"):
        load_gguf_lazy(path)


def test_unsupported_architectures_are_refused(tmp_path):
    path = tmp_path / "gpt2.gguf"  # transformers reads GPT-2 GGUF files; splice does not
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    # the architecture is checked from the header before any tensor is read (frontend.hf)
    with pytest.raises(FrontendError, match="gpt2.gguf: unsupported architecture "
                                            "general.architecture='gpt2'; supported: llama, "):
        load_gguf_lazy(path)


def test_a_missing_or_missized_tensor_is_named(tmp_path):
    path = tmp_path / "drop.gguf"
    write_gguf(path, "qwen3", drop="blk.1.ffn_up.weight")
    with pytest.raises(FrontendError, match=r"drop.gguf lacks tensor blk.1.ffn_up.weight \(the "
                                            r"model's model.layers.1.mlp.up_proj.weight\)"):
        load_gguf_lazy(path)
    path = tmp_path / "size.gguf"
    write_gguf(path, "qwen3", override={"blk.0.ffn_down.weight": (np.zeros((64, 32), np.float32),
                                                                  Q.F32)})
    with pytest.raises(FrontendError, match=r"size.gguf: tensor blk.0.ffn_down.weight is "
                                            r"\[64, 32\] but the metadata's sizes make "
                                            r"model.layers.0.mlp.down_proj.weight \[64, 96\]"):
        load_gguf_lazy(path)


def test_a_type_gguf_cannot_dequantize_is_refused(tmp_path):
    path = tmp_path / "q8_1.gguf"
    block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    raw = np.zeros((96, 64 // block * size), np.uint8)  # gate_proj: 96 rows of 64 values
    write_gguf(path, "llama", override={"blk.0.ffn_gate.weight": (raw, Q.Q8_1)})
    with pytest.raises(FrontendError, match="q8_1.gguf: tensor blk.0.ffn_gate.weight is stored "
                                            "as Q8_1, which the gguf package cannot dequantize; "
                                            "supported types: F32, F16, Q4_0, Q4_1, .*Q8_0, "):
        load_gguf_lazy(path)


# -- the embedded default model ------------------------------------------------------------------

@pytest.mark.slow
@needs_smollm2
def test_smollm2_lazy_equals_eager_bit_for_bit(smollm2):
    """SmolLM2-135M-Instruct Q4_1 (its embedding Q8_0): all 272 weights, the graph, the config
    and the tokenizer. Each import takes ~15 s (metadata and tokenizer parsing, for both): the
    eager one is the session's (tests/conftest.py: load_model, i.e. load_gguf of this path)."""
    path = default_model_path()
    lazy = load_gguf_lazy(path)
    assert lazy.weights.resident_bytes() < 4096 and lazy.config.num_layers == 30
    assert lazy.tokenizer is not None and "<|im_start|>" in (lazy.config.chat_template or "")
    assert gguf_source("smollm2-135m") == path
    assert_same(smollm2.module, lazy)
