"""The Hugging Face frontend against transformers itself: tiny random-weight models of every
supported family, their logits through the reference interpreter (prefill, and prefill + decode
with the KV cache) equal to the HF model's; save/load through real directories and GGUF files; and
every kind of bad input refused with a FrontendError naming what was wrong."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers as T

from splice.errors import FrontendError
from splice.frontend.hf import (SUPPORTED_ARCHITECTURES, default_model_path, from_transformers,
                                load_gguf, load_hf)
from splice.ir import past_from_present, run_logits, verify
from tests.paths import needs_smollm2

TOL = 1e-4
COMMON = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, attn_implementation="eager")
WINDOW = 5  # smaller than the 12-token test sequence, so the window changes the result

# One tiny config per family, each exercising what that family adds to LLaMA.
CONFIGS = {
    # biases everywhere, llama3 rope scaling, tied embeddings
    "llama": lambda: T.LlamaConfig(
        vocab_size=160, num_hidden_layers=2, attention_bias=True, mlp_bias=True,
        tie_word_embeddings=True, eos_token_id=[2, 5], **COMMON,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16}),
    # sliding window on every layer, explicit head_dim with heads * head_dim != hidden, untied
    "mistral": lambda: T.MistralConfig(
        vocab_size=128, num_hidden_layers=2, head_dim=24, sliding_window=WINDOW,
        tie_word_embeddings=False, **COMMON),
    # qkv bias, sliding layers from max_window_layers, yarn rope (attention_scaling != 1), tied
    "qwen2": lambda: T.Qwen2Config(
        vocab_size=200, num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW,
        max_window_layers=1, tie_word_embeddings=True, **COMMON,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 32}),
    # per-head q/k norms, head_dim 32, linear rope scaling, untied
    "qwen3": lambda: T.Qwen3Config(
        vocab_size=256, num_hidden_layers=2, head_dim=32, tie_word_embeddings=False, **COMMON,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    # sandwich norms, (1 + w), embed scale, query_pre_attn_scalar, both soft-caps, sliding layers
    "gemma2": lambda: T.Gemma2Config(
        vocab_size=192, num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=20,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        tie_word_embeddings=True, **COMMON),
    # gemma2 + (1 + w) q/k norms, a local rope base for the sliding layers, untied
    "gemma3_text": lambda: T.Gemma3TextConfig(
        vocab_size=176, num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        tie_word_embeddings=False, **COMMON,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    # fused qkv and gate_up projections, partial rotary, window on every layer
    "phi3": lambda: T.Phi3Config(
        vocab_size=144, num_hidden_layers=2, sliding_window=WINDOW, pad_token_id=0,
        tie_word_embeddings=False, **COMMON,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.5}),
}


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random: HF initialises norms to ones/zeros, which would hide a norm that
    is skipped, misplaced or offset wrongly. Norm weights stay near their neutral value."""
    torch.manual_seed(seed)
    offset_free = "gemma" not in model.config.model_type
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.1)
            if "norm" in name and offset_free:
                p.add_(1.0)
    return model.eval()


def tiny(family: str) -> torch.nn.Module:
    config = CONFIGS[family]()
    return randomise(T.AutoModelForCausalLM.from_config(config))


def ids_for(model, n: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.get_text_config().vocab_size, (1, n), generator=g)


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def decode_logits(module, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits for `ids` from a prefill of `prefill` tokens and then one token at a time."""
    out = run_logits(module, ids[:, :prefill], torch.float32)
    logits = [out["logits"]]
    for t in range(prefill, ids.shape[1]):
        out = run_logits(module, ids[:, t:t + 1], torch.float32, past=past_from_present(out))
        logits.append(out["logits"])
    return torch.cat(logits, dim=1)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def family(request):
    """(name, HF model, its module, ids, HF logits), built once per family."""
    model = tiny(request.param)
    module = from_transformers(model, source=f"tiny-{request.param}")
    ids = ids_for(model)
    return request.param, model, module, ids, hf_logits(model, ids)


def test_every_supported_family_is_tested():
    assert set(CONFIGS) | {"gemma3"} == set(SUPPORTED_ARCHITECTURES)


def test_prefill_logits_match_transformers(family):
    name, model, module, ids, ref = family
    verify(module)
    diff = max_diff(run_logits(module, ids, torch.float32)["logits"], ref)
    logging.getLogger(__name__).info("%s prefill max |diff| = %.3g", name, diff)
    assert diff <= TOL, f"{name}: {diff}"


def test_prefill_then_decode_with_kv_cache_matches_full_sequence(family):
    name, model, module, ids, ref = family
    diff = max_diff(decode_logits(module, ids, prefill=8), ref)
    assert diff <= TOL, f"{name}: {diff}"


def test_sliding_window_and_soft_caps_reach_the_graph(family):
    """The features each config was built to exercise are present, so the logit checks above
    really cover them (a window the graph ignored would fail them, but only if it is there)."""
    name, model, module, ids, ref = family
    attns = module.graph.find(op="attention")
    windows = [n.attrs["sliding_window"] for n in attns]
    expected = {"llama": [0, 0], "qwen3": [0, 0], "mistral": [WINDOW] * 2, "phi3": [WINDOW] * 2,
                "qwen2": [0, WINDOW, WINDOW], "gemma2": [WINDOW, 0, WINDOW],
                "gemma3_text": [WINDOW, WINDOW, 0]}[name]
    assert windows == expected
    if name == "gemma2":
        assert {n.attrs["softcap"] for n in attns} == {2.0}
        assert module.graph.find(op="softcap")
    if name == "gemma3_text":
        local = {n.inputs[2].name for n in module.graph.find(op="rotary")}
        assert local == {"rope.inv_freq", "rope.inv_freq_local"}


def test_weights_are_float32_copies_not_views(family):
    name, model, module, ids, ref = family
    core = model.model
    assert all(t.dtype == torch.float32 for t in module.weights.values())
    embed = module.weights["embed.weight"]
    assert embed.data_ptr() != core.embed_tokens.weight.data_ptr()
    tied = model.lm_head.weight is core.embed_tokens.weight
    assert ("lm_head.weight" in module.weights) != tied


def test_model_config_fields(family):
    name, model, module, ids, ref = family
    cfg, hf = module.config, model.config
    assert cfg.architecture == hf.model_type
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers) == (
        hf.vocab_size, hf.hidden_size, hf.num_hidden_layers)
    assert cfg.max_position == hf.max_position_embeddings
    assert cfg.bos_token_id == hf.bos_token_id and cfg.pad_token_id == hf.pad_token_id
    eos = hf.eos_token_id if isinstance(hf.eos_token_id, list) else [hf.eos_token_id]
    assert list(cfg.eos_token_ids) == [t for t in eos if t is not None]
    assert cfg.source == f"tiny-{name}"


def test_save_pretrained_directory_round_trip(family, tmp_path):
    name, model, module, ids, ref = family
    model.save_pretrained(tmp_path)
    loaded = load_hf(tmp_path)
    verify(loaded)
    assert loaded.tokenizer is None  # the directory has no tokenizer files
    assert max_diff(run_logits(loaded, ids, torch.float32)["logits"], ref) <= TOL
    assert sorted(loaded.weights) == sorted(module.weights)


def test_edits_to_the_hf_model_do_not_reach_the_module():
    model = tiny("llama")
    module = from_transformers(model)
    before = module.weights["layers.0.attn.q_proj.weight"].clone()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.add_(1.0)
    assert torch.equal(module.weights["layers.0.attn.q_proj.weight"], before)


def test_half_precision_model_gives_float32_weights_and_unrounded_rope():
    """model.to(bfloat16) casts the rotary buffers too; the frontend recomputes them."""
    model = tiny("gemma3_text")
    full = from_transformers(model)
    half = from_transformers(model.to(torch.bfloat16))
    assert all(t.dtype == torch.float32 for t in half.weights.values())
    for name in ("rope.inv_freq", "rope.inv_freq_local"):
        assert torch.equal(half.weights[name], full.weights[name])
    assert torch.equal(half.weights["embed.weight"], full.weights["embed.weight"].bfloat16().float())


def test_gemma3_multimodal_wrapper_imports_its_language_model():
    vision = T.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, image_size=28, patch_size=14)
    text = CONFIGS["gemma3_text"]().to_dict()
    config = T.Gemma3Config(text_config=text, vision_config=vision.to_dict(),
                            mm_tokens_per_image=4, image_token_index=170, boi_token_index=171,
                            eoi_token_index=172)
    config._attn_implementation = "eager"
    model = randomise(T.Gemma3ForConditionalGeneration(config))
    module = from_transformers(model)
    verify(module)
    assert module.config.architecture == "gemma3" and module.config.num_layers == 3
    ids = ids_for(model, seed=3) % 160
    assert max_diff(run_logits(module, ids, torch.float32)["logits"], hf_logits(model, ids)) <= TOL


def test_tokenizer_and_chat_template_are_carried(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "hello", "world"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok = T.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                    unk_token="<unk>")
    tok.chat_template = template
    model = tiny("llama")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    for module in (load_hf(tmp_path), from_transformers(model, tok)):
        assert module.tokenizer is not None and module.tokenizer.kind == "hf"
        carried = Tokenizer.from_str(module.tokenizer.files["tokenizer.json"].decode())
        assert carried.encode("hello world").ids == [3, 4]
        assert "tokenizer_config.json" in module.tokenizer.files
        assert module.config.chat_template == template


# -- bad input ----------------------------------------------------------------------------------

def _write_config(folder, **fields):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(fields))
    return folder


def test_missing_path_is_refused(tmp_path):
    with pytest.raises(FrontendError, match="does not exist"):
        load_hf(tmp_path / "nope")
    with pytest.raises(FrontendError, match="does not exist"):
        load_gguf(tmp_path / "nope.gguf")


def test_directory_that_is_not_a_model_is_refused(tmp_path):
    with pytest.raises(FrontendError, match="no config.json"):
        load_hf(tmp_path)


@pytest.mark.parametrize("keep", [0, 5, 200, -100])
def test_empty_or_truncated_safetensors_is_refused(tmp_path, keep):
    model = tiny("qwen3")
    model.save_pretrained(tmp_path)
    st = tmp_path / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(FrontendError, match="model.safetensors") as err:
        load_hf(tmp_path)
    assert "empty" in str(err.value) or "truncated" in str(err.value)


def test_checkpoint_missing_a_weight_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny("gemma2").save_pretrained(tmp_path)
    st = tmp_path / "model.safetensors"
    tensors = load_file(st)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, st, metadata={"format": "pt"})
    with pytest.raises(FrontendError, match="lacks weights .'model.layers.1.mlp.up_proj.weight'."):
        load_hf(tmp_path)


def test_pickle_only_checkpoint_is_refused(tmp_path):
    _write_config(tmp_path, **CONFIGS["llama"]().to_dict())
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(FrontendError, match="no \\*.safetensors.*unpickling"):
        load_hf(tmp_path)


def test_unknown_model_type_is_refused(tmp_path):
    _write_config(tmp_path, model_type="frobnicator", hidden_size=64)
    with pytest.raises(FrontendError, match="'frobnicator'.*supported: llama, mistral"):
        load_hf(tmp_path)
    gpt2 = T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(FrontendError, match="unsupported architecture 'gpt2'"):
        from_transformers(gpt2)


def test_heads_not_dividing_hidden_is_refused(tmp_path):
    cfg = CONFIGS["llama"]().to_dict()
    cfg.update(num_attention_heads=5, num_key_value_heads=5)
    cfg.pop("head_dim", None)
    _write_config(tmp_path, **cfg)
    with pytest.raises(FrontendError, match="num_attention_heads 5 does not divide hidden_size 64"):
        load_hf(tmp_path)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("change,match", [
    (dict(vocab_size=0), "vocab_size = 0"),
    (dict(num_hidden_layers=0), "num_layers = 0"),
])
def test_impossible_sizes_are_refused(change, match):
    config = T.LlamaConfig(**{**dict(vocab_size=64, num_hidden_layers=1), **COMMON, **change})
    model = T.LlamaForCausalLM(config)
    with pytest.raises(FrontendError, match=match):
        from_transformers(model)


def test_impossible_sizes_in_config_json_are_refused(tmp_path):
    cfg = CONFIGS["llama"]().to_dict()
    cfg["vocab_size"] = 0
    _write_config(tmp_path, **cfg)
    with pytest.raises(FrontendError, match="vocab_size = 0"):
        load_hf(tmp_path)


def test_a_parameter_the_converter_does_not_map_is_refused_not_dropped():
    model = tiny("llama")
    model.model.layers[1].self_attn.register_parameter("gate", torch.nn.Parameter(torch.ones(4)))
    with pytest.raises(FrontendError, match="does not understand.*layers.1.self_attn.gate"):
        from_transformers(model)
    with pytest.raises(FrontendError, match="not a \\*ForCausalLM"):
        from_transformers(model.model)


def test_rope_depending_on_sequence_length_is_refused():
    config = T.LlamaConfig(vocab_size=64, num_hidden_layers=1, **COMMON,
                           rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0,
                                            "factor": 2.0})
    with pytest.raises(FrontendError, match="'dynamic'.*sequence"):
        from_transformers(T.LlamaForCausalLM(config))


def write_gguf(model, path) -> None:
    """A float32 GGUF of a LLaMA model as llama.cpp lays it out: its own tensor names and q/k
    rows permuted to interleaved RoPE pairs (which transformers' reader undoes)."""
    import gguf
    import numpy as np

    cfg = model.config
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}

    def permute(w, heads):
        pairs = w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1])
        return pairs.swapaxes(1, 2).reshape(w.shape)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg in ("attn_q", "attn_k"):
                heads = cfg.num_attention_heads if gg == "attn_q" else cfg.num_key_value_heads
                t = permute(t, heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_file_round_trip(tmp_path):
    model = randomise(T.LlamaForCausalLM(T.LlamaConfig(
        vocab_size=160, num_hidden_layers=2, tie_word_embeddings=True, **COMMON)))
    path = tmp_path / "tiny.gguf"
    write_gguf(model, path)
    module = load_gguf(path)
    verify(module)
    assert module.tokenizer is None  # no tokenizer.ggml.* metadata in this file
    assert module.config.source == str(path) and "lm_head.weight" not in module.weights
    ids = ids_for(model)
    ref = hf_logits(model, ids)
    assert max_diff(run_logits(module, ids, torch.float32)["logits"], ref) <= TOL
    assert max_diff(decode_logits(module, ids, prefill=8), ref) <= TOL
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(FrontendError, match="cut.gguf is a truncated or corrupt GGUF file"):
        load_gguf(truncated)


def test_bad_gguf_files_are_refused(tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(FrontendError, match="empty"):
        load_gguf(empty)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(FrontendError, match="not a GGUF file"):
        load_gguf(other)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 8)
    with pytest.raises(FrontendError, match="truncated.gguf"):
        load_gguf(truncated)


# -- the embedded default model -----------------------------------------------------------------

@needs_smollm2
def test_default_model_path_points_at_the_gguf():
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


@pytest.mark.slow
@needs_smollm2
def test_smollm2_gguf_matches_transformers(smollm2):
    """load_gguf's graph against transformers' own load of the same file. Dequantizing takes
    ~15 s, so the module is the session's import (tests/conftest.py: load_model("smollm2-135m"),
    i.e. load_gguf of the default path) and the reference the very model that import had
    transformers build (kept by wrapping the real loader, which still runs), not a second load."""
    module, loaded = smollm2.module, smollm2.built
    verify(module)
    assert module.config.architecture == "llama" and module.config.num_layers == 30
    assert module.config.eos_token_ids == (2,) and module.config.max_position == 8192
    assert module.tokenizer is not None and "<|im_start|>" in (module.config.chat_template or "")
    (model,) = loaded
    assert isinstance(model, T.LlamaForCausalLM) and model.config.quantization_config
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345, 28, 260]])
    assert max_diff(run_logits(module, ids, torch.float32)["logits"], hf_logits(model, ids)) <= TOL
