"""genai_config.json: what onnxruntime-genai needs to run the artefact's model.onnx as it is.

The canonical decoder graph already has the I/O onnxruntime-genai drives (input_ids, position_ids,
past.%d.key/value -> logits, present.%d.key/value). The standard-ops graph builds its causal and
sliding-window masks from the cache and query lengths and grows the cache by concatenation, so it
takes no attention_mask and past_present_share_buffer is off. The contrib graph also takes
attention_mask (GroupQueryAttention's lengths come from it) and, when every attention is a
GroupQueryAttention, its cache is one max-length buffer that past and present share
(past_present_share_buffer on). onnxruntime-genai reads tokenizer.json and tokenizer_config.json
from the same directory, which is why the artefact keeps the tokenizer files at its top level.
"""

from __future__ import annotations

from typing import Any

from splice.ir.core import Module


def genai_config(module: Module, io: dict[str, Any], model_file: str, *,
                 threads: int | None = None, spinning: bool = True,
                 provider: str | None = None) -> dict[str, Any]:
    """The config for `module`'s decoder in `model_file`; `threads` and `spinning` (the
    manifest's session settings) go into the session options so both runtimes start from the
    same ones."""
    cfg = module.config
    inputs = {"input_ids": io["input_ids"], "position_ids": io["position_ids"],
              "past_key_names": "past.%d.key", "past_value_names": "past.%d.value"}
    if io.get("attention_mask"):
        inputs["attention_mask"] = io["attention_mask"]
    # no provider: genai's CPU default; "cuda": its CUDA provider, which keeps the cache on the
    # device and binds it in place between steps
    session: dict[str, Any] = {"log_id": "onnxruntime-genai",
                               "provider_options": [{provider: {}}] if provider else []}
    if threads is not None:
        session.update(intra_op_num_threads=threads, inter_op_num_threads=1)
    if not spinning:  # genai passes session.* keys on to ONNX Runtime as config entries
        session["session.intra_op.allow_spinning"] = "0"
    eos = list(cfg.eos_token_ids)
    first = io["past"][0] if io["past"] else {"kv_heads": cfg.num_kv_heads,
                                              "head_dim": cfg.head_dim}
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else 0)
    return {
        "model": {
            "type": "llama",  # the generic decoder-only pipeline; nothing llama-specific is used
            "bos_token_id": cfg.bos_token_id if cfg.bos_token_id is not None else pad,
            "eos_token_id": eos if len(eos) != 1 else eos[0],
            "pad_token_id": pad,
            "context_length": cfg.max_position,
            "vocab_size": cfg.vocab_size,
            "decoder": {
                "session_options": session,
                "filename": model_file,
                "head_size": first["head_dim"],
                "hidden_size": cfg.hidden_size,
                "num_attention_heads": cfg.num_heads,
                "num_key_value_heads": first["kv_heads"],
                "num_hidden_layers": io["num_layers"],
                "inputs": inputs,
                "outputs": {"logits": io["logits"], "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {
            "do_sample": False, "max_length": cfg.max_position, "min_length": 0, "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": bool(io.get("share_buffer")),
            "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
            "early_stopping": True, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
            "diversity_penalty": 0.0,
        },
    }
