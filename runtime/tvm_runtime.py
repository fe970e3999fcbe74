"""Run a TVM artefact: the exported library (prefill and decode in TVM's Relax VM), its
parameters from safetensors, and a KV cache of fixed-capacity tensors that the library updates in
place. numpy, TVM's runtime and safetensors only; splice's own modules never import torch (the
tvm_ffi package imports torch itself when it happens to be installed, and runs without it).

Native code is checked before it is mapped: the library's bytes are read once, hashed, compared
with the manifest, written to a private temporary file and loaded from there, so the code that
runs is the code that was hashed even if the artefact directory changes meanwhile. An llvm
library for another architecture or for CPU features this machine lacks is refused up front
rather than crashing on its first instruction.

Generation (sampling, streaming, stop tokens, timings) is the shared `generation.Artefact`'s;
this module supplies `logits()` and the cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from splice.errors import ArtefactError, InputError
from .generation import Artefact, FunctionalCache
from .opening import check_config, checked_manifest, listed_file, require_sections
from .tvm_replay import DecodeReplay

log = logging.getLogger(__name__)

INITIAL_CAPACITY = 256  # cache positions allocated first; doubled whenever a step needs more
KEY_LAYOUT = ["batch", "kv_heads", "head_dim", "capacity"]  # keys transposed (attention.py)
VALUE_LAYOUT = ["batch", "kv_heads", "capacity", "head_dim"]
MACHINES = {"x86_64": ("x86_64", "amd64"), "aarch64": ("aarch64", "arm64")}
OPTIONS = ("expected_manifest_sha256", "threads", "device")


def load(path: str | Path, *, expected_manifest_sha256: str | None = None,
         threads: int | None = None, device: str | None = None) -> TVMArtefact:
    """Check and open the TVM artefact at `path`. threads: worker threads of TVM's pool (None:
    the manifest's). device: "cpu" or "cuda" (None: from the manifest's target)."""
    path, manifest = checked_manifest(path, backend="tvm",
                                      expected_manifest_sha256=expected_manifest_sha256)
    return open_checked(path, manifest, threads=threads, device=device)


def open_checked(path: Path, manifest: dict, *, threads: int | None = None,
                 device: str | None = None) -> TVMArtefact:
    """Open a TVM artefact whose manifest `opening.checked_manifest` returned (`load`'s
    options)."""
    import tvm
    import tvm.runtime.vm  # runtime-only TVM (TVM_USE_RUNTIME_LIB=1) does not import it

    require_sections(path, manifest, "config", "io", "tvm")
    check_config(path, manifest)
    section = manifest["tvm"]
    cache = section.get("cache") or {}
    if cache.get("key") != KEY_LAYOUT or cache.get("value") != VALUE_LAYOUT:
        raise ArtefactError(f"artefact {path}: KV cache layout {cache!r:.120}; this runtime reads "
                            f"keys {KEY_LAYOUT} and values {VALUE_LAYOUT}; recompile the artefact")
    _check_machine(path, section)
    threads = section.get("threads", 1) if threads is None else threads
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise InputError(f"threads={threads!r}; expected a positive integer")
    _configure_threads(tvm, min(threads, os.cpu_count() or 1))
    kind = device or ("cuda" if section.get("target_kind") == "cuda" else "cpu")
    if kind not in ("cpu", "cuda"):
        raise InputError(f"device={device!r}; accepted: 'cpu', 'cuda'")
    dev = tvm.cuda(0) if kind == "cuda" else tvm.cpu(0)
    lib, native = _load_library(tvm, path, manifest, section.get("library"),
                                pool_threads=min(threads, os.cpu_count() or 1)
                                if section.get("pool") == "splice" and kind == "cpu" else None)
    vm = tvm.runtime.vm.VirtualMachine(lib, dev)
    params = _load_params(tvm, path, manifest, section, dev)
    return TVMArtefact(path, manifest, vm, params, dev, native=native)


def _check_machine(path: Path, section: dict) -> None:
    """Refuse llvm code built for another architecture, or needing CPU features this host lacks
    (an AVX-512 library on an AVX2 machine would die with SIGILL, not an error)."""
    if section.get("target_kind") != "llvm":
        return
    arch = section.get("arch")
    here = platform.machine().lower()
    if arch not in MACHINES or here not in MACHINES[arch]:
        raise ArtefactError(f"artefact {path} was compiled for {arch!r}; this machine is {here!r}")
    needed = set(section.get("cpu_features") or ())
    if needed and arch == "x86_64":
        flags = cpu_flags()
        missing = sorted(f for f in needed if flags and f not in flags)
        if missing:
            raise ArtefactError(f"artefact {path} needs CPU features {missing} that this CPU "
                                "lacks; recompile it here (splice compile --backend tvm)")


def cpu_flags() -> set[str]:
    """This CPU's feature flags (/proc/cpuinfo; empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _configure_threads(tvm: Any, threads: int) -> None:
    """TVM sizes its pool from TVM_NUM_THREADS or half the logical CPUs; config_threadpool with
    an explicit CPU list resizes it (mode -3: the threads share all cores, unpinned, which is
    what a machine shared with other processes wants)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        list(range(os.cpu_count() or 1))
    tvm.get_global_func("runtime.config_threadpool")(-3, threads, [str(c) for c in
                                                                   cpus[:threads]])


def _load_library(tvm: Any, path: Path, manifest: dict, rel: Any, *,
                  pool_threads: int | None = None) -> tuple[Any, Any]:
    """The checked library, loaded, and its ctypes handle where splice's pool runs its parallel
    loops (`pool_threads`: with that many threads; backends/tvm/pool.c, linked into the
    library), else None."""
    rel = listed_file(path, manifest, rel, "the library")
    data = (path / rel).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest["files"][rel]:
        raise ArtefactError(f"artefact {path}: library {rel!r} has sha256 {digest}, not the "
                            f"manifest's {manifest['files'][rel]}; refusing to load native code")
    with tempfile.TemporaryDirectory(prefix="splice-tvm-") as tmp:
        private = Path(tmp) / "lib.so"
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o500)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            lib = tvm.runtime.load_module(str(private))
        except Exception as e:  # tvm raises its own error types for a library it cannot open
            raise ArtefactError(f"artefact {path}: TVM cannot load {rel}: {e}") from None
        native = None if pool_threads is None else _install_pool(path, private, pool_threads)
        return lib, native


def _install_pool(path: Path, library: Path, threads: int) -> Any:
    """Point the loaded library's parallel launches (the `__TVMBackendParallelLaunch` pointer
    TVM's loader set to its own pool) at splice's pool in the same library: a parallel loop
    costs ~0.3 us to start there against ~2.7 with TVM's pool at 2 threads (pool.c says why).
    The library's ctypes handle."""
    import ctypes

    try:  # the library TVM loaded (RTLD_NOLOAD: found by its path among those loaded)
        so = ctypes.CDLL(str(library), mode=os.RTLD_NOLOAD | os.RTLD_NOW)
        try:
            launch = ctypes.c_void_p.in_dll(so, "__TVMBackendParallelLaunch")
        except ValueError:
            return so  # no parallel loop in the library (unscheduled kernels): no pool
        if so.splice_pool_threads(ctypes.c_int(threads)) != 0:
            raise ValueError(f"{threads} threads refused")
        launch.value = ctypes.cast(so.splice_pool_launch, ctypes.c_void_p).value
        return so
    except (OSError, AttributeError, ValueError) as e:
        raise ArtefactError(f"artefact {path}: its library's thread pool cannot be installed "
                            f"({e}); recompile the artefact") from None


def _load_params(tvm: Any, path: Path, manifest: dict, section: dict, dev: Any) -> list:
    from safetensors.numpy import load_file

    rel = listed_file(path, manifest, section.get("params"), "the parameter file")
    arrays = load_file(str(path / rel))
    out = []
    for spec in section.get("param_list") or ():
        name = spec.get("name") if isinstance(spec, dict) else None
        a = arrays.get(name)
        if a is None or list(a.shape) != list(spec.get("shape", ())) or str(a.dtype) != \
                spec.get("dtype"):
            got = "missing" if a is None else f"{a.dtype}{list(a.shape)}"
            raise ArtefactError(f"artefact {path}: parameter {name!r} is {got}; the manifest "
                                f"lists {spec.get('dtype')}{spec.get('shape')}")
        out.append(tvm.runtime.tensor(a, dev))
    return out


class _Store:
    """The cache tensors (per layer a key [batch, kv_heads, head_dim, capacity], transposed, and
    a value [batch, kv_heads, capacity, head_dim]) and how many positions hold data. Several
    KVCache views share one store; the one whose length equals the store's may append in place,
    any other forks a copy first."""

    def __init__(self, tensors: list, length: int, capacity: int, array: Any):
        self.tensors, self.length, self.capacity = tensors, length, capacity
        self.array = array  # the same tensors as the one FFI array the VM is passed


class KVCache:
    """The cache after `length` tokens; pass it back to `TVMArtefact.logits`. `numpy()` copies
    out the filled positions under the decoder's names (past.{i}.key / .value)."""

    __slots__ = ("store", "length", "batch", "names")

    def __init__(self, store: _Store, length: int, batch: int, names: list[str]):
        self.store, self.length, self.batch, self.names = store, length, batch, names

    def numpy(self) -> dict[str, np.ndarray]:
        """The filled positions of every cache tensor in the IR's layout, [batch, kv_heads,
        length, head_dim]."""
        return {n: _positions(t.numpy(), i % 2 == 0, self.length)
                for i, (n, t) in enumerate(zip(self.names, self.store.tensors))}

    def __getitem__(self, name: str) -> np.ndarray:
        return self.numpy()[name]

    def __repr__(self) -> str:
        return (f"KVCache(layers={len(self.names) // 2}, batch={self.batch}, length={self.length}, "
                f"capacity={self.store.capacity})")


def _aligned_int64() -> np.ndarray:
    """A [1, 1] int64 array at a 64-byte boundary (what TVM's from_dlpack requires)."""
    buf = np.zeros(16, np.int64)
    start = (-buf.ctypes.data % 64) // 8
    return buf[start:start + 1].reshape(1, 1)


def _positions(a: np.ndarray, keys: bool, length: int) -> np.ndarray:
    """The first `length` positions of a stored cache tensor, as [batch, kv, length, hd]."""
    return a[:, :, :, :length].transpose(0, 1, 3, 2) if keys else a[:, :, :length]


class _GenerationCache(FunctionalCache):
    """One generation's cache, stepped through `TVMArtefact.logits` (in place) and cut back for
    prompt lookup in place too: the store forgets the positions from the cut on, and the next
    step writes over them (the kernels read the first `length` positions only). Safe because the
    generation loop holds the only view of its store: no other KVCache can see a position
    written after the cut as its own."""

    def _cut(self, c: KVCache, length: int) -> KVCache:
        c.store.length = length
        return KVCache(c.store, length, c.batch, c.names)


class TVMArtefact(Artefact):
    """A loaded TVM artefact: `logits()` runs prefill (several tokens) or decode (one) in the VM;
    generation and the tokenizer are the shared `generation.Artefact`'s."""

    def __init__(self, path: Path, manifest: dict, vm: Any, params: list, device: Any, *,
                 native: Any = None):
        super().__init__(path, manifest)
        import tvm

        self._tvm, self.vm, self.device = tvm, vm, device
        # one FFI array, made once: passing the Python list converted its hundreds of tensors
        # into a new array at every call (~20 us a decode step for SmolLM2's 272)
        self._params = tvm.runtime.convert(params)
        self._layers = manifest["io"]["past"]
        self._names = [layer[kv] for layer in self._layers for kv in ("key", "value")]
        self._shapes = [(layer["kv_heads"], layer["head_dim"]) for layer in self._layers
                        for _ in (0, 1)]
        section = manifest["tvm"]
        self.prefill_chunk = int(section.get("prefill_chunk", 256))
        cache = section.get("cache") or {}
        self._tile = int(cache.get("capacity_multiple", 1))
        self._cache_dtype = np.dtype(cache.get("dtype", "float32"))
        self._prefill, self._decode = vm["prefill"], vm["decode"]
        self._prefill_last = vm["prefill_last"] if "prefill_last" in section.get(
            "functions", ()) else None
        # one sequence's decode step reads its token and position from two numpy scalars that
        # TVM tensors share (zero copy, made once): a new TVM tensor costs ~35 us in Python
        self._cpu = device.dlpack_device_type() == 1  # kDLCPU: numpy shares its memory
        self._step_ids, self._step_pos = _aligned_int64(), _aligned_int64()
        self._step_args = (tvm.runtime.from_dlpack(self._step_ids),
                           tvm.runtime.from_dlpack(self._step_pos))
        # decode's batch when the artefact fixed it (CPU: one sequence); other batches' single
        # token steps run prefill, which takes any batch and length
        self._decode_batch = section.get("decode_batch")
        # a CPU library with splice's replay runs a store's decode steps without the VM
        self._replay = DecodeReplay(vm, native if self._cpu else None)

    def logits(self, ids: Any, past: KVCache | dict[str, np.ndarray] | None = None, *,
               last: bool = False) -> tuple[np.ndarray, KVCache]:
        """Logits [batch, seq, vocab] for `ids` ([seq] or [batch, seq]) after the cache `past`
        (None: an empty one), and the cache that includes them. Long inputs run in chunks of
        `prefill_chunk` tokens, which bounds the attention's working memory. `last`: the last
        position's logits only, [batch, 1, vocab] (the lm_head skips the other rows where the
        artefact has `prefill_last`)."""
        ids = self.check_ids(ids)
        b, s = ids.shape
        store, length = self._writable(past, b, s)
        out = []
        for start in range(0, s, self.prefill_chunk):
            chunk = np.ascontiguousarray(ids[:, start:start + self.prefill_chunk], np.int64)
            n = chunk.shape[1]
            fn = self._decode if n == 1 and self._decode_batch in (None, b) else \
                self._prefill_last if last and self._prefill_last is not None else self._prefill
            if b == 1 and n == 1 and self._cpu:
                self._step_ids[0, 0], self._step_pos[0, 0] = chunk[0, 0], length
                inputs = self._step_args
            else:
                pos = np.ascontiguousarray(np.broadcast_to(
                    np.arange(length, length + n, dtype=np.int64), (b, n)))
                inputs = (self._tvm.runtime.tensor(chunk, self.device),
                          self._tvm.runtime.tensor(pos, self.device))
            def run(inputs=inputs, length=length):
                return fn(*inputs, self._tvm.runtime.ShapeTuple([length]), store.array,
                          self._params)
            res = self._replay.step(store, length, run) if inputs is self._step_args \
                and fn is self._decode else run()
            out.append(np.from_dlpack(res).copy() if self._cpu
                       else res.numpy())  # the VM reuses its output's memory next call
            length += n
            store.length = length
        if last:
            logits = out[-1][:, -1:]
        else:
            logits = out[0] if len(out) == 1 else np.concatenate(out, axis=1)
        return logits, KVCache(store, length, b, self._names)

    def _stepper(self, capacity: int):
        """One generation's steps: the prompt's through `logits(last=True)` (generation reads
        its last row only), the rest as `_cache`'s."""
        cache = self._cache(capacity)

        def step(ids: np.ndarray) -> tuple[np.ndarray, int]:
            if cache.cache is not None:
                return cache.step(ids)
            logits, cache.cache = self.logits(ids, None, last=True)
            return logits, cache.cache.length
        return step

    def _cache(self, capacity: int) -> _GenerationCache:
        return _GenerationCache(self)

    def _writable(self, past: Any, batch: int, new: int) -> tuple[_Store, int]:
        """A store that can take `new` more positions after the cache's: the cache's own when it
        is the latest view of it and has room, else a copy (forked or grown)."""
        if past is None:
            return self._alloc(batch, new, None, 0), 0
        if isinstance(past, KVCache):
            if past.batch != batch:
                raise InputError(f"the cache holds batch {past.batch}, the ids batch {batch}")
            length = past.length
            if length + new > self.max_position:
                raise InputError(f"{length} cached + {new} new tokens = {length + new} exceed "
                                 f"the model's context of {self.max_position} tokens")
            store = past.store
            if store.length == length and length + new <= store.capacity:
                return store, length
            old = [_positions(t.numpy(), i % 2 == 0, length)
                   for i, t in enumerate(store.tensors)]
            return self._alloc(batch, length + new, old, store.capacity), length
        arrays = self._check_past(past, batch)
        length = arrays[0].shape[2]
        if length + new > self.max_position:
            raise InputError(f"{length} cached + {new} new tokens = {length + new} exceed the "
                             f"model's context of {self.max_position} tokens")
        return self._alloc(batch, length + new, arrays, 0), length

    def _check_past(self, past: Any, batch: int) -> list[np.ndarray]:
        arrays, length = [], None
        for name, (kv, hd) in zip(self._names, self._shapes):
            a = past.get(name) if isinstance(past, dict) else None
            if a is None:
                raise InputError(f"past: no {name!r}; expected a KVCache or a dict with "
                                 f"{len(self._names)} arrays past.{{i}}.key/value")
            a = np.asarray(a, dtype=self._cache_dtype)
            if a.ndim != 4 or a.shape[:2] != (batch, kv) or a.shape[3] != hd or (
                    length is not None and a.shape[2] != length):
                raise InputError(f"past {name!r} has shape {list(a.shape)}; expected [{batch}, "
                                 f"{kv}, past, {hd}] with one past length for all layers")
            length = a.shape[2]
            arrays.append(a)
        return arrays

    def _alloc(self, batch: int, needed: int, old: list[np.ndarray] | None,
               old_capacity: int) -> _Store:
        """A new store for `needed` positions holding `old` (IR layout, [b, kv, length, hd]):
        capacity doubles from INITIAL_CAPACITY, capped at the context, and is a whole number of
        the attention's key tiles (a padded tile must read inside the cache)."""
        capacity = min(max(needed, 2 * old_capacity, INITIAL_CAPACITY), self.max_position)
        capacity = -(-capacity // self._tile) * self._tile
        length = 0 if old is None else old[0].shape[2]
        tensors = []
        for i, (kv, hd) in enumerate(self._shapes):
            a = np.zeros((batch, kv, capacity, hd), self._cache_dtype)
            if old is not None:
                a[:, :, :length] = old[i]
            if i % 2 == 0:
                a = np.ascontiguousarray(a.transpose(0, 1, 3, 2))
            tensors.append(self._tvm.runtime.tensor(a, self.device))
        # converted once: a list would become a new FFI array at every step
        return _Store(tensors, length, capacity, self._tvm.runtime.convert(tensors))
