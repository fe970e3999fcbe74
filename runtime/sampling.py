"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p.

Sampling runs in float64 on one row of logits with numpy's Generator, so a seed gives the same
text on every machine that runs the same model.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from splice.errors import InputError


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. `greedy` takes the argmax and ignores the rest."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and 0 < self.temperature < math.inf):
            raise InputError(f"temperature={self.temperature!r}; expected a finite number > 0 "
                             "(greedy=True for deterministic decoding)")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise InputError(f"top_k={self.top_k!r}; expected an integer >= 0 (0 = off)")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise InputError(f"top_p={self.top_p!r}; expected a number in (0, 1] (1 = off)")
        if self.seed is not None and not (isinstance(self.seed, int) and self.seed >= 0):
            raise InputError(f"seed={self.seed!r}; expected an integer >= 0 or None")


class Sampler:
    """Picks tokens for one generation; holds the random state so a seed fixes the sequence."""

    def __init__(self, sampling: Sampling):
        self.s = sampling
        self.rng = np.random.default_rng(sampling.seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.s.greedy:
            return int(np.argmax(logits))
        x = logits.astype(np.float64) / self.s.temperature
        if 0 < self.s.top_k < x.size:
            kth = np.partition(x, -self.s.top_k)[-self.s.top_k]
            x = np.where(x < kth, -np.inf, x)
        p = np.exp(x - x.max())
        p /= p.sum()
        if self.s.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            # keep the smallest prefix whose mass reaches top_p (at least the top token)
            drop = order[(cum - p[order]) >= self.s.top_p]
            p[drop] = 0.0
            p /= p.sum()
        return int(self.rng.choice(p.size, p=p))
