"""Tokenizers the runtime carries, behind one small interface, and streaming detokenization.

Kinds: "hf" (a tokenizer.json run by the `tokenizers` library, no transformers) and "llama2c" (a
llama2.c tok*.bin, run by the pure-Python llama2c_tokenizer). Both give
    encode(text, bos=False) -> ids      bos=True adds what the model expects before a prompt
    decode(ids) -> str                  special tokens are not printed
    stream(context) -> decoder          decoder.push(id) -> text that is now final; .flush()
    bos_id, eos_ids
`stream` exists because decoding one token at a time is wrong for both kinds: a character split
over byte tokens is not text until its last byte arrives, and SentencePiece-style pieces print
differently at the start of a text than after other tokens.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from splice.errors import ArtefactError, InputError

KINDS = ("hf", "llama2c")


class HFTokenizer:
    """A tokenizer.json through the `tokenizers` library. `bos=True` applies the file's own
    post-processor (add_special_tokens), which adds BOS exactly where the model's authors did."""

    kind = "hf"

    def __init__(self, tokenizer_json: bytes, config: Mapping | None = None):
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
        except Exception as e:  # the library raises a bare Exception on bad JSON
            raise ArtefactError(f"tokenizer.json cannot be read by the tokenizers library: {e}") \
                from None
        config = dict(config or {})
        self.bos_id = self._special_id(config.get("bos_token"))
        eos = self._special_id(config.get("eos_token"))
        self.eos_ids: tuple[int, ...] = () if eos is None else (eos,)

    def _special_id(self, token) -> int | None:
        if isinstance(token, dict):
            token = token.get("content")
        return self._tok.token_to_id(token) if isinstance(token, str) else None

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return self._tok.encode(checked_text(text), add_special_tokens=bos).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def stream(self, context: Sequence[int] = ()) -> HFStreamDecoder:
        return HFStreamDecoder(self, context)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)


class HFStreamDecoder:
    """Incremental detokenization by re-decoding a short window (as text-generation-inference
    does): the text of ids[prefix:] minus the text of ids[prefix:read] is what the new ids add,
    once it does not end in an unfinished character (U+FFFD). The last few prompt ids seed the
    window so the first generated piece keeps its leading space."""

    __slots__ = ("_tok", "_ids", "_prefix", "_read")

    def __init__(self, tok: HFTokenizer, context: Sequence[int]):
        self._tok = tok
        self._ids = [int(i) for i in context[-6:]]
        self._prefix = 0
        self._read = len(self._ids)

    def push(self, token: int) -> str:
        self._ids.append(int(token))
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        before = self._tok.decode(self._ids[self._prefix:self._read])
        text = self._tok.decode(self._ids[self._prefix:])
        if len(text) > len(before) and (final or not text.endswith("\ufffd")):
            piece = text[len(before):]
            self._prefix, self._read = self._read, len(self._ids)
            return piece
        return ""


class Llama2cTokenizerAdapter:
    """The llama2.c tokenizer behind the common interface; BOS is 1 and EOS is 2."""

    kind = "llama2c"

    def __init__(self, data: bytes):
        from .llama2c_tokenizer import Llama2cTokenizer

        self._tok = Llama2cTokenizer.from_bytes(data)
        self.bos_id = self._tok.bos_id
        self.eos_ids = (self._tok.eos_id,)

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return self._tok.encode(checked_text(text), bos=bos)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids)

    def stream(self, context: Sequence[int] = ()):
        return self._tok.stream(int(context[-1]) if len(context) else None)

    @property
    def vocab_size(self) -> int:
        return self._tok.vocab_size


def checked_text(text) -> str:
    """`text` if it is a str that encodes as UTF-8; InputError otherwise (a lone surrogate, as
    Python makes of undecodable command-line bytes, would fail deep inside the tokenizer)."""
    if not isinstance(text, str):
        raise InputError(f"text to encode must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"the text is not valid Unicode ({e.reason} at character {e.start}); "
                         "give text that encodes as UTF-8") from None
    return text


def load_tokenizer(kind: str, files: Mapping[str, bytes]):
    """The tokenizer of `kind` from its files (name -> bytes, as a Module or artefact carries)."""
    if kind == "hf":
        if "tokenizer.json" not in files:
            raise ArtefactError(f"hf tokenizer: no tokenizer.json among {sorted(files)}")
        config = None
        if "tokenizer_config.json" in files:
            try:
                config = json.loads(files["tokenizer_config.json"])
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ArtefactError(f"tokenizer_config.json is not JSON ({e})") from None
        return HFTokenizer(files["tokenizer.json"], config)
    if kind == "llama2c":
        bins = [name for name in files if name.endswith(".bin")]
        if len(bins) != 1:
            raise ArtefactError(f"llama2c tokenizer: expected one .bin file, got {sorted(files)}")
        return Llama2cTokenizerAdapter(files[bins[0]])
    raise ArtefactError(f"tokenizer kind {kind!r} is unknown; accepted: {', '.join(KINDS)}")
