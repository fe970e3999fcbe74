"""Run an ONNX artefact on ONNX Runtime: the session, logits with a KV cache; generation,
streaming and the tokenizer are the shared `generation.Artefact`'s.

numpy, onnxruntime and the tokenizers library only: no torch, so this runs on an edge device.
`load` checks the artefact (opening.py) before ONNX Runtime reads a byte of the model.

The cache is kept as ONNX Runtime values between steps (`run_with_ort_values`): a step's present
key/value tensors are fed straight back as the next step's past without a round trip through numpy.
Only the logits are copied out. A standard-ops graph concatenates past and new keys itself, so
each step copies the cache once inside ONNX Runtime. A contrib graph whose attentions are all
GroupQueryAttention (the manifest's io.share_buffer) takes an attention_mask and writes the new
keys in place: generation then binds one max-length buffer per cache tensor as both past and
present (IO binding), so a decode step copies nothing but its logits. `logits()` keeps the
functional form (a new cache per call) for every artefact. On the CUDA provider the cache stays on
the device: `logits()` binds the present outputs to it and feeds them back as they are, and the
in-place buffers are allocated there; only ids in and logits out cross to the host. The cache's
dtype is the graph's (float16 for a cuda artefact).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from splice.errors import ArtefactError, InputError
from .generation import Artefact, FunctionalCache
from .opening import check_config, checked_manifest, listed_file, require_sections
from .session import providers_for, session_options, session_section
from .shared_cache import SharedCache

__all__ = ["KVCache", "OnnxArtefact", "load", "open_checked"]

OPTIONS = ("expected_manifest_sha256", "providers", "graph_optimization", "threads", "spinning")


def load(path: str | Path, *, expected_manifest_sha256: str | None = None,
         providers: Sequence[str] | None = None, graph_optimization: bool | str | None = None,
         threads: int | None = None, spinning: bool | None = None) -> OnnxArtefact:
    """Check and open the ONNX artefact at `path`.

    expected_manifest_sha256 pins the manifest (and through its hashes every file). providers
    defaults to the manifest's, less those this onnxruntime lacks. graph_optimization: None for the
    manifest's level, True/False for all/none, or "disable", "basic", "extended", "all".
    threads: intra-op threads (None: the manifest's). spinning: whether idle intra-op threads
    spin between ops (None: the manifest's; ONNX Runtime's default is on, which is fastest on
    cores of one's own and slow where other processes want them)."""
    path, manifest = checked_manifest(path, backend="onnx",
                                      expected_manifest_sha256=expected_manifest_sha256)
    return open_checked(path, manifest, providers=providers,
                        graph_optimization=graph_optimization, threads=threads, spinning=spinning)


def open_checked(path: Path, manifest: dict, *, providers: Sequence[str] | None = None,
                 graph_optimization: bool | str | None = None, threads: int | None = None,
                 spinning: bool | None = None) -> OnnxArtefact:
    """Open an ONNX artefact whose manifest `opening.checked_manifest` returned (`load`'s
    options)."""
    require_sections(path, manifest, "config", "io", "onnx")
    model = listed_file(path, manifest, manifest["onnx"].get("model"), "the model file")
    session_cfg = session_section(path, manifest)
    options = session_options(session_cfg, graph_optimization, threads, spinning)
    chosen = providers_for(session_cfg, providers)
    try:
        session = ort.InferenceSession(str(path / model), options, providers=chosen)
    except Exception as e:  # onnxruntime raises its own exception types per failure
        raise ArtefactError(f"artefact {path}: ONNX Runtime cannot load {model}: {e}") from None
    _check_sections(path, manifest, session)
    return OnnxArtefact(path, manifest, session)


def _check_sections(path: Path, manifest: dict, session: ort.InferenceSession) -> None:
    """The config and io sections hold what OnnxArtefact reads, of the right types, and the io
    names are the model's own inputs and outputs: a manifest edited by hand fails here with its
    defect named, not later with a KeyError or an ONNX Runtime error in a generation."""
    def bad(what: str) -> ArtefactError:
        return ArtefactError(f"artefact {path}: the manifest's {what}")

    check_config(path, manifest)
    io = manifest["io"]
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

    def cut(self, length: int) -> KVCache:
        """The cache's first `length` positions (a copy)."""
        return KVCache({name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(
            v.numpy()[:, :, :length])) for name, v in self.values.items()}, length, self.batch)

    def __repr__(self) -> str:
        return f"KVCache(layers={len(self.values) // 2}, batch={self.batch}, length={self.length})"


class OnnxArtefact(Artefact):
    """A loaded ONNX artefact: `logits()` runs its ONNX Runtime `session`; generation and the
    tokenizer are the shared `Artefact`'s."""

    def __init__(self, path: Path, manifest: dict, session: ort.InferenceSession):
        super().__init__(path, manifest)
        self.session = session
        io = manifest["io"]
        self._ids_name, self._pos_name = io["input_ids"], io["position_ids"]
        self._mask_name = io.get("attention_mask")
        self._share = bool(io.get("share_buffer")) and self._mask_name is not None
        self._layers = io["past"]
        self._outputs = [io["logits"]] + [n for layer in self._layers
                                          for n in (layer["present_key"], layer["present_value"])]
        self._feed_of = {layer[f"present_{kv}"]: layer[kv] for layer in self._layers
                         for kv in ("key", "value")}
        # on the CUDA provider the cache lives on the device between steps (IO binding); its
        # dtype is the graph's (a cuda artefact's cache is float16)
        self._device = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        past_type = {i.name: i.type for i in session.get_inputs()}.get(
            self._layers[0]["key"] if self._layers else "", "tensor(float)")
        self._cache_dtype = np.float16 if past_type == "tensor(float16)" else np.float32

    # -- one forward step ----------------------------------------------------------------------
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
        if self._device == "cpu":
            outs = self.session.run_with_ort_values(self._outputs, feeds)
        else:  # the logits come to the host, the present cache stays on the device
            binding = self.session.io_binding()
            for name, value in feeds.items():
                binding.bind_ortvalue_input(name, value)
            binding.bind_output(self._outputs[0], "cpu")
            for name in self._outputs[1:]:
                binding.bind_output(name, self._device)
            self.session.run_with_iobinding(binding)
            outs = binding.get_outputs()
        present = {self._feed_of[name]: v for name, v in zip(self._outputs[1:], outs[1:])}
        return np.asarray(outs[0].numpy(), np.float32), KVCache(present, past_len + s, b)

    def _ortvalue(self, arr: np.ndarray) -> ort.OrtValue:
        """A cache tensor where the session keeps it (host or device)."""
        if self._device == "cpu":
            return ort.OrtValue.ortvalue_from_numpy(arr)
        return ort.OrtValue.ortvalue_from_numpy(arr, self._device, 0)

    def _past_feeds(self, past, batch: int) -> tuple[dict[str, ort.OrtValue], int]:
        if past is None:
            return {layer[kv]: self._ortvalue(np.zeros(
                        (batch, layer["kv_heads"], 0, layer["head_dim"]), self._cache_dtype))
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
                arr = np.ascontiguousarray(arr, dtype=self._cache_dtype)
                want = (batch, layer["kv_heads"], arr.shape[2] if arr.ndim == 4 else -1,
                        layer["head_dim"])
                if arr.shape != want or (length is not None and arr.shape[2] != length):
                    raise InputError(f"past {layer[kv]!r} has shape {list(arr.shape)}; expected "
                                     f"[{batch}, {layer['kv_heads']}, past, {layer['head_dim']}] "
                                     "with one past length for all layers")
                length = arr.shape[2]
                feeds[layer[kv]] = self._ortvalue(arr)
        return feeds, int(length or 0)

    def _cache(self, capacity: int) -> SharedCache | FunctionalCache:
        """One generation's cache: in place in shared max-length buffers of `capacity` tokens
        when the graph allows it, else `logits()`'s functional cache (cut back by copying)."""
        return SharedCache(self, capacity) if self._share else FunctionalCache(self)
