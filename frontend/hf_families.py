"""Hugging Face model families -> `DecoderSpec` + canonical weights.

Each supported family differs from LLaMA in a handful of conventions; `FAMILIES` records them as
data and `convert` reads every number it can from the instantiated model rather than from the
config, because the modules are what the model computes with: the attention `scaling`, the head
dim, the embedding's `embed_scale` buffer (already rounded to the weight dtype, as HF multiplies by
it), the rotary module's frequencies and its `attention_scaling`. The config supplies only what the
modules do not carry (layer types, sliding window, final soft-capping, token ids).

Every parameter of the text model must be consumed by the mapping; one that is not means a feature
this converter does not know, and it refuses rather than silently dropping a weight.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from splice.errors import FrontendError
from .decoder import DecoderSpec

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Family:
    """How one model_type departs from LLaMA.

    `sliding`: "none" (never windowed), "all" (config.sliding_window applies to every layer, as in
    Mistral and Phi-3) or "layer_types" (config.layer_types picks the windowed layers)."""

    norm_offset: float = 0.0
    qk_norm: bool = False
    post_norms: bool = False
    fused: bool = False
    sliding: str = "none"


FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(sliding="all"),
    "qwen2": Family(sliding="layer_types"),
    "qwen3": Family(qk_norm=True, sliding="layer_types"),
    "gemma2": Family(norm_offset=1.0, post_norms=True, sliding="layer_types"),
    "gemma3": Family(norm_offset=1.0, qk_norm=True, post_norms=True, sliding="layer_types"),
    "gemma3_text": Family(norm_offset=1.0, qk_norm=True, post_norms=True, sliding="layer_types"),
    "phi3": Family(fused=True, sliding="all"),
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(FAMILIES)

# Activation names as transformers' ACT2FN spells them. gelu_new is the tanh approximation written
# out by hand; it is the same function as torch's gelu(approximate="tanh") up to rounding.
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh", "gelu": "gelu"}
_LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}
# Rope types whose frequencies change with the sequence length: a fixed inv_freq cannot express
# them, so the converted graph would silently differ from the model beyond some length.
_DYNAMIC_ROPE = ("dynamic", "longrope")


def text_parts(model) -> tuple[str, object, torch.nn.Module, torch.nn.Module]:
    """(model_type, text config, decoder stack, lm_head) of a causal LM, looking through Gemma 3's
    multimodal wrapper to its language model (the vision tower is not imported)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise FrontendError(f"unsupported architecture {model_type!r} ({type(model).__name__}); "
                            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    core = getattr(model, "model", None)
    lm_head = getattr(model, "lm_head", None)
    if model_type == "gemma3" and core is not None and hasattr(core, "language_model"):
        logger.info("Gemma 3 multimodal model: importing the language model only")
        config, core = config.text_config, core.language_model
    if core is None or lm_head is None or not hasattr(core, "layers"):
        raise FrontendError(f"{type(model).__name__} is not a *ForCausalLM model (it has no "
                            ".model.layers and .lm_head); give AutoModelForCausalLM's model")
    return model_type, config, core, lm_head


class _Weights:
    """Collects canonical weights as float32 copies and remembers which parameters were used."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.used: set[int] = set()

    def take(self, name: str, param: torch.Tensor) -> None:
        self.used.add(id(param))
        self.put(name, param)

    def put(self, name: str, tensor: torch.Tensor) -> None:
        # detach + float32 + clone: the Module must own its tensors, never views into the HF model
        self.tensors[name] = tensor.detach().to(torch.float32).clone()

    def unused(self, *modules: torch.nn.Module) -> list[str]:
        return [f"{prefix}{n}" for prefix, m in zip(("model.", "lm_head."), modules)
                for n, p in m.named_parameters() if id(p) not in self.used]


def _bias(linear: torch.nn.Module | None) -> torch.Tensor | None:
    return None if linear is None else getattr(linear, "bias", None)


def _rope(core: torch.nn.Module, layer_type: str | None) -> tuple[torch.Tensor, float, str]:
    """(inv_freq, attention_scaling, rope_type) of the model's own rotary module, for one layer type
    (Gemma 3 keeps a set per type) or the only set."""
    rotary = getattr(core, "rotary_emb", None)
    if rotary is None:
        raise FrontendError(f"{type(core).__name__} has no rotary_emb module; cannot read its RoPE")
    rope_type = rotary.rope_type if layer_type is None else rotary.rope_type[layer_type]
    if any(d in rope_type for d in _DYNAMIC_ROPE):
        raise FrontendError(f"RoPE type {rope_type!r} recomputes its frequencies from the sequence "
                            "length, which a fixed graph cannot express; supported: default, "
                            "linear, llama3, yarn and other types with fixed frequencies")
    prefix = "" if layer_type is None else f"{layer_type}_"
    inv = getattr(rotary, prefix + "inv_freq")
    scaling = float(getattr(rotary, prefix + "attention_scaling"))
    if inv.dtype != torch.float32:
        # the model was cast after construction (model.half() casts buffers too): recompute the
        # frequencies with the module's own initialiser rather than import rounded ones
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        init = (type(rotary).compute_default_rope_parameters if rope_type == "default"
                else ROPE_INIT_FUNCTIONS[rope_type])
        kwargs = {} if layer_type is None else {"layer_type": layer_type}
        inv, scaling = init(rotary.config, **kwargs)
    return inv.detach().to(torch.float32).clone(), scaling, rope_type


def _activation(config, model_type: str) -> str:
    name = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if name not in _ACTIVATIONS:
        raise FrontendError(f"{model_type}: activation {name!r} is not supported; supported: "
                            f"{', '.join(sorted(_ACTIVATIONS))}")
    return _ACTIVATIONS[name]


def _layer_types(config, family: Family, num_layers: int, model_type: str) -> tuple[str, ...]:
    if family.sliding != "layer_types":
        return ()
    types = getattr(config, "layer_types", None) or ["full_attention"] * num_layers
    bad = sorted({t for t in types if t not in _LAYER_TYPES})
    if bad:
        raise FrontendError(f"{model_type}: layer types {bad} are not supported; supported: "
                            f"{', '.join(_LAYER_TYPES)}")
    return tuple(_LAYER_TYPES[t] for t in types[:num_layers])


def _token_ids(model, config) -> tuple[int | None, tuple[int, ...], int | None]:
    """bos, eos (a tuple: HF allows an int or a list; generation_config may add more) and pad."""
    eos: list[int] = []
    sources = [config, getattr(model, "config", None), getattr(model, "generation_config", None)]
    for src in sources:
        value = getattr(src, "eos_token_id", None)
        for t in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(t, int) and t not in eos:
                eos.append(t)
    bos = getattr(config, "bos_token_id", None)
    pad = getattr(config, "pad_token_id", None)
    return (bos if isinstance(bos, int) else None, tuple(eos),
            pad if isinstance(pad, int) else None)


def _same(values: list, what: str, model_type: str):
    if len(set(values)) > 1:
        raise FrontendError(f"{model_type}: {what} differs between layers ({values}); the "
                            "canonical decoder needs one value")
    return values[0]


def convert(model) -> tuple[DecoderSpec, dict[str, torch.Tensor]]:
    """The DecoderSpec and canonical float32 weights of a transformers causal LM."""
    model_type, config, core, lm_head = text_parts(model)
    family = FAMILIES[model_type]
    if getattr(config, "use_bidirectional_attention", False):
        raise FrontendError(f"{model_type}: use_bidirectional_attention is set; only causal "
                            "decoders are supported")
    num_layers = int(config.num_hidden_layers)
    layers = list(core.layers)[:num_layers]
    attns = [layer.self_attn for layer in layers]
    h, kv = int(config.num_attention_heads), int(config.num_key_value_heads)
    head_dim = int(attns[0].head_dim) if attns else int(getattr(config, "head_dim", 0) or 0)
    W = _Weights()

    embed = core.embed_tokens
    W.take("embed.weight", embed.weight)
    scale = getattr(embed, "embed_scale", None)
    embed_scale = float(scale.to(embed.weight.dtype)) if scale is not None else 1.0
    W.take("final_norm.weight", core.norm.weight)
    tied = lm_head.weight is embed.weight
    if not tied:
        W.take("lm_head.weight", lm_head.weight)
    if _bias(lm_head) is not None:
        raise FrontendError(f"{model_type}: lm_head has a bias, which the canonical decoder lacks")

    # bias flags over all layers first: a bias that some projections lack is filled with zeros
    qkv_bias = any(_bias(getattr(a, n, None)) is not None for a in attns
                   for n in ("q_proj", "k_proj", "v_proj", "qkv_proj"))
    o_bias = any(_bias(a.o_proj) is not None for a in attns)
    mlp_bias = any(_bias(getattr(layer.mlp, n, None)) is not None for layer in layers
                   for n in ("gate_proj", "up_proj", "down_proj", "gate_up_proj"))
    for i, (layer, attn) in enumerate(zip(layers, attns)):
        _convert_layer(W, f"layers.{i}.", layer, attn, family, h, kv, head_dim,
                       qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias)

    layer_types = _layer_types(config, family, num_layers, model_type)
    sliding_window = int(getattr(config, "sliding_window", None) or 0) \
        if family.sliding != "none" else 0
    rope_scale = _convert_rope(W, core, layer_types, model_type)
    inv = W.tensors["rope.inv_freq"]
    rotary_dim = 2 * inv.numel()
    if rotary_dim > head_dim:
        raise FrontendError(f"{model_type}: RoPE rotates {rotary_dim} channels, more than the "
                            f"head dim {head_dim}")

    unused = W.unused(core, lm_head)
    if unused:
        raise FrontendError(f"{model_type}: parameters the converter does not understand: "
                            f"{unused[:8]}{' ...' if len(unused) > 8 else ''}")
    softcaps = [float(getattr(a, "attn_logit_softcapping", None) or 0.0) for a in attns]
    bos, eos, pad = _token_ids(model, config)
    spec = DecoderSpec(
        architecture=model_type, vocab_size=int(config.vocab_size),
        hidden_size=int(config.hidden_size), intermediate_size=int(config.intermediate_size),
        num_layers=num_layers, num_heads=h, num_kv_heads=kv, head_dim=head_dim,
        rms_eps=float(config.rms_norm_eps), max_position=int(config.max_position_embeddings),
        norm_offset=family.norm_offset, qk_norm=family.qk_norm, post_norms=family.post_norms,
        qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias,
        activation=_activation(config, model_type), embed_scale=embed_scale,
        attn_scale=float(_same([float(a.scaling) for a in attns], "attention scaling", model_type))
        if attns else None,
        attn_softcap=_same(softcaps, "attention soft-capping", model_type) if attns else 0.0,
        final_softcap=float(getattr(config, "final_logit_softcapping", None) or 0.0),
        sliding_window=sliding_window, layer_types=layer_types,
        rotary_dim=0 if rotary_dim == head_dim else rotary_dim, rope_scale=rope_scale,
        tie_embeddings=tied, bos_token_id=bos, eos_token_ids=eos, pad_token_id=pad)
    if embed.weight.shape[0] != spec.vocab_size:
        raise FrontendError(f"{model_type}: the embedding has {embed.weight.shape[0]} rows but "
                            f"config.vocab_size is {spec.vocab_size}")
    return spec, W.tensors


def _convert_rope(W: _Weights, core, layer_types: tuple[str, ...], model_type: str) -> float:
    """Store rope.inv_freq (and rope.inv_freq_local for Gemma 3's sliding layers) and return the
    cos/sin scaling, which must be one number for the whole model."""
    rotary = getattr(core, "rotary_emb", None)
    per_type = isinstance(getattr(rotary, "rope_type", None), dict)
    if not per_type:
        inv, scaling, _ = _rope(core, None)
        W.put("rope.inv_freq", inv)
        return scaling
    sets = {t: _rope(core, t) for t in rotary.rope_type}
    full, local = sets.get("full_attention"), sets.get("sliding_attention")
    W.put("rope.inv_freq", (full or local)[0])
    if local is not None and "sliding" in layer_types:
        W.put("rope.inv_freq_local", local[0])
    scalings = sorted({s[1] for s in sets.values()})
    if len(scalings) > 1:
        raise FrontendError(f"{model_type}: the RoPE attention scaling differs between layer types "
                            f"({scalings}); the canonical decoder has one")
    return scalings[0]


def _convert_layer(W: _Weights, p: str, layer, attn, family: Family, h: int, kv: int, hd: int, *,
                   qkv_bias: bool, o_bias: bool, mlp_bias: bool) -> None:
    W.take(p + "attn_norm.weight", layer.input_layernorm.weight)
    if family.post_norms:
        W.take(p + "attn_post_norm.weight", layer.post_attention_layernorm.weight)
        W.take(p + "mlp_norm.weight", layer.pre_feedforward_layernorm.weight)
        W.take(p + "mlp_post_norm.weight", layer.post_feedforward_layernorm.weight)
    else:
        W.take(p + "mlp_norm.weight", layer.post_attention_layernorm.weight)

    def linear(name: str, module, bias: bool, rows: slice | None = None) -> None:
        W.used.add(id(module.weight))
        W.put(p + name + ".weight", module.weight if rows is None else module.weight[rows])
        if bias:
            b = module.bias
            if b is None:
                b = torch.zeros(module.weight.shape[0])
            else:
                W.used.add(id(b))
            W.put(p + name + ".bias", b if rows is None else b[rows])

    if family.fused:
        # Phi-3: one qkv_proj whose rows are [q; k; v], one gate_up_proj whose rows are [gate; up]
        q_end, k_end = h * hd, h * hd + kv * hd
        if attn.qkv_proj.weight.shape[0] != k_end + kv * hd:
            raise FrontendError(f"phi3: qkv_proj has {attn.qkv_proj.weight.shape[0]} rows, "
                                f"expected ({h} + 2 * {kv}) heads * {hd} = {k_end + kv * hd}")
        for name, rows in (("q_proj", slice(0, q_end)), ("k_proj", slice(q_end, k_end)),
                           ("v_proj", slice(k_end, k_end + kv * hd))):
            linear("attn." + name, attn.qkv_proj, qkv_bias, rows)
        half = layer.mlp.gate_up_proj.weight.shape[0] // 2
        linear("mlp.gate_proj", layer.mlp.gate_up_proj, mlp_bias, slice(0, half))
        linear("mlp.up_proj", layer.mlp.gate_up_proj, mlp_bias, slice(half, 2 * half))
    else:
        for name in ("q_proj", "k_proj", "v_proj"):
            linear("attn." + name, getattr(attn, name), qkv_bias)
        linear("mlp.gate_proj", layer.mlp.gate_proj, mlp_bias)
        linear("mlp.up_proj", layer.mlp.up_proj, mlp_bias)
    linear("attn.o_proj", attn.o_proj, o_bias)
    linear("mlp.down_proj", layer.mlp.down_proj, mlp_bias)
    if family.qk_norm:
        W.take(p + "attn.q_norm.weight", attn.q_norm.weight)
        W.take(p + "attn.k_norm.weight", attn.k_norm.weight)
