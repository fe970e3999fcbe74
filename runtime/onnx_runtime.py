"""Load an artefact and run it: logits with a KV cache, generation, streaming.

numpy, onnxruntime and the tokenizers library only: no torch, so this runs on an edge device.
`load` checks the artefact (runtime/manifest.py) before ONNX Runtime reads a byte of the model.

The cache is kept as ONNX Runtime values between steps (`run_with_ort_values`): a step's present
key/value tensors are fed straight back as the next step's past without a round trip through numpy.
Only the logits are copied out. A standard-ops graph concatenates past and new keys itself, so
each step copies the cache once inside ONNX Runtime. A contrib graph whose attentions are all
GroupQueryAttention (the manifest's io.share_buffer) takes an attention_mask and writes the new
keys in place: generation then binds one max-length buffer per cache tensor as both past and
present (IO binding), so a decode step copies nothing but its logits. `logits()` keeps the
functional form (a new cache per call) for every artefact.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import onnxruntime as ort

from splice.errors import ArtefactError, InputError
from .lookahead import PromptLookup
from .manifest import check_relpath, read_manifest, verify_artefact
from .sampling import Sampler, Sampling
from .session import providers_for, session_options, session_section
from .shared_cache import SharedCache
from .tokenizer import load_tokenizer

__all__ = ["Artefact", "Generation", "KVCache", "load", "read_manifest"]


def load(path: str | Path, *, expected_manifest_sha256: str | None = None,
         providers: Sequence[str] | None = None, graph_optimization: bool | str | None = None,
         threads: int | None = None, spinning: bool | None = None) -> Artefact:
    """Check and open the artefact at `path`.

    expected_manifest_sha256 pins the manifest (and through its hashes every file). providers
    defaults to the manifest's, less those this onnxruntime lacks. graph_optimization: None for the
    manifest's level, True/False for all/none, or "disable", "basic", "extended", "all".
    threads: intra-op threads (None: the manifest's). spinning: whether idle intra-op threads
    spin between ops (None: the manifest's; ONNX Runtime's default is on, which is fastest on
    cores of one's own and slow where other processes want them)."""
    path = Path(path)
    manifest = verify_artefact(path, expected_manifest_sha256=expected_manifest_sha256)
    if manifest.get("backend") != "onnx":
        raise ArtefactError(f"artefact {path}: backend {manifest.get('backend')!r}; this runtime "
                            "runs 'onnx' artefacts")
    for key in ("config", "io", "onnx"):
        if not isinstance(manifest.get(key), dict):
            raise ArtefactError(f"artefact {path}: the manifest has no {key!r} section")
    model = check_relpath(manifest["onnx"].get("model"))
    if model not in manifest["files"]:
        raise ArtefactError(f"artefact {path}: the model file {model!r} is not among its files")
    session_cfg = session_section(path, manifest)
    options = session_options(session_cfg, graph_optimization, threads, spinning)
    chosen = providers_for(session_cfg, providers)
    try:
        session = ort.InferenceSession(str(path / model), options, providers=chosen)
    except Exception as e:  # onnxruntime raises its own exception types per failure
        raise ArtefactError(f"artefact {path}: ONNX Runtime cannot load {model}: {e}") from None
    _check_sections(path, manifest, session)
    return Artefact(path, manifest, session)


def _check_sections(path: Path, manifest: dict, session: ort.InferenceSession) -> None:
    """The config and io sections hold what Artefact reads, of the right types, and the io names
    are the model's own inputs and outputs: a manifest edited by hand (its hashes cover the other
    files, not itself unless pinned) fails here with its defect named, not later with a KeyError
    or an ONNX Runtime error in the middle of a generation."""
    def bad(what: str) -> ArtefactError:
        return ArtefactError(f"artefact {path}: the manifest's {what}")

    def is_id(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    cfg, io = manifest["config"], manifest["io"]
    for key in ("max_position", "vocab_size"):
        if not isinstance(cfg.get(key), int) or isinstance(cfg.get(key), bool) or cfg[key] < 1:
            raise bad(f"config.{key} is {cfg.get(key)!r}; expected a positive integer")
    if cfg.get("bos_token_id") is not None and not is_id(cfg["bos_token_id"]):
        raise bad(f"config.bos_token_id is {cfg['bos_token_id']!r}; expected a token id or null")
    eos = cfg.get("eos_token_ids")
    if eos is not None and not (isinstance(eos, list) and all(map(is_id, eos))):
        raise bad(f"config.eos_token_ids is {eos!r}; expected a list of token ids or null")
    tok = manifest.get("tokenizer")
    if tok is not None and not (isinstance(tok, dict) and isinstance(tok.get("kind"), str)
                                and isinstance(tok.get("files"), list)
                                and all(isinstance(f, str) for f in tok["files"])):
        raise bad(f"tokenizer section is {tok!r:.80}; expected null or a table with a 'kind' "
                  "name and a list of 'files'")
    shapes = {i.name: i.shape for i in session.get_inputs()}
    names = {"inputs": set(shapes), "outputs": {o.name for o in session.get_outputs()}}

    def check_name(where: str, value: Any, kind: str) -> None:
        if not isinstance(value, str) or value not in names[kind]:
            known = sorted(names[kind])
            more = f", ... ({len(known)} in all)" if len(known) > 4 else ""
            raise bad(f"{where} is {value!r}; the model's {kind} are {', '.join(known[:4])}{more}")

    for key, kind in (("input_ids", "inputs"), ("position_ids", "inputs"), ("logits", "outputs")):
        check_name(f"io.{key}", io.get(key), kind)
    layers = io.get("past")
    if not isinstance(layers, list) or not all(isinstance(x, dict) for x in layers):
        raise bad("io.past is not a list of per-layer tables")
    for i, layer in enumerate(layers):
        for key, kind in (("key", "inputs"), ("value", "inputs"), ("present_key", "outputs"),
                          ("present_value", "outputs")):
            check_name(f"io.past[{i}].{key}", layer.get(key), kind)
        for key, axis in (("kv_heads", 1), ("head_dim", 3)):
            value = layer.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(f"io.past[{i}].{key} is {value!r}; expected a positive integer")
            for kv in ("key", "value"):
                shape = shapes[layer[kv]]
                if len(shape) != 4 or (isinstance(shape[axis], int) and shape[axis] != value):
                    raise bad(f"io.past[{i}].{key} is {value}, but the model's {layer[kv]} has "
                              f"shape {shape}")
    fed = {io["input_ids"], io["position_ids"]} | {x[k] for x in layers for k in ("key", "value")}
    if io.get("attention_mask") is not None:
        check_name("io.attention_mask", io["attention_mask"], "inputs")
        fed.add(io["attention_mask"])
    if fed != names["inputs"]:
        raise bad(f"io section feeds {sorted(fed)}, but the model's inputs are "
                  f"{sorted(names['inputs'])}")


class KVCache:
    """The decoder's cache after `length` tokens: per layer a key and a value
    [batch, kv_heads, length, head_dim], held as ONNX Runtime values. Pass it back to
    `Artefact.logits`; `numpy()` copies it out."""

    __slots__ = ("values", "length", "batch")

    def __init__(self, values: dict[str, ort.OrtValue], length: int, batch: int):
        self.values = values
        self.length = length
        self.batch = batch

    def numpy(self) -> dict[str, np.ndarray]:
        return {name: v.numpy() for name, v in self.values.items()}

    def __getitem__(self, name: str) -> np.ndarray:
        return self.values[name].numpy()

    def __repr__(self) -> str:
        return f"KVCache(layers={len(self.values) // 2}, batch={self.batch}, length={self.length})"


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
    """One generation's cache through `Artefact.logits`: each step returns a new cache (a
    standard-ops graph concatenates past and new keys). Cutting it back copies what is kept."""

    def __init__(self, art: Artefact):
        self.art = art
        self.cache: KVCache | None = None

    def step(self, ids: np.ndarray) -> tuple[np.ndarray, int]:
        logits, self.cache = self.art.logits(ids, self.cache)
        return logits, self.cache.length

    def truncate(self, length: int) -> None:
        c = self.cache
        if c is None or not 0 <= length <= c.length:
            raise InputError(f"cannot cut a cache of {c.length if c else 0} positions to "
                             f"{length}")
        self.cache = self._cut(c, length)

    def _cut(self, c: KVCache, length: int) -> KVCache:
        """The cache's first `length` positions (a copy)."""
        return KVCache({name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(
            v.numpy()[:, :, :length])) for name, v in c.values.items()}, length, c.batch)


class Artefact:
    """A loaded artefact: `config` (the model config as a dict), `manifest`, `tokenizer`,
    `logits()`, `generate()`, `generate_ids()`, `stream()`. `last_stats` holds the timings of the
    latest generation."""

    def __init__(self, path: Path, manifest: dict, session: ort.InferenceSession):
        self.path = path
        self.manifest = manifest
        self.config: dict[str, Any] = manifest["config"]
        self.session = session
        self.last_stats: dict[str, Any] = {}
        io = manifest["io"]
        self._ids_name, self._pos_name = io["input_ids"], io["position_ids"]
        self._mask_name = io.get("attention_mask")
        self._share = bool(io.get("share_buffer")) and self._mask_name is not None
        self._layers = io["past"]
        self._outputs = [io["logits"]] + [n for layer in self._layers
                                          for n in (layer["present_key"], layer["present_value"])]
        self._feed_of = {layer[f"present_{kv}"]: layer[kv] for layer in self._layers
                         for kv in ("key", "value")}
        self.max_position = int(self.config["max_position"])
        self.vocab_size = int(self.config["vocab_size"])
        self._tokenizer = None

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

    # -- one forward step ----------------------------------------------------------------------
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

    def logits(self, ids: Any, past: KVCache | dict[str, np.ndarray] | None = None
               ) -> tuple[np.ndarray, KVCache]:
        """Logits [batch, seq, vocab] for `ids` ([seq] or [batch, seq]) after the cache `past`
        (None: an empty one), and the cache that includes them."""
        ids = self.check_ids(ids)
        b, s = ids.shape
        feeds, past_len = self._past_feeds(past, b)
        if past_len + s > self.max_position:
            raise InputError(f"{past_len} cached + {s} new tokens = {past_len + s} exceed the "
                             f"model's context of {self.max_position} tokens")
        feeds[self._ids_name] = ort.OrtValue.ortvalue_from_numpy(
            np.ascontiguousarray(ids, dtype=np.int64))
        pos = np.broadcast_to(np.arange(past_len, past_len + s, dtype=np.int64), (b, s))
        feeds[self._pos_name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(pos))
        if self._mask_name is not None:
            feeds[self._mask_name] = ort.OrtValue.ortvalue_from_numpy(
                np.ones((b, past_len + s), np.int64))
        outs = self.session.run_with_ort_values(self._outputs, feeds)
        present = {self._feed_of[name]: v for name, v in zip(self._outputs[1:], outs[1:])}
        return outs[0].numpy(), KVCache(present, past_len + s, b)

    def _past_feeds(self, past, batch: int) -> tuple[dict[str, ort.OrtValue], int]:
        if past is None:
            return {layer[kv]: ort.OrtValue.ortvalue_from_numpy(
                        np.zeros((batch, layer["kv_heads"], 0, layer["head_dim"]), np.float32))
                    for layer in self._layers for kv in ("key", "value")}, 0
        if isinstance(past, KVCache):
            if past.batch != batch:
                raise InputError(f"the cache holds batch {past.batch}, the ids batch {batch}")
            return dict(past.values), past.length
        feeds, length = {}, None
        for layer in self._layers:
            for kv in ("key", "value"):
                arr = past.get(layer[kv]) if isinstance(past, dict) else None
                if arr is None:
                    raise InputError(f"past: no {layer[kv]!r}; expected a KVCache or a dict with "
                                     f"{len(self._layers) * 2} arrays past.{{i}}.key/value")
                arr = np.ascontiguousarray(arr, dtype=np.float32)
                want = (batch, layer["kv_heads"], arr.shape[2] if arr.ndim == 4 else -1,
                        layer["head_dim"])
                if arr.shape != want or (length is not None and arr.shape[2] != length):
                    raise InputError(f"past {layer[kv]!r} has shape {list(arr.shape)}; expected "
                                     f"[{batch}, {layer['kv_heads']}, past, {layer['head_dim']}] "
                                     "with one past length for all layers")
                length = arr.shape[2]
                feeds[layer[kv]] = ort.OrtValue.ortvalue_from_numpy(arr)
        return feeds, int(length or 0)

    # -- generation ----------------------------------------------------------------------------
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
                raise InputError(f"prompt: expected text or a sequence of token ids, got "
                                 f"{arr.dtype} {list(arr.shape)} (one sequence at a time)")
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

    def _lookahead(self, k: int, sampling: Sampling, capacity: int
                   ) -> tuple[PromptLookup, SharedCache | FunctionalCache]:
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

    cuts_cache = True  # whether _cache()'s caches can be cut back (prompt lookup needs it)

    def _cache(self, capacity: int) -> SharedCache | FunctionalCache:
        """One generation's cache: in place in shared max-length buffers of `capacity` tokens
        when the graph allows it, else `logits()`'s functional cache."""
        return SharedCache(self, capacity) if self._share else FunctionalCache(self)

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
