"""The tokenizer of llama2.c checkpoints (tok*.bin), in pure Python: no torch, no transformers.

The file is what llama2.c's tokenizer.py writes from a SentencePiece model: an int32
max_token_length, then for each token a float32 merge score, an int32 byte length and the UTF-8
bytes of the piece (SentencePiece's "▁" already replaced by a space; BOS and EOS stored as
"\\n<s>\\n" and "\\n</s>\\n"; byte-fallback tokens as the text "<0xNN>" at ids 3..258). The file
does not record the vocabulary size: every entry up to the end of the file is a token.

`encode` reproduces run.c's `encode` token for token, because the model was evaluated with it and a
prompt encoded differently is a different prompt:
  1. BOS (if asked), then the id of " " as a dummy prefix when the text is not empty;
  2. each UTF-8 code point looked up as a piece; a code point that is not a piece becomes one byte
     token (3 + byte) per byte;
  3. repeatedly merge the adjacent pair whose concatenation is a piece with the highest score
     (the leftmost pair on ties; only scores above -1e10 count), until no pair merges;
  4. EOS (if asked).
run.c rescans the whole sequence for every merge (quadratic); this does the same merges with a heap
and a linked list, which is equivalent because run.c breaks ties by the leftmost position and the
left token of a pair keeps its original index when it absorbs its right neighbour.

Three places deliberately differ from run.c, each where run.c misbehaves: a piece that occurs
twice maps to its lowest id (run.c's bsearch returns either); a vocabulary without a " " piece
gets the space's byte token as the dummy prefix (run.c would emit id -1); and `decode` joins bytes
before decoding UTF-8, so multi-byte characters spelt as byte tokens come out whole (run.c's
safe_printf drops such bytes). Text is taken whole, NUL characters included (run.c stops at one).
"""

from __future__ import annotations

import codecs
import heapq
import logging
import re
import struct
from pathlib import Path

import numpy as np

from splice.errors import ArtefactError, InputError

log = logging.getLogger(__name__)

BOS_ID = 1
EOS_ID = 2
_BYTE_TOKEN_OFFSET = 3          # ids 0, 1, 2 are <unk>, <s>, </s>; byte b is token 3 + b
_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")
_MAX_TOKEN_LENGTH = 1 << 16      # far above any real vocabulary; a larger header is corruption
_MIN_SCORE = float(np.float32(-1e10))   # run.c's starting best_score, as a float32


class Llama2cTokenizer:
    """A llama2.c BPE vocabulary: pieces (bytes) and their merge scores."""

    __slots__ = ("pieces", "scores", "max_token_length", "_lookup", "_decoded")

    bos_id = BOS_ID
    eos_id = EOS_ID

    def __init__(self, pieces: list[bytes], scores: list[float], max_token_length: int):
        if len(pieces) != len(scores):
            raise ArtefactError(f"llama2.c tokenizer: {len(pieces)} pieces but {len(scores)} scores")
        if len(pieces) <= EOS_ID:
            raise ArtefactError(f"llama2.c tokenizer: {len(pieces)} tokens; a llama2.c vocabulary "
                                "has at least 3 (<unk>, <s>, </s>)")
        self.pieces = pieces
        self.scores = scores
        self.max_token_length = max_token_length
        self._lookup: dict[bytes, int] = {}
        for i, piece in enumerate(pieces):
            self._lookup.setdefault(piece, i)
        # what each token prints as: byte tokens stand for their byte, the rest for their text
        self._decoded = [_piece_bytes(p) for p in pieces]

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def from_bytes(cls, data: bytes, *, vocab_size: int | None = None,
                   name: str = "tokenizer") -> Llama2cTokenizer:
        """Parse a tok*.bin image. `vocab_size`, when given, must match the number of entries;
        `name` is used in error messages (the file's path, say)."""
        data = bytes(data)
        where = f"llama2.c tokenizer {name}"
        if len(data) < 4:
            raise ArtefactError(f"{where}: {len(data)} bytes; expected an int32 max_token_length "
                                "followed by (float32 score, int32 length, bytes) entries")
        (max_len,) = struct.unpack_from("<i", data, 0)
        if not 0 < max_len <= _MAX_TOKEN_LENGTH:
            raise ArtefactError(f"{where}: max_token_length is {max_len}; expected 1.."
                                f"{_MAX_TOKEN_LENGTH} (is this a tokenizer file?)")
        pieces: list[bytes] = []
        scores: list[float] = []
        off = 4
        while off < len(data):
            i = len(pieces)
            if off + 8 > len(data):
                raise ArtefactError(f"{where}: token {i} at byte {off} is truncated: "
                                    f"{len(data) - off} bytes left, a score and a length need 8")
            score, length = struct.unpack_from("<fi", data, off)
            off += 8
            if score != score:
                raise ArtefactError(f"{where}: token {i} has a NaN score; scores must be numbers")
            if not 0 < length <= max_len:
                raise ArtefactError(f"{where}: token {i} has length {length}; expected 1.."
                                    f"{max_len} (the file's max_token_length)")
            if off + length > len(data):
                raise ArtefactError(f"{where}: token {i} needs {length} bytes at byte {off}, "
                                    f"the file ends after {len(data) - off}")
            pieces.append(data[off:off + length])
            scores.append(score)
            off += length
        if vocab_size is not None and len(pieces) != vocab_size:
            raise ArtefactError(f"{where}: {len(pieces)} tokens; the model expects {vocab_size}")
        return cls(pieces, scores, max_len)

    @classmethod
    def from_file(cls, path: str | Path, *, vocab_size: int | None = None) -> Llama2cTokenizer:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ArtefactError(f"llama2.c tokenizer {path}: cannot read it ({e.strerror})") from None
        return cls.from_bytes(data, vocab_size=vocab_size, name=str(path))

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    # -- encoding ------------------------------------------------------------------------------
    def encode(self, text: str | bytes, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids for `text` exactly as llama2.c's run.c encodes it (see the module doc)."""
        raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        ids = [BOS_ID] if bos else []
        if raw:
            space = self._lookup.get(b" ")
            ids.extend([space] if space is not None else self._byte_tokens(b" "))
        for unit in _code_point_units(raw):
            tid = self._lookup.get(unit)
            ids.extend([tid] if tid is not None else self._byte_tokens(unit))
        ids = self._merge(ids)
        if eos:
            ids.append(EOS_ID)
        return ids

    def _byte_tokens(self, unit: bytes) -> list[int]:
        ids = [_BYTE_TOKEN_OFFSET + b for b in unit]
        if ids and max(ids) >= len(self.pieces):
            raise InputError(f"llama2.c tokenizer: byte 0x{max(unit):02X} of {unit!r} has no "
                             f"token: the vocabulary of {len(self.pieces)} has no byte-fallback "
                             "tokens for it; only text made of its pieces can be encoded")
        return ids

    def _merge(self, ids: list[int]) -> list[int]:
        """Greedy BPE merges, highest score first, leftmost on ties (run.c's loop, in n log n)."""
        n = len(ids)
        if n < 2:
            return ids
        tok = list(ids)
        nxt = list(range(1, n)) + [-1]
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap: list[tuple[float, int, int, int, int]] = []

        def push(i: int) -> None:
            j = nxt[i]
            if j < 0:
                return
            merged = self._lookup.get(self.pieces[tok[i]] + self.pieces[tok[j]])
            if merged is not None and self.scores[merged] > _MIN_SCORE:
                # the entry is valid while i and j still hold these tokens and are neighbours
                heapq.heappush(heap, (-self.scores[merged], i, j, tok[i], tok[j]))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, j, ti, tj = heapq.heappop(heap)
            if not (alive[i] and alive[j] and nxt[i] == j and tok[i] == ti and tok[j] == tj):
                continue
            tok[i] = self._lookup[self.pieces[ti] + self.pieces[tj]]
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] >= 0:
                prv[nxt[j]] = i
            if prv[i] >= 0:
                push(prv[i])
            push(i)
        return [tok[i] for i in range(n) if alive[i]]

    # -- decoding ------------------------------------------------------------------------------
    def piece_bytes(self, prev: int | None, token: int) -> bytes:
        """The bytes run.c prints for `token` after `prev`: a leading space is dropped right
        after BOS (SentencePiece's decoder strips the dummy prefix), a byte token is its byte."""
        self._check_id(token)
        piece = self.pieces[token]
        if prev == BOS_ID and piece.startswith(b" "):
            return _piece_bytes(piece[1:])
        return self._decoded[token]

    def decode_token(self, prev: int | None, token: int) -> str:
        """One token's text for streaming. A byte token that is part of a multi-byte character
        cannot be text on its own and comes out as U+FFFD; `stream()` buffers such bytes."""
        return self.piece_bytes(prev, token).decode("utf-8", errors="replace")

    def decode(self, ids: list[int] | tuple[int, ...] | np.ndarray) -> str:
        """Text of `ids`. BOS and EOS are not printed (run.c never prints them) but still
        strip the leading space of the token after BOS; bytes are joined before UTF-8 decoding."""
        out = bytearray()
        prev: int | None = None
        for token in (int(t) for t in ids):
            if token not in (BOS_ID, EOS_ID):
                out += self.piece_bytes(prev, token)
            else:
                self._check_id(token)
            prev = token
        return out.decode("utf-8", errors="replace")

    def stream(self, prev: int | None = None) -> StreamDecoder:
        """An incremental decoder: feed ids one at a time, get text as soon as it is whole."""
        return StreamDecoder(self, prev)

    def _check_id(self, token: int) -> None:
        if not 0 <= token < len(self.pieces):
            raise InputError(f"llama2.c tokenizer: token id {token} is out of range; the "
                             f"vocabulary has ids 0..{len(self.pieces) - 1}")


class StreamDecoder:
    """Decodes generated ids one at a time, holding back the bytes of an unfinished UTF-8
    character until its last byte token arrives."""

    __slots__ = ("_tok", "_prev", "_utf8")

    def __init__(self, tokenizer: Llama2cTokenizer, prev: int | None = None):
        self._tok = tokenizer
        self._prev = prev
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        token = int(token)
        if token in (BOS_ID, EOS_ID):
            self._tok._check_id(token)
            data = b""
        else:
            data = self._tok.piece_bytes(self._prev, token)
        self._prev = token
        return self._utf8.decode(data)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


def _piece_bytes(piece: bytes) -> bytes:
    m = _BYTE_PIECE.fullmatch(piece)
    return bytes([int(m.group(1), 16)]) if m else piece


def _code_point_units(raw: bytes) -> list[bytes]:
    """Split UTF-8 bytes the way run.c does: a unit starts at a non-continuation byte and takes
    following continuation bytes up to 4 bytes in all; stray continuation bytes stand alone."""
    units: list[bytes] = []
    i, n = 0, len(raw)
    while i < n:
        j = i + 1
        while j < n and (raw[j] & 0xC0) == 0x80 and j - i < 4:
            j += 1
        units.append(raw[i:j])
        i = j
    return units
