"""Token batches for the debugging tools: the pinned batch every check runs, and calibration
windows.

Two rules shape these helpers. First, a check must not measure on the text a pass calibrated on:
calibration tokens come from the start of the text file, the pinned batch from its middle (the
file's second half starts where calibration ends for any file longer than a few windows). Second,
only the text that is needed is tokenised: llama2.c's tokenizer is pure Python and takes seconds
over a whole file, so the text is encoded in growing slices until there are enough tokens.

Without a text file the pinned batch is seeded random token ids. That is as good as text for the
float64 exactness check (it tests the function, not the data); for KL and the perplexity proxy of
a lossy pass it is a weaker signal, and the report says which source was used.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from splice.errors import InputError
from splice.ir.core import Module

log = logging.getLogger(__name__)

# characters tokenised per token wanted, at first (doubled while too few tokens come back)
_CHARS_PER_TOKEN = 6


def text_tokens(module: Module, path: str | Path, n_tokens: int, *,
                start: float = 0.0) -> list[int]:
    """The first `n_tokens` token ids of the text file `path`, from the fraction `start` (0..1) of
    its characters on (cut back to a paragraph or line start, so no word is split). Raises when the
    text (from `start`) holds fewer tokens than asked."""
    from .text import encode_text, read_text

    if not isinstance(n_tokens, int) or n_tokens < 2:
        raise InputError(f"need at least 2 tokens, got {n_tokens!r}")
    text = read_text(Path(path))
    begin = int(len(text) * start)
    if begin:
        cut = max(text.rfind("\n", 0, begin), 0)
        begin = cut + 1 if cut else 0
    chars = n_tokens * _CHARS_PER_TOKEN
    while True:
        piece = text[begin:begin + chars]
        ids = encode_text(module, piece)
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
        if begin + chars >= len(text):
            raise InputError(f"text file {path} holds {len(ids)} tokens from {start:.0%} of its "
                             f"length on, fewer than the {n_tokens} asked; give a longer text or "
                             "fewer tokens (--tokens)")
        chars *= 2


def _with_bos(module: Module, ids: list[int]) -> list[int]:
    bos = module.config.bos_token_id
    return ids if bos is None else [bos, *ids[:-1]]


def _windows(module: Module, ids: list[int], seq_len: int) -> torch.Tensor:
    """`ids` as [n, seq_len] rows, each led by BOS when the model has one (as llama2.c's
    evaluation and most chat models expect); the tail that does not fill a row is dropped."""
    seq_len = max(2, min(seq_len, module.config.max_position))
    n = len(ids) // seq_len
    if n == 0:
        raise InputError(f"{len(ids)} tokens do not fill one window of {seq_len}")
    rows = [_with_bos(module, ids[i * seq_len:(i + 1) * seq_len]) for i in range(n)]
    return torch.tensor(rows, dtype=torch.int64)


def pinned_batch(module: Module, text: str | Path | None = None, tokens: int = 128, *,
                 seed: int = 0) -> tuple[torch.Tensor, str]:
    """The batch every check of a debugging run uses, [batch, seq] int64, and a line saying where
    it came from. From `text`: `tokens` tokens from the middle of the file; without: seeded random
    ids. Rows are at most the model's context long."""
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 2:
        raise InputError(f"--tokens must be an integer >= 2, got {tokens!r}")
    seq = min(tokens, module.config.max_position)
    n = max(1, tokens // seq)
    if text is not None:
        ids = text_tokens(module, text, n * seq, start=0.5)
        return _windows(module, ids, seq), f"{n * seq} tokens from the middle of {Path(text).name}"
    gen = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, module.config.vocab_size, (n, seq), generator=gen, dtype=torch.int64)
    return batch, f"{n * seq} random token ids (seed {seed}; no --calib text given)"


def calibration_windows(module: Module, text: str | Path, tokens: int,
                        seq_len: int = 256) -> torch.Tensor:
    """`tokens` calibration tokens from the start of `text` as [n, seq_len] windows."""
    ids = text_tokens(module, text, tokens, start=0.0)
    return _windows(module, ids, min(seq_len, tokens))
