"""In-place KV cache for generation: one max-length buffer per cache tensor, bound as both the
past input and the present output of its layer (ONNX Runtime IO binding).

Only for artefacts whose manifest says io.share_buffer (every attention lowered to
GroupQueryAttention, which takes an attention_mask and writes the new keys at the mask's length):
a decode step then moves no cache bytes, where the functional path copies the whole cache into a
new present tensor every step. numpy and onnxruntime only, like the rest of the runtime.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

from splice.errors import InputError


class SharedCache:
    """One generation's KV cache as max-length buffers bound (IO binding) as both the past input
    and the present output of each layer: GroupQueryAttention appends the new keys in place, so a
    step moves no cache bytes. The attention_mask's width tells the graph the current length."""

    def __init__(self, art: Any, capacity: int):
        self.art = art
        self.binding = art.session.io_binding()
        self.logits: dict[int, ort.OrtValue] = {}  # by query length: one for all decode steps
        self.buffers = []
        for layer in art._layers:
            for kv in ("key", "value"):
                buf = art._ortvalue(np.zeros((1, layer["kv_heads"], capacity, layer["head_dim"]),
                                             art._cache_dtype))  # on the session's device
                self.binding.bind_ortvalue_input(layer[kv], buf)
                self.binding.bind_ortvalue_output(layer[f"present_{kv}"], buf)
                self.buffers.append(buf)
        self.capacity = capacity
        self.length = 0

    def step(self, ids: np.ndarray) -> tuple[np.ndarray, int]:
        s = ids.shape[1]
        total = self.length + s
        if total > self.capacity:
            raise InputError(f"{total} tokens exceed this generation's cache of {self.capacity}")
        b = self.binding
        b.bind_cpu_input(self.art._ids_name, np.ascontiguousarray(ids, dtype=np.int64))
        b.bind_cpu_input(self.art._pos_name, np.arange(self.length, total, dtype=np.int64)[None])
        b.bind_cpu_input(self.art._mask_name, np.ones((1, total), np.int64))
        out = self.logits.get(s)
        if out is None:
            out = self.logits[s] = ort.OrtValue.ortvalue_from_numpy(
                np.empty((1, s, self.art.vocab_size), np.float32))
        b.bind_ortvalue_output(self.art._outputs[0], out)
        self.art.session.run_with_iobinding(b)
        self.length = total
        return out.numpy().copy(), total  # numpy() views the buffer the next step overwrites

    def truncate(self, length: int) -> None:
        """Forget the positions from `length` on: the next step writes over them (the mask's
        width tells the graph where the cache ends, so nothing needs clearing)."""
        if not 0 <= length <= self.length:
            raise InputError(f"cannot cut a cache of {self.length} positions to {length}")
        self.length = length
