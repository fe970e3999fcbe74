"""Run an NPU artefact: static-shape QDQ graphs on Qualcomm's HTP through ONNX Runtime's QNN
execution provider (the `onnxruntime-qnn` plugin), with CPU fallback disabled.

numpy and onnxruntime only (no torch). The artefact holds two graphs compiled ahead of time into
EPContext models (the QNN context binary the HTP loads without recompiling): a prefill graph over a
fixed chunk of tokens and a decode graph over one token, both over a fixed-size cache. This module
drives them (`StaticDecoder`): a prompt runs chunk by chunk (the last chunk padded), the runtime
builds the attention mask from the positions and writes each step's new keys and values into its
cache at their positions. `NpuArtefact` adds the shared `generation.Artefact`'s tokenizer, sampling
and generation on top, so generate() / stream() behave as for the other backends.

On x86-64 the plugin's HTP library simulates the NPU on the CPU: times measured here are not
device times.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from splice.errors import ArtefactError, InputError
from .generation import Artefact
from .opening import check_config, checked_manifest, listed_file, require_sections

log = logging.getLogger(__name__)

# Snapdragon 8 Gen 3. On v68, the QNN EP's default, the simulated 16-bit x 8-bit MatMul came out a
# constant ~5 output steps off ONNX Runtime CPU (measured on a one-MatMul QDQ graph); on v73 and
# later it agrees to within a step
DEFAULT_ARCH = "75"
OPTIONS = ("expected_manifest_sha256", "htp_arch", "source")


class NpuUnavailable(InputError):
    """The QNN execution provider (the onnxruntime-qnn plugin) cannot be loaded here."""


@functools.cache
def qnn_devices() -> tuple[Any, str]:
    """Register the onnxruntime-qnn plugin once; returns (its EP devices, HTP backend path)."""
    try:
        import onnxruntime_qnn as q
    except ImportError as e:
        raise NpuUnavailable(f"the NPU backend needs the onnxruntime-qnn package ({e}); install "
                             "splice[npu]") from None
    name = q.get_ep_name()
    try:
        if not any(d.ep_name == name for d in ort.get_ep_devices()):
            ort.register_execution_provider_library(name, q.get_library_path())
    except Exception as e:  # onnxruntime raises its own types
        raise NpuUnavailable(f"onnxruntime {ort.__version__} cannot load the QNN plugin: "
                             f"{e}") from None
    devices = [d for d in ort.get_ep_devices() if d.ep_name == name]
    if not devices:
        raise NpuUnavailable("the QNN plugin registered but offers no device")
    return tuple(devices), q.get_qnn_htp_path()


def htp_session(model: str | Path | bytes, *, htp_arch: str = DEFAULT_ARCH,
                context_file: str | Path | None = None, embed: bool = False,
                fallback: bool = False) -> ort.InferenceSession:
    """An InferenceSession on the HTP. fallback=False (the default) makes ONNX Runtime refuse the
    model if any node would run on the CPU instead. With `context_file` the compiled graph is also
    written there as an EPContext model (its binary beside it, or inside when `embed`)."""
    devices, backend = qnn_devices()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not fallback:
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if context_file is not None:
        so.add_session_config_entry("ep.context_enable", "1")
        so.add_session_config_entry("ep.context_file_path", str(context_file))
        so.add_session_config_entry("ep.context_embed_mode", "1" if embed else "0")
    so.add_provider_for_devices(list(devices), {"backend_path": backend, "htp_arch": htp_arch})
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, so)


def build_mask(length: int, seq: int, context: int, window: int, fill: float) -> np.ndarray:
    """The additive mask [1, 1, seq, context + seq] for `seq` queries at positions length.. over
    the cache's `context` slots (filled up to `length`) and the `seq` new keys."""
    i = np.arange(seq)[:, None]
    pos_q = length + i
    j = np.arange(context)[None, :]
    ok_cache = np.broadcast_to(j < length, (seq, context))
    ok_new = np.arange(seq)[None, :] <= i
    if window:
        ok_cache = ok_cache & (pos_q - j < window)
        ok_new = ok_new & (i - np.arange(seq)[None, :] < window)
    ok = np.concatenate([ok_cache, ok_new], axis=1)
    return np.where(ok, 0.0, fill).astype(np.float32)[None, None]


Run = Callable[[dict[str, np.ndarray]], Sequence[np.ndarray]]


class NpuCache:
    """The fixed-size cache after `length` tokens: per layer key and value
    [1, kv_heads, context, head_dim] (float32; slots past `length` are unused)."""

    __slots__ = ("arrays", "length", "batch")

    def __init__(self, arrays: dict[str, np.ndarray], length: int):
        self.arrays = arrays
        self.length = length
        self.batch = 1

    def copy(self) -> NpuCache:
        return NpuCache({k: v.copy() for k, v in self.arrays.items()}, self.length)

    def __repr__(self) -> str:
        return f"NpuCache(layers={len(self.arrays) // 2}, length={self.length})"


class HostTable:
    """The embedding table the host gathers rows from: int8 codes with one float32 scale per row,
    stored [rows, width] ("rows") or transposed [width, rows] ("columns": a tied table shares the
    lm_head's codes). Calling it with ids gives their rows [n, width] in float32."""

    def __init__(self, codes: np.ndarray, scales: np.ndarray, layout: str = "rows"):
        if layout not in ("rows", "columns"):
            raise ValueError(f"table layout {layout!r}; accepted: rows, columns")
        self.codes, self.scales, self.layout = codes, scales, layout

    @classmethod
    def open(cls, path: Path, spec: Mapping[str, Any]) -> HostTable:
        """The table an artefact's io.embedding describes, mapped from its file (read lazily)."""
        rows, width, layout = int(spec["rows"]), int(spec["width"]), spec["layout"]
        shape = (rows, width) if layout == "rows" else (width, rows)
        f = path / spec["file"]
        return cls(np.memmap(f, np.int8, "r", int(spec["codes_offset"]), shape),
                   np.memmap(f, np.float32, "r", int(spec["scales_offset"]), (rows,)), layout)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        codes = self.codes[ids] if self.layout == "rows" else self.codes[:, ids].T
        return codes.astype(np.float32) * np.asarray(self.scales[ids], np.float32)[:, None]


class StaticDecoder:
    """Drives a prefill graph (`chunk` tokens) and a decode graph (1 token) over a cache of
    `context` slots. `runs` maps a sequence length to a function feeds -> outputs in the order
    `outputs` (logits, then new.{i}.key, new.{i}.value per layer). Where io has an `embedding`
    section the graphs take input_embeds, the rows `embed` (a HostTable) gathers for the ids."""

    def __init__(self, io: Mapping[str, Any], runs: Mapping[int, Run],
                 embed: Callable[[np.ndarray], np.ndarray] | None = None):
        if "embedding" in io and embed is None:
            raise ValueError("these graphs take input_embeds: give the HostTable as embed=")
        self.io = io
        self.embed = embed if "embedding" in io else None
        self.chunk, self.context = int(io["chunk"]), int(io["context"])
        self.fill = float(io["mask_fill"])
        self.windows = [int(w) for w in io["mask_windows"]]
        self.layers = io["layers"]
        self.outputs = ["logits"] + [n for layer in self.layers for n in (layer["new_key"],
                                                                          layer["new_value"])]
        self.runs = dict(runs)

    def empty(self) -> NpuCache:
        return NpuCache({layer[kv]: np.zeros((1, layer["kv_heads"], self.context,
                                              layer["head_dim"]), np.float32)
                         for layer in self.layers for kv in ("key", "value")}, 0)

    def feeds(self, ids: Sequence[int], cache: NpuCache, seq: int) -> dict[str, np.ndarray]:
        n = len(ids)
        padded = np.full(seq, ids[-1], np.int32)
        padded[:n] = ids
        pos = np.arange(cache.length, cache.length + seq, dtype=np.int32)
        first = ("input_ids", padded[None]) if self.embed is None else (
            "input_embeds", self.embed(padded)[None])
        feeds = dict([first], position_ids=pos[None], **cache.arrays)
        for w in self.windows:
            feeds["attention_mask" + (f".w{w}" if w else "")] = build_mask(
                cache.length, seq, self.context, w, self.fill)
        return feeds

    def step(self, ids: Sequence[int], cache: NpuCache) -> np.ndarray:
        """Run up to one graph's worth of `ids` after `cache` (updated in place); returns their
        logits [len(ids), vocab]."""
        n = len(ids)
        seq = 1 if n == 1 and 1 in self.runs else self.chunk
        if n > seq:
            raise InputError(f"{n} tokens in one step; the graph takes at most {seq}")
        if cache.length + n > self.context:
            raise InputError(f"{cache.length} cached + {n} new tokens exceed the NPU graph's "
                             f"context of {self.context} tokens")
        outs = self.runs[seq](self.feeds(ids, cache, seq))
        got = dict(zip(self.outputs, outs))
        for layer in self.layers:
            for kv in ("key", "value"):
                new = got[layer[f"new_{kv}"]]
                cache.arrays[layer[kv]][:, :, cache.length:cache.length + n] = new[:, :, :n]
        cache.length += n
        return got["logits"][0, :n]

    def forward(self, ids: Sequence[int], cache: NpuCache) -> np.ndarray:
        """Logits [len(ids), vocab] for any number of ids, chunk by chunk."""
        if cache.length + len(ids) > self.context:
            raise InputError(f"{cache.length} cached + {len(ids)} new tokens = "
                             f"{cache.length + len(ids)} exceed the NPU graph's context of "
                             f"{self.context} tokens")
        out = [self.step(ids[i:i + self.chunk], cache) for i in range(0, len(ids), self.chunk)]
        return np.concatenate(out, axis=0)


def session_runner(session: ort.InferenceSession, outputs: Sequence[str]) -> Run:
    names = list(outputs)
    return lambda feeds: session.run(names, feeds)


class NpuArtefact(Artefact):
    """A loaded NPU artefact: `logits()`, `generate()`, `stream()` as `Artefact`, run on the HTP.
    `session_s` holds the seconds each graph's session took to create."""

    cuts_cache = False  # the cache is updated in place and cannot be cut back yet

    def __init__(self, path: Path, manifest: dict, sessions: Mapping[int, ort.InferenceSession],
                 session_s: Mapping[int, float]):
        io = manifest["io"]
        self.sessions = dict(sessions)
        self.session_s = dict(session_s)
        embed = HostTable.open(path, io["embedding"]) if "embedding" in io else None
        self.decoder = StaticDecoder(io, {s: session_runner(sess, ["logits"] + [
            n for layer in io["layers"] for n in (layer["new_key"], layer["new_value"])])
            for s, sess in self.sessions.items()}, embed)
        # the graphs' context (the cache's slots), which the Artefact's prompt check reads
        super().__init__(path, manifest, max_position=self.decoder.context)

    def logits(self, ids: Any, past: NpuCache | None = None) -> tuple[np.ndarray, NpuCache]:
        """Logits [1, seq, vocab] for `ids` ([seq] or [1, seq]) after `past` (None: empty), and
        the cache that includes them. Batch 1: the graphs are static."""
        ids = self.check_ids(ids)
        if ids.shape[0] != 1:
            raise InputError(f"ids: the NPU graphs take batch 1, got batch {ids.shape[0]}")
        ids = ids[0]
        cache = self.decoder.empty() if past is None else past.copy()
        return self.decoder.forward([int(t) for t in ids], cache)[None], cache

    def _stepper(self, capacity: int) -> Callable[[np.ndarray], tuple[np.ndarray, int]]:
        """Generation's step function (ids [1, seq] -> logits, cache length): one fixed-size
        cache updated in place, whatever the capacity asked for."""
        cache = self.decoder.empty()

        def step(ids: np.ndarray) -> tuple[np.ndarray, int]:
            return self.decoder.forward([int(t) for t in ids[0]], cache)[None], cache.length
        return step


def _check_io(path: Path, manifest: dict) -> None:
    """The io section holds what StaticDecoder reads, of the right types: a hand-edited manifest
    fails here, naming the field, not with a KeyError in the middle of a generation."""
    require_sections(path, manifest, "config", "io")
    check_config(path, manifest, positive=("vocab_size",))
    io = manifest["io"]
    for key in ("chunk", "context"):
        if not isinstance(io.get(key), int) or isinstance(io[key], bool) or io[key] < 1:
            raise ArtefactError(f"artefact {path}: io.{key} is {io.get(key)!r}; expected a "
                                "positive integer")
    if not isinstance(io.get("mask_fill"), (int, float)) or not isinstance(
            io.get("mask_windows"), list):
        raise ArtefactError(f"artefact {path}: io.mask_fill / io.mask_windows are missing")
    layers = io.get("layers")
    keys = ("key", "value", "new_key", "new_value", "kv_heads", "head_dim")
    if not isinstance(layers, list) or not all(isinstance(x, dict) and all(k in x for k in keys)
                                               for x in layers):
        raise ArtefactError(f"artefact {path}: io.layers must list per-layer tables with "
                            f"{', '.join(keys)}")
    emb = io.get("embedding")
    if emb is not None:
        fields = ("rows", "width", "codes_offset", "scales_offset")
        if not isinstance(emb, dict) or emb.get("layout") not in ("rows", "columns") or not all(
                isinstance(emb.get(k), int) and not isinstance(emb[k], bool) and emb[k] >= 0
                for k in fields):
            raise ArtefactError(f"artefact {path}: io.embedding needs layout (rows or columns) "
                                f"and non-negative integers {', '.join(fields)}")
        size = (path / listed_file(path, manifest, emb.get("file"), "embedding table")).stat(
            ).st_size
        if max(emb["codes_offset"] + emb["rows"] * emb["width"],
               emb["scales_offset"] + 4 * emb["rows"]) > size:
            raise ArtefactError(f"artefact {path}: io.embedding reaches past the end of "
                                f"{emb['file']} ({size} bytes)")


def load(path: str | Path, *, expected_manifest_sha256: str | None = None,
         htp_arch: str | None = None, source: bool = False) -> NpuArtefact:
    """Check and open an NPU artefact: its EPContext models (compiled ahead of time) on the HTP,
    CPU fallback disabled. source=True compiles the QDQ source models instead (slower: the graph
    is prepared again)."""
    path, manifest = checked_manifest(path, backend="npu",
                                      expected_manifest_sha256=expected_manifest_sha256)
    return open_checked(path, manifest, htp_arch=htp_arch, source=source)


def open_checked(path: Path, manifest: dict, *, htp_arch: str | None = None,
                 source: bool = False) -> NpuArtefact:
    """Open an NPU artefact whose manifest `opening.checked_manifest` returned (`load`'s
    options)."""
    npu = manifest.get("npu")
    if not isinstance(npu, dict) or not isinstance(npu.get("graphs"), dict):
        raise ArtefactError(f"artefact {path}: the manifest has no npu.graphs section")
    _check_io(path, manifest)
    arch = htp_arch or npu.get("htp_arch", DEFAULT_ARCH)
    sessions, times = {}, {}
    for seq, g in npu["graphs"].items():
        if not (isinstance(seq, str) and seq.isdigit() and isinstance(g, dict)):
            raise ArtefactError(f"artefact {path}: npu.graphs[{seq!r}] is not a graph table "
                                "keyed by its sequence length")
        rel = listed_file(path, manifest, g.get("source" if source else "context"),
                          "graph file")
        t = time.perf_counter()
        try:
            sessions[int(seq)] = htp_session(path / rel, htp_arch=arch)
        except NpuUnavailable:
            raise
        except Exception as e:  # onnxruntime raises its own types
            raise ArtefactError(f"artefact {path}: the HTP cannot load {rel}: {e}") from None
        times[int(seq)] = time.perf_counter() - t
    return NpuArtefact(path, manifest, sessions, times)
