"""Prompt lookup decoding: draft tokens copied from the context, verified in one step.

A decode step of a small model on a CPU costs about the same for a few tokens as for one (the
weights are read once either way: SmolLM2-135M int4, 2 threads, two tokens cost 1.15x one, five
1.8x). Greedy text repeats itself, and repeats its prompt: when the last few tokens occurred
before, the tokens that followed them then are a cheap guess at what follows now. The step
feeds the current token and up to `k` such draft tokens; the model's argmax at each position
says how many drafts it would have produced itself. Those are kept, plus the model's own token
after them, and the cache is cut back to what was kept (an in-place cache overwrites the
rejected positions later; a functional one copies what is kept).

How many drafts a step: at most `k`, starting at half of it and adapted as Hugging Face's
assisted generation adapts its draft length, two more after a step that kept all its drafts, one
fewer (down to one) after a step that rejected one: repetitive text earns long drafts, text that
repeats only now and then does not pay for many rejected ones. SmolLM2-135M int4 g128, six
WikiText-2 and TinyStories prompts, 128 greedy tokens: up to 8 adapted decodes 1.12-1.22x faster
than a fixed 4 on the four prompts whose drafts are mostly kept, level on the other two.

Exact: every kept token is the argmax of the model's logits given the tokens before it, so the
output is greedy decoding's. Bit for bit only where the kernels give the same logits for a
position whatever else is in the step: float32 compute does to rounding; with MatMulNBits' int8
activations (accuracy_level 4) a rounding difference of a step of several rows against one
row (each MatMulNBits alone agrees to 1e-7) can move an activation across an int8 step, and
through the layers the logits differ by up to about one unit, so a near tie can go the other
way.
"""

from __future__ import annotations

from collections.abc import Sequence

from splice.errors import InputError

__all__ = ["PromptLookup"]


class PromptLookup:
    """Drafts for the next tokens of `history`: the tokens that followed the most recent earlier
    occurrence of its last n tokens, for the longest n from `max_ngram` down to `min_ngram` that
    occurred before. An index from every n-gram to where it last ended keeps each update and
    each lookup O(max_ngram). At most `k` drafts a step, `n` now: `start` (half of `k` unless
    given), then adapted by `update`."""

    def __init__(self, k: int, max_ngram: int = 3, min_ngram: int = 2, start: int | None = None):
        start = max(1, k // 2) if start is None and isinstance(k, int) else start
        for name, v in (("lookahead", k), ("max_ngram", max_ngram), ("min_ngram", min_ngram),
                        ("start", start)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InputError(f"{name}={v!r}; expected an integer >= 1")
        if min_ngram > max_ngram:
            raise InputError(f"min_ngram={min_ngram} > max_ngram={max_ngram}")
        if start > k:
            raise InputError(f"start={start} > lookahead={k}")
        self.k, self.max_ngram, self.min_ngram, self.n = k, max_ngram, min_ngram, start
        self.history: list[int] = []
        self._next: dict[tuple[int, ...], int] = {}  # n-gram -> where what followed it starts

    def extend(self, tokens: Sequence[int]) -> None:
        """Append tokens to the history (the prompt, then each kept token)."""
        h = self.history
        for t in tokens:
            h.append(int(t))
            end = len(h) - 1  # the n-grams ending just before the new token: it follows them
            for n in range(self.min_ngram, self.max_ngram + 1):
                if end >= n:
                    self._next[tuple(h[end - n:end])] = end

    def update(self, drafted: int, kept: int) -> None:
        """Adapt the draft length to the last step: `kept` of its `drafted` drafts were kept."""
        if drafted:
            self.n = min(self.n + 2, self.k) if kept == drafted else max(1, self.n - 1)

    def draft(self, limit: int) -> list[int]:
        """Up to min(n, limit) draft tokens to follow the history, or none."""
        h, k = self.history, min(self.n, limit)
        if k <= 0:
            return []
        for n in range(min(self.max_ngram, len(h)), self.min_ngram - 1, -1):
            start = self._next.get(tuple(h[len(h) - n:]))
            if start is not None:
                return h[start:start + k]
        return []
