"""The tokenizer as GGUF metadata (the `tokenizer.ggml.*` keys llama.cpp reads).

Three sources, in this order:
- the model's own GGUF file (a model imported from a .gguf, such as the embedded SmolLM2-135M):
  every `tokenizer.*` key is copied as it is, pre-tokenizer and chat template included, when its
  vocabulary has the model's size;
- a llama2.c tok*.bin: a SentencePiece vocabulary (`tokenizer.ggml.model` "llama"): the pieces
  with llama2.c's spaces turned back into SentencePiece's "▁", their scores, <unk>/<s>/</s> and
  the 256 "<0xNN>" byte-fallback pieces typed as llama.cpp expects (as llama.cpp's
  convert-llama2c-to-ggml does); llama.cpp's SentencePiece tokenizer then encodes as llama2.c's
  run.c does (dummy-prefix space, highest-score merges, byte fallback);
- a byte-level BPE tokenizer.json (GPT-2 style, `tokenizer.ggml.model` "gpt2"): tokens by id,
  merges, added tokens typed CONTROL, pre-tokenizer "default" (llama.cpp's GPT-2 regex).
Anything else is refused, saying what is accepted. splice's own runtime keeps using the
tokenizer files the artefact also carries; this metadata is for llama.cpp and its users.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from pathlib import Path
from typing import Any

from splice.errors import InputError
from splice.ir.core import Module

log = logging.getLogger(__name__)

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6


def tokenizer_metadata(module: Module) -> tuple[dict[str, Any], str]:
    """(key -> (value, GGUFValueType, sub type)) for the writer, and where it came from."""
    source = module.config.source
    if source and source.lower().endswith(".gguf") and Path(source).is_file():
        keys = _from_gguf(Path(source), module.config.vocab_size)
        if keys is not None:
            return keys, "source gguf"
    tok = module.tokenizer
    if tok is None:
        raise InputError("the gguf backend needs the model's tokenizer for llama.cpp; this "
                         "module carries none (import it from a checkpoint with its tokenizer)")
    if tok.kind == "llama2c":
        return _from_llama2c(tok.files["tokenizer.bin"], module), "llama2c tokenizer.bin"
    if tok.kind == "hf" and "tokenizer.json" in tok.files:
        return _from_tokenizer_json(tok.files, module), "tokenizer.json"
    raise InputError(f"the gguf backend cannot write a {tok.kind!r} tokenizer with files "
                     f"{sorted(tok.files)}; accepted: a source .gguf, a llama2.c tokenizer.bin, "
                     "or a byte-level BPE tokenizer.json")


def _vt():
    from gguf import GGUFValueType

    return GGUFValueType


def _from_gguf(path: Path, vocab: int) -> dict[str, Any] | None:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    t = _vt()
    out = {}
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = t(field.types[0])
        sub = t(field.types[-1]) if vtype == t.ARRAY else None
        out[name] = (field.contents(), vtype, sub)
    tokens = out.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens[0]) != vocab:
        log.info("%s: its tokenizer does not have the model's %d tokens; not copied", path, vocab)
        return None
    return out


def _from_llama2c(data: bytes, module: Module) -> dict[str, Any]:
    t = _vt()
    data = bytes(data)
    pos = 4
    tokens, scores, types = [], [], []
    while pos < len(data):
        score, length = struct.unpack_from("<fi", data, pos)
        pos += 8
        piece = data[pos:pos + length].decode("utf-8", errors="replace")
        pos += length
        i = len(tokens)
        if i == 0:
            piece, kind = "<unk>", UNKNOWN
        elif i in (1, 2):
            piece, kind = ("<s>", "</s>")[i - 1], CONTROL
        elif _BYTE_PIECE.fullmatch(piece):
            kind = BYTE
        else:
            piece, kind = piece.replace(" ", "\u2581"), NORMAL
        tokens.append(piece)
        scores.append(float(score))
        types.append(kind)
    if len(tokens) != module.config.vocab_size:
        raise InputError(f"llama2.c tokenizer: {len(tokens)} tokens for a model of "
                         f"{module.config.vocab_size}")
    return {
        "tokenizer.ggml.model": ("llama", t.STRING, None),
        "tokenizer.ggml.tokens": (tokens, t.ARRAY, t.STRING),
        "tokenizer.ggml.scores": (scores, t.ARRAY, t.FLOAT32),
        "tokenizer.ggml.token_type": (types, t.ARRAY, t.INT32),
        "tokenizer.ggml.bos_token_id": (1, t.UINT32, None),
        "tokenizer.ggml.eos_token_id": (2, t.UINT32, None),
        "tokenizer.ggml.unknown_token_id": (0, t.UINT32, None),
        "tokenizer.ggml.add_bos_token": (True, t.BOOL, None),
        "tokenizer.ggml.add_eos_token": (False, t.BOOL, None),
    }


def _from_tokenizer_json(files: dict[str, bytes], module: Module) -> dict[str, Any]:
    t = _vt()
    spec = json.loads(bytes(files["tokenizer.json"]).decode("utf-8"))
    model = spec.get("model") or {}
    pre = json.dumps(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or "ByteLevel" not in pre:
        raise InputError("the gguf backend writes byte-level BPE tokenizer.json files (GPT-2 "
                         f"style); this one is {model.get('type')!r} with pre-tokenizer {pre:.60}")
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    special = set()
    for added in spec.get("added_tokens") or ():
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special.add(added["id"])
    n = module.config.vocab_size
    if max(vocab.values(), default=-1) >= n:
        raise InputError(f"tokenizer.json has ids up to {max(vocab.values())} for a model of "
                         f"{n} tokens")
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [5] * n  # UNUSED for ids the file leaves out
    for piece, i in vocab.items():
        tokens[i] = piece
        types[i] = CONTROL if i in special else NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or ()]
    if not merges:
        # llama.cpp refuses a BPE vocabulary without the merges key, and the gguf writer an
        # empty array: one merge of two special tokens, which text never holds, changes nothing
        pair = sorted(special)[:2] if len(special) >= 2 else [0, 1]
        merges = [f"{tokens[pair[0]]} {tokens[pair[1]]}"]
    cfg = json.loads(bytes(files.get("tokenizer_config.json", b"{}")).decode("utf-8") or "{}")
    out = {
        "tokenizer.ggml.model": ("gpt2", t.STRING, None),
        "tokenizer.ggml.pre": ("default", t.STRING, None),
        "tokenizer.ggml.tokens": (tokens, t.ARRAY, t.STRING),
        "tokenizer.ggml.token_type": (types, t.ARRAY, t.INT32),
        "tokenizer.ggml.merges": (merges, t.ARRAY, t.STRING),
    }
    bos, eos = module.config.bos_token_id, list(module.config.eos_token_ids)
    named = cfg.get("eos_token")
    named = named.get("content") if isinstance(named, dict) else named
    if not eos and isinstance(named, str) and named in vocab:
        eos = [vocab[named]]
    if bos is not None:
        out["tokenizer.ggml.bos_token_id"] = (int(bos), t.UINT32, None)
    if eos:
        out["tokenizer.ggml.eos_token_id"] = (int(eos[0]), t.UINT32, None)
    else:  # llama.cpp then takes a default id and warns that it is not an end-of-generation one
        log.warning("the model names no EOS token; llama.cpp will warn that its default EOS id "
                    "is not an end-of-generation token")
    out["tokenizer.ggml.add_bos_token"] = (bool(cfg.get("add_bos_token", False)), t.BOOL, None)
    if module.config.chat_template:
        out["tokenizer.chat_template"] = (module.config.chat_template, t.STRING, None)
    return out
