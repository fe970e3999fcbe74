"""One parse of a GGUF file per import.

transformers' GGUF import calls `load_gguf_checkpoint` once for the config, once for the
tokenizer and once for the weights, and each call builds its own `gguf.GGUFReader`, which
parses every metadata field into numpy arrays (SmolLM2-135M's 49k-token vocabulary and its
merges: seconds each time). Its `get_gguf_hf_weights_map` then recurses into every submodule
and builds gguf's TensorNameMap (some 2000 patterns) afresh at each one, 397 times for SmolLM2.
Together that is about half of importing SmolLM2-135M, paid by every `splice compile`.

`parse_once()` is a context manager for the length of one import: inside it,
`gguf.GGUFReader(path)` gives the reader already built for the same file (same resolved path,
size and modification time; read-only maps only), and `gguf.get_tensor_name_map` is memoised per
(architecture, block count). Both results are only read once built (transformers reads a
reader's fields and tensors; a TensorNameMap answers get_name), so the import gives the same
module; the tests compare it with one made outside the context. Leaving the context restores
both functions and drops the readers with their memory maps. Contexts nest (the inner one
shares the outer one's readers). Patching a library for the length of one call is the exception
in splice; the alternative would be a copy of transformers' GGUF loader.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

_active = 0  # nesting depth of parse_once


@contextlib.contextmanager
def parse_once() -> Iterator[None]:
    """Within the context, one GGUFReader per file and one TensorNameMap per (architecture,
    block count); see the module docstring."""
    global _active
    import gguf

    _active += 1
    if _active > 1:  # inside another parse_once (this thread's, or another's: counted either way)
        try:
            yield
        finally:
            _active -= 1
        return
    plain_reader, plain_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple, object] = {}

    def reader(path, mode="r"):
        if mode != "r":  # a writable map is not shared
            return plain_reader(path, mode)
        try:
            real = os.path.realpath(os.fspath(path))
            st = os.stat(real)
            key = (real, st.st_size, st.st_mtime_ns)
        except (OSError, TypeError):  # let the real reader report what is wrong
            return plain_reader(path, mode)
        if key not in readers:
            readers[key] = plain_reader(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(plain_map)
    try:
        yield
    finally:
        _active -= 1
        gguf.GGUFReader, gguf.get_tensor_name_map = plain_reader, plain_map
        readers.clear()
