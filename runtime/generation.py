"""Generation over any artefact: prompts, sampling, prompt lookup, streaming and the timings.

`Artefact` is the base class of every runtime's loaded artefact (onnx_runtime, tvm_runtime,
npu_runtime, ...). A runtime supplies the forward pass, `logits(ids, past)`, and may supply a
generation cache (`_cache(capacity)`: an object with `step(ids) -> (logits, length)` and, when
`cuts_cache`, `truncate(length)`); everything a user calls to generate is here, once: the
tokenizer from the artefact's hashed files, the prompt and id checks, the stop ids, greedy or
sampled decoding (sampling.py), prompt lookup decoding (lookahead.py), text streaming and the
per-generation statistics (`Generation`, `last_stats`).

numpy and the tokenizers only: no torch and no backend runtime, so every backend's runtime can
build on it without importing another's.
"""

from __future__ import annotations

import abc
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from splice.errors import ArtefactError, InputError
from .lookahead import PromptLookup
from .manifest import check_relpath
from .sampling import Sampler, Sampling
from .tokenizer import load_tokenizer

__all__ = ["Artefact", "FunctionalCache", "Generation"]


@dataclasses.dataclass
class Generation:
    """The result of `generate_ids`: the new ids, why generation stopped ("eos", "length" or
    "context") and the timings (prefill over the prompt, decode over the following steps; with
    lookahead a step can produce several tokens, and decode_tok_s counts tokens)."""

    prompt_ids: list[int]
    ids: list[int]
    stop: str
    prefill_s: float
    decode_s: float
    decode_steps: int
    decode_tokens: int = 0  # tokens the decode steps produced (more than the steps with lookahead)
    lookahead: int = 0  # draft tokens allowed a step (prompt lookup), how many were fed, and
    drafted: int = 0  # how many of them the model agreed with
    accepted: int = 0

    @property
    def prefill_tok_s(self) -> float:
        return len(self.prompt_ids) / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    def stats(self) -> dict[str, Any]:
        out = {"prompt_tokens": len(self.prompt_ids), "new_tokens": len(self.ids),
               "stop": self.stop, "prefill_s": self.prefill_s, "decode_s": self.decode_s,
               "prefill_tok_s": self.prefill_tok_s, "decode_tok_s": self.decode_tok_s,
               "decode_steps": self.decode_steps}
        if self.lookahead:
            out.update(lookahead=self.lookahead, drafted=self.drafted, accepted=self.accepted)
        return out


class FunctionalCache:
    """One generation's cache through `Artefact.logits`: each step returns a new cache. Cutting
    it back is the cache's own `cut(length)` (a runtime whose generation owns its cache may cut
    in place instead, by overriding `_cut`)."""

    def __init__(self, art: Artefact):
        self.art = art
        self.cache: Any = None

    def step(self, ids: np.ndarray) -> tuple[np.ndarray, int]:
        logits, self.cache = self.art.logits(ids, self.cache)
        return logits, self.cache.length

    def truncate(self, length: int) -> None:
        c = self.cache
        if c is None or not 0 <= length <= c.length:
            raise InputError(f"cannot cut a cache of {c.length if c else 0} positions to "
                             f"{length}")
        self.cache = self._cut(c, length)

    def _cut(self, c: Any, length: int) -> Any:
        """The cache's first `length` positions."""
        return c.cut(length)


class Artefact(abc.ABC):
    """A loaded artefact: `config` (the model config as a dict), `manifest`, `tokenizer`,
    `logits()`, `generate()`, `generate_ids()`, `stream()`. `last_stats` holds the timings of the
    latest generation. Each runtime subclasses it with its forward pass."""

    cuts_cache = True  # whether _cache()'s caches can be cut back (prompt lookup needs it)

    def __init__(self, path: Path, manifest: dict, *, max_position: int | None = None):
        """`max_position`: the positions a generation may fill (None: the config's context)."""
        self.path = path
        self.manifest = manifest
        self.config: dict[str, Any] = manifest["config"]
        self.last_stats: dict[str, Any] = {}
        self.max_position = int(self.config["max_position"] if max_position is None
                                else max_position)
        self.vocab_size = int(self.config["vocab_size"])
        self._tokenizer = None

    @abc.abstractmethod
    def logits(self, ids: Any, past: Any = None) -> tuple[np.ndarray, Any]:
        """Logits [batch, seq, vocab] for `ids` ([seq] or [batch, seq]) after the cache `past`
        (None: an empty one), and the cache that includes them."""

    # -- tokenizer -----------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            spec = self.manifest.get("tokenizer")
            if not spec:
                raise ArtefactError(f"artefact {self.path} carries no tokenizer; give token ids")
            files = {}
            for rel in spec.get("files", ()):
                if check_relpath(rel) not in self.manifest["files"]:
                    raise ArtefactError(f"artefact {self.path}: tokenizer file {rel!r} is not "
                                        "among the artefact's hashed files")
                files[PurePosixPath(rel).name] = (self.path / rel).read_bytes()
            self._tokenizer = load_tokenizer(spec["kind"], files)
        return self._tokenizer

    # -- inputs --------------------------------------------------------------------------------
    def check_ids(self, ids: Any) -> np.ndarray:
        """`ids` as [batch, seq] integers within the vocabulary, or a one-line InputError."""
        ids = np.asarray(ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"ids: expected integers shaped [seq] or [batch, seq] with seq >= 1, "
                             f"got {ids.dtype} {list(ids.shape)}")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            bad = int(ids.min() if ids.min() < 0 else ids.max())
            raise InputError(f"token id {bad} is out of range; the vocabulary has ids "
                             f"0..{self.vocab_size - 1}")
        return ids

    def prompt_ids(self, prompt: str | Sequence[int] | np.ndarray) -> list[int]:
        """Token ids for a prompt: text is encoded with the model's BOS convention; ids are
        taken as they are. An empty prompt starts from BOS when the model has one."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, bos=True)
        else:
            arr = np.asarray(prompt)
            if arr.ndim == 2 and arr.shape[0] == 1:
                arr = arr[0]
            if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
                got = (type(prompt).__name__ if arr.dtype == object and arr.ndim == 0
                       else f"{arr.dtype} {list(arr.shape)}")   # None, an object: its type
                raise InputError(f"prompt: expected text or a sequence of token ids, got "
                                 f"{got} (one sequence at a time)")
            ids = [int(t) for t in arr]
        if not ids:
            bos = self.config.get("bos_token_id")
            if bos is None:
                raise InputError("the prompt is empty and the model has no BOS token to start "
                                 "from; give at least one token")
            ids = [int(bos)]
        if len(ids) > self.max_position:
            raise InputError(f"the prompt is {len(ids)} tokens long; the model's context is "
                             f"{self.max_position} tokens")
        return ids

    def stop_ids(self) -> set[int]:
        ids = set(self.config.get("eos_token_ids") or ())
        if self.manifest.get("tokenizer"):
            ids |= set(self.tokenizer.eos_ids)
        return ids

    # -- generation ----------------------------------------------------------------------------
    def _tokens(self, ids: list[int], max_new_tokens: int, sampling: Sampling, stop_at_eos: bool,
                result: Generation, lookahead: int = 0) -> Iterator[int]:
        """Yield new tokens one at a time, filling `result` as it goes (so a consumer that stops
        early still leaves correct stats). `lookahead` > 0 drafts up to that many tokens a step by
        prompt lookup (runtime/lookahead.py; how many adapts to how many were kept) and keeps
        those the model agrees with."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise InputError(f"max_new_tokens={max_new_tokens!r}; expected an integer >= 0")
        sampler = Sampler(sampling)
        stops = self.stop_ids() if stop_at_eos else set()
        capacity = min(self.max_position, len(ids) + max_new_tokens)
        drafter = cache = None
        if lookahead:
            drafter, cache = self._lookahead(lookahead, sampling, capacity)
            drafter.extend(ids)
            result.lookahead = lookahead
        step = cache.step if cache is not None else self._stepper(capacity)
        t = time.perf_counter()
        logits, length = step(np.asarray([ids], dtype=np.int64))
        result.prefill_s = time.perf_counter() - t
        kept = [sampler(logits[0, -1])]
        while max_new_tokens:
            for tok in kept:
                if tok in stops:
                    result.stop = "eos"
                    return
                result.ids.append(tok)
                yield tok
                if len(result.ids) == max_new_tokens:
                    result.stop = "length"
                    return
            if length >= self.max_position:
                result.stop = "context"
                return
            drafts = []
            if drafter is not None:
                drafter.extend(kept)
                drafts = drafter.draft(min(max_new_tokens - len(result.ids),
                                           capacity - length) - 1)
            t = time.perf_counter()
            logits, length = step(np.asarray([[result.ids[-1], *drafts]], dtype=np.int64))
            if drafts:
                best = logits[0].argmax(-1)
                agree = 0
                while agree < len(drafts) and drafts[agree] == best[agree]:
                    agree += 1
                length -= len(drafts) - agree
                cache.truncate(length)
                drafter.update(len(drafts), agree)
                kept = [*drafts[:agree], int(best[agree])]
                result.drafted += len(drafts)
                result.accepted += agree
            else:
                kept = [sampler(logits[0, -1])]
            result.decode_s += time.perf_counter() - t
            result.decode_steps += 1
            result.decode_tokens += len(kept)
        result.stop = "length"

    def _lookahead(self, k: int, sampling: Sampling, capacity: int) -> tuple[PromptLookup, Any]:
        """The drafter and a cache that can be cut back, for prompt lookup decoding."""
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise InputError(f"lookahead={k!r}; expected an integer >= 0 (0: one token a step)")
        if not sampling.greedy:
            raise InputError("lookahead keeps the drafts that match the model's argmax: it "
                             "needs greedy decoding (temperature 0), not sampling")
        if not self.cuts_cache:
            raise InputError(f"lookahead: the {self.manifest.get('backend')} runtime cannot cut "
                             "its cache back; prompt lookup runs on ONNX and TVM artefacts")
        return PromptLookup(k), self._cache(capacity)

    def _cache(self, capacity: int) -> Any:
        """One generation's cache of up to `capacity` tokens (`step`, and `truncate` when
        `cuts_cache`): by default `logits()`'s functional cache."""
        return FunctionalCache(self)

    def _stepper(self, capacity: int) -> Callable[[np.ndarray], tuple[np.ndarray, int]]:
        """One generation's step function, ids [1, seq] -> (logits, cache length)."""
        return self._cache(capacity).step

    def generate_ids(self, prompt: str | Sequence[int] | np.ndarray, *, max_new_tokens: int = 128,
                     greedy: bool = True, temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0, seed: int | None = None,
                     stop_at_eos: bool = True, lookahead: int = 0) -> Generation:
        """Generate up to `max_new_tokens` ids after `prompt` (text or ids); stops at an EOS id
        (not included) or at the context's end. `lookahead` > 0 (greedy only): prompt lookup
        decoding with up to that many draft tokens a step, the number adapted to how many the
        model keeps (runtime/lookahead.py)."""
        sampling = Sampling(greedy, temperature, top_k, top_p, seed)
        result = Generation(self.prompt_ids(prompt), [], "length", 0.0, 0.0, 0)
        for _ in self._tokens(result.prompt_ids, max_new_tokens, sampling, stop_at_eos, result,
                              lookahead):
            pass
        self.last_stats = result.stats()
        return result

    def stream(self, prompt: str | Sequence[int] | np.ndarray, *, max_new_tokens: int = 128,
               greedy: bool = True, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               seed: int | None = None, stop_at_eos: bool = True,
               callback: Callable[[str], None] | None = None, lookahead: int = 0
               ) -> Iterator[str]:
        """Yield the generated text piece by piece as soon as each piece is final (a character
        split over several tokens comes out whole); `callback`, if given, sees every piece too.
        `lookahead` as in `generate_ids`."""
        sampling = Sampling(greedy, temperature, top_k, top_p, seed)
        result = Generation(self.prompt_ids(prompt), [], "length", 0.0, 0.0, 0)
        decoder = self.tokenizer.stream(result.prompt_ids)
        try:
            for tok in self._tokens(result.prompt_ids, max_new_tokens, sampling, stop_at_eos,
                                    result, lookahead):
                piece = decoder.push(tok)
                if piece:
                    if callback is not None:
                        callback(piece)
                    yield piece
            tail = decoder.flush()
            if tail:
                if callback is not None:
                    callback(tail)
                yield tail
        finally:
            self.last_stats = result.stats()

    def generate(self, prompt: str | Sequence[int] | np.ndarray, **kwargs: Any) -> str:
        """The generated text (without the prompt); takes `stream`'s keyword arguments."""
        return "".join(self.stream(prompt, **kwargs))

    def __repr__(self) -> str:
        return (f"Artefact({self.path}, {self.config.get('architecture')}, "
                f"{self.manifest.get('backend')}/{self.manifest.get('target')})")
