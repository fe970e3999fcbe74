"""Run a GGUF artefact through llama.cpp (llama-cpp-python): `load(path)` checks the artefact and
returns a `GGUFArtefact` with the same `logits()`, `generate()`, `stream()` as every artefact.

llama.cpp keeps the KV cache inside its context; a cache handle here is the list of tokens that
context holds. `logits(ids, past)` continues the context when `past` is what it holds and
re-evaluates `past` first otherwise, so the functional form of `logits()` stays correct (and is
fast in the usual sequential use). Generation drives the context directly, one step per call;
cutting the cache back (prompt lookup) is dropping its tail positions, which llama.cpp's
`eval` does before the next batch. The context holds `n_ctx` positions (default the model's
context, at most 2048: every position keeps a row of logits, [n_ctx, vocab] float32) and the
KV cache in `kv_type` (the manifest's, f32 by default so that llama.cpp's cache rounds nothing
that splice's interpreter keeps).

llama.cpp's messages at warning level and above while it loads the file are kept in
`load_warnings` (and logged), so a file llama.cpp complains about is visible. numpy and
llama-cpp-python only: no torch.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Any

import numpy as np

from splice.errors import ArtefactError, InputError
from .generation import Artefact
from .opening import check_config, checked_manifest, listed_file, require_sections

log = logging.getLogger(__name__)

MAX_DEFAULT_CTX = 2048
KV_TYPES = {"f32": 0, "f16": 1}  # ggml_type
WARN = 3  # ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
_messages: list[tuple[int, str]] = []
_callback = None  # the ctypes callback must outlive every call into llama.cpp


def _install_log_hook(llama_cpp: Any) -> None:
    """Route llama.cpp's log through here (llama-cpp-python prints it to stderr otherwise)."""
    global _callback
    if _callback is not None:
        return
    last = [0]

    def hook(level: int, text: bytes, user_data: Any) -> None:
        level = last[0] if level == 5 else level
        last[0] = level
        if level >= WARN:
            _messages.append((level, text.decode("utf-8", errors="replace")))

    _callback = llama_cpp.llama_log_callback(hook)
    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))


OPTIONS = ("expected_manifest_sha256", "threads", "n_ctx", "kv_type")


def load(path: str | Path, *, expected_manifest_sha256: str | None = None,
         threads: int | None = None, n_ctx: int | None = None,
         kv_type: str | None = None) -> GGUFArtefact:
    """Check and open the GGUF artefact at `path`. threads: llama.cpp's threads (None: the
    manifest's). n_ctx: context positions (None: the model's, at most 2048). kv_type: "f32" or
    "f16" (None: the manifest's)."""
    path, manifest = checked_manifest(path, backend="gguf",
                                      expected_manifest_sha256=expected_manifest_sha256)
    return open_checked(path, manifest, threads=threads, n_ctx=n_ctx, kv_type=kv_type)


def open_checked(path: Path, manifest: dict, *, threads: int | None = None,
                 n_ctx: int | None = None, kv_type: str | None = None) -> GGUFArtefact:
    """Open a GGUF artefact whose manifest `opening.checked_manifest` returned (`load`'s
    options)."""
    try:
        import llama_cpp
    except ImportError:
        raise ArtefactError("running a gguf artefact needs llama-cpp-python (`make llama` "
                            "installs it); any llama.cpp build can also load its model.gguf "
                            "directly") from None
    require_sections(path, manifest, "config", "gguf")
    check_config(path, manifest)
    rel = listed_file(path, manifest, manifest["gguf"].get("file"), "the model file")
    defaults = manifest.get("runtime") if isinstance(manifest.get("runtime"), dict) else {}
    threads = defaults.get("threads", 2) if threads is None else threads
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise InputError(f"threads={threads!r}; expected a positive integer")
    kv_type = defaults.get("kv_type", "f32") if kv_type is None else kv_type
    if kv_type not in KV_TYPES:
        raise InputError(f"kv_type={kv_type!r}; accepted: {', '.join(KV_TYPES)}")
    ctx_max = int(manifest["config"]["max_position"])
    n_ctx = min(ctx_max, MAX_DEFAULT_CTX) if n_ctx is None else n_ctx
    if not isinstance(n_ctx, int) or isinstance(n_ctx, bool) or not 1 <= n_ctx <= ctx_max:
        raise InputError(f"n_ctx={n_ctx!r}; expected an integer in 1..{ctx_max}")
    _install_log_hook(llama_cpp)
    start = len(_messages)
    try:
        llm = llama_cpp.Llama(str(path / rel), n_ctx=n_ctx, n_batch=min(512, n_ctx),
                              n_ubatch=min(512, n_ctx), n_threads=threads,
                              n_threads_batch=threads, logits_all=True, verbose=False,
                              type_k=KV_TYPES[kv_type], type_v=KV_TYPES[kv_type],
                              flash_attn=False, n_gpu_layers=0)
    except Exception as e:  # llama-cpp-python raises ValueError/RuntimeError for a bad file
        detail = "".join(t for _, t in _messages[start:]).strip()
        raise ArtefactError(f"artefact {path}: llama.cpp cannot load {rel}: {e}"
                            + (f" ({detail[-300:]})" if detail else "")) from None
    warnings = [t.strip() for _, t in _messages[start:] if t.strip()]
    for w in warnings:
        log.warning("llama.cpp: %s", w)
    art = GGUFArtefact(path, manifest, llm, n_ctx)
    art.load_warnings = warnings
    return art


class GGUFCache:
    """The tokens a llama.cpp context holds after `length` positions (batch 1)."""

    __slots__ = ("tokens", "length", "batch")

    def __init__(self, tokens: list[int]):
        self.tokens = tokens
        self.length = len(tokens)
        self.batch = 1

    def __repr__(self) -> str:
        return f"GGUFCache(length={self.length})"


class _Context:
    """One generation's cache: the context itself, stepped and cut back in place."""

    def __init__(self, art: GGUFArtefact):
        self.llm = art.llm
        self.llm.reset()

    def step(self, ids: np.ndarray) -> tuple[np.ndarray, int]:
        start = self.llm.n_tokens
        self.llm.eval([int(t) for t in ids[0]])
        return self.llm.scores[start:self.llm.n_tokens][None].copy(), self.llm.n_tokens

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.llm.n_tokens:
            raise InputError(f"cannot cut a cache of {self.llm.n_tokens} positions to {length}")
        self.llm.n_tokens = length  # llama.cpp drops the positions past it before the next eval


class GGUFArtefact(Artefact):
    """A loaded GGUF artefact; generation is the shared `Artefact`'s, the forward pass
    llama.cpp's. `llm` is the llama_cpp.Llama object, for anything beyond this interface."""

    cuts_cache = True

    def __init__(self, path: Path, manifest: dict, llm: Any, n_ctx: int):
        super().__init__(path, manifest, max_position=n_ctx)
        self.llm = llm
        if int(llm.n_vocab()) != self.vocab_size:
            raise ArtefactError(f"artefact {path}: llama.cpp reads {llm.n_vocab()} tokens, the "
                                f"manifest says {self.vocab_size}")
        self.load_warnings: list[str] = []

    def logits(self, ids: Any, past: GGUFCache | None = None) -> tuple[np.ndarray, GGUFCache]:
        """Logits [batch, seq, vocab] for `ids` after `past` (None: an empty cache). Batches are
        run one row after another (with no past)."""
        ids = self.check_ids(ids)
        b, s = ids.shape
        if past is not None and not isinstance(past, GGUFCache):
            raise InputError(f"past: expected the GGUFCache a previous logits() returned, got "
                             f"{type(past).__name__}")
        if b > 1 or (past is not None and past.batch != 1):
            if past is not None:
                raise InputError("a gguf artefact continues one sequence at a time; give ids "
                                 "[1, seq] with a cache")
            rows = [self.logits(row[None])[0] for row in ids]
            cache = GGUFCache(ids[-1].tolist())
            cache.batch = b  # not continuable: llama.cpp's context held one row at a time
            return np.concatenate(rows), cache
        before = list(past.tokens) if past is not None else []
        if len(before) + s > self.max_position:
            raise InputError(f"{len(before)} cached + {s} new tokens = {len(before) + s} exceed "
                             f"the context of {self.max_position} tokens")
        llm = self.llm
        held = llm.n_tokens
        if held < len(before) or llm.input_ids[:len(before)].tolist() != before:
            llm.reset()
            if before:
                llm.eval(before)
        else:
            llm.n_tokens = len(before)
        new = [int(t) for t in ids[0]]
        llm.eval(new)
        out = llm.scores[len(before):len(before) + s][None].copy()
        return out, GGUFCache(before + new)

    def _cache(self, capacity: int) -> _Context:
        return _Context(self)

    def _stepper(self, capacity: int):
        return _Context(self).step

    def close(self) -> None:
        """Free llama.cpp's model and context now (they are freed with the object otherwise)."""
        close = getattr(self.llm, "close", None)
        if close is not None:
            close()

    def __repr__(self) -> str:
        return f"GGUFArtefact({self.path}, {self.config.get('architecture')}, gguf/cpu)"
