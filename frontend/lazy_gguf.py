"""Lazy GGUF: a .gguf file bound to the IR without dequantizing it.

`load_gguf_lazy(path)` returns the module `hf.load_gguf(path)` returns (the same graph text,
config and tokenizer) but with every weight left in the file: `Module.weights` is a
`frontend.lazy.LazyWeights` whose entries are `GGUFTensorRef`s, each of which reads ONE GGUF
tensor when a pass or a backend asks for it and keeps nothing. It is what layer-by-layer
compilation (`splice.compile(..., layerwise=True)`) starts from for a GGUF file.

Exactness. The eager path has transformers dequantize the whole file
(`modeling_gguf_pytorch_utils.load_gguf_checkpoint`): each tensor goes through
`gguf.dequantize`, then the architecture's `TENSOR_PROCESSORS` entry (LLaMA's q/k rows are
un-permuted from llama.cpp's interleaved RoPE pairs; Gemma's norms have 1 subtracted), then
`torch.from_numpy(...).to(float32)`, under the name `get_gguf_hf_weights_map` gives it. A ref
runs those same transformers functions on that one tensor, on the same bytes typed the way
`gguf.GGUFReader` types them, so each weight equals the eager one bit for bit (tests check it
on random models of every supported family stored in F32, F16, BF16, Q8_0, Q4_0 and Q4_1, and
on the embedded SmolLM2-135M Q4_1).
Nothing of transformers' is copied: the processor objects and the name map are its own. A
processor that is not a function of one tensor (the MoE ones that merge experts into shared
results) is refused when a ref finds it out; no family splice supports uses one.

Everything else is shared with the safetensors frontend (frontend/lazy.py): the config comes
from the GGUF metadata through `AutoConfig.from_pretrained(folder, gguf_file=name)` (which reads
the metadata only), the model is built on the meta device (`meta_model`), and the family
converter is replayed with a recorder to bind canonical names to model parameters
(`bind_lazy`); a parameter name leads to its GGUF tensor through the inverted name map. The
tokenizer is built as `load_gguf` builds it.

Reading. The tensor table is parsed once with `gguf.GGUFReader`, which memory-maps the file;
only the offsets, sizes, types and shapes are kept and the map is dropped. A ref then reads its
bytes with a positioned file read into memory it owns, so no mapped page stays in the resident
set. A row range of a tensor whose processor is the identity (Phi-3's fused qkv_proj) reads
and dequantizes only those rows (quantization blocks never cross a row); otherwise the whole
tensor is processed and the rows are copied out.

Cost. Importing SmolLM2-135M takes about as long as `load_gguf` does without the
dequantization, most of it in parsing the metadata (a 49k-token vocabulary): our tensor table,
the config, the processor's config dict and the tokenizer each ask transformers or gguf for it,
and gguf_once.parse_once makes that one parse of the file (and one gguf TensorNameMap, which
transformers' name map otherwise rebuilds at each of SmolLM2's 397 modules); reading all 272
weights takes ~0.7 s.

Refused, each with a FrontendError naming what was wrong and what is accepted: a path that is
not a file, a file that is not GGUF (magic), a truncated or corrupt file, big-endian files, an
architecture transformers or splice does not import, a tensor the model needs that the file
lacks or sizes differently, a tensor type the gguf package cannot dequantize, integer tensors
(I8..I64) where float weights belong, and NaN or infinite weights (read before the tokenizer).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from splice.errors import FrontendError
from splice.ir.core import Module
from .finite import check_finite
from .gguf_once import parse_once
from .lazy import RowRange, _first_line, bind_lazy, meta_model, read_bytes, read_each

logger = logging.getLogger(__name__)

__all__ = ["GGUFTensorRef", "gguf_source", "load_gguf_lazy"]


@dataclasses.dataclass(frozen=True)
class GGUFTensorRef(RowRange):
    """One GGUF tensor: where its bytes lie, how gguf's reader types them (`raw_dtype`,
    `raw_shape`: float values, or uint8 quantization blocks per row), its ggml type, its shape
    once dequantized (`shape`, torch order), and transformers' processor for the architecture,
    applied to it by name. `rows`, a range [row0, row1) of the first dim, selects rows of the
    processed tensor. Loads give float32, as transformers' GGUF loader does."""

    path: Path
    name: str
    offset: int
    nbytes: int
    ggml_type: int
    raw_dtype: np.dtype
    raw_shape: tuple[int, ...]
    shape: tuple[int, ...]
    processor: Any = dataclasses.field(repr=False)
    rows: tuple[int, int] | None = None

    @property
    def out_dtype(self) -> torch.dtype:
        return torch.float32

    def load(self) -> torch.Tensor:
        """Read, dequantize and process the tensor (or its rows) into a float32 tensor the
        caller owns."""
        if self.rows is not None and self._rows_alone():
            r0, r1 = self.rows
            row = self.nbytes // self.raw_shape[0]
            raw = self._read(self.offset + r0 * row, (r1 - r0) * row, (r1 - r0,
                                                                       *self.raw_shape[1:]))
            return self._to_torch(_dequantize(raw, self.ggml_type))
        raw = self._read(self.offset, self.nbytes, self.raw_shape)
        result = self.processor.process(weights=_dequantize(raw, self.ggml_type), name=self.name,
                                        tensor_key_mapping={}, parsed_parameters={"tensors": {}})
        if result.name != self.name:
            raise FrontendError(f"{self.path}: transformers' {type(self.processor).__name__} "
                                f"does not process {self.name} one tensor at a time, so it "
                                "cannot be loaded lazily; use load_gguf")
        t = self._to_torch(result.weights)
        if tuple(t.shape) != self.shape:
            raise FrontendError(f"{self.path}: {self.name} came out of transformers' "
                                f"{type(self.processor).__name__} as {list(t.shape)}, not "
                                f"{list(self.shape)}")
        return t if self.rows is None else t[self.rows[0]:self.rows[1]].clone()

    def _rows_alone(self) -> bool:
        """Rows can be read on their own: the processor leaves every tensor as it is (it does
        not override TensorProcessor.process) and dim 0 is a row of whole blocks."""
        from transformers.modeling_gguf_pytorch_utils import TensorProcessor

        return (type(self.processor).process is TensorProcessor.process
                and len(self.raw_shape) >= 2 and self.raw_shape[0] == self.shape[0])

    def _read(self, start: int, count: int, shape: tuple[int, ...]) -> np.ndarray:
        buf = read_bytes(self.path, start, count, f"tensor {self.name}")
        return np.frombuffer(buf, dtype=self.raw_dtype).reshape(shape)

    @staticmethod
    def _to_torch(weights: np.ndarray) -> torch.Tensor:
        # what load_gguf_checkpoint does (torch.from_numpy of a copy, then the float32 cast);
        # the copy is skipped where the array already is fresh, writable, contiguous memory
        if not (weights.flags.writeable and weights.flags.c_contiguous):
            weights = np.copy(weights)
        t = torch.from_numpy(weights)
        return t if t.dtype == torch.float32 else t.to(torch.float32)


def gguf_source(model: Any) -> Path | None:
    """The GGUF file `model` names for `frontend.load_model`: the embedded default model's
    name, or an existing .gguf file; None for anything else."""
    from . import DEFAULT_MODEL
    from .hf import default_model_path

    if not isinstance(model, (str, Path)):
        return None
    if str(model) == DEFAULT_MODEL:
        return default_model_path()
    path = Path(model)
    return path if path.suffix.lower() == ".gguf" and path.is_file() else None


def load_gguf_lazy(path: str | Path) -> Module:
    """The module `hf.load_gguf(path)` gives, its weights left in the file (see the module
    docstring)."""
    with parse_once():  # our tensor table, the config, the processor's dict, the tokenizer
        return _load_lazy(Path(path))


def _load_lazy(path: Path) -> Module:
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map,
                                                          load_gguf_checkpoint)

    from .hf_families import FAMILIES, SUPPORTED_ARCHITECTURES

    architecture, table = _tensor_table(path)
    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name,
                                            local_files_only=True)
        # the processor gets the parsed metadata dict, exactly what load_gguf_checkpoint gives it
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    except Exception as e:  # noqa: BLE001 - any metadata transformers rejects is a bad file
        raise FrontendError(f"transformers cannot read the metadata of {path}: "
                            f"{type(e).__name__}: {_first_line(e)}") from e
    if config.model_type not in FAMILIES:
        raise FrontendError(f"{path}: unsupported architecture model_type={config.model_type!r} "
                            f"(GGUF {architecture!r}); supported: "
                            f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    model = meta_model(config, path)
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed)
    try:
        to_param = get_gguf_hf_weights_map(model, processor)  # GGUF name -> param
    except Exception as e:  # noqa: BLE001 - as load_gguf: transformers cannot load this file
        raise FrontendError(f"transformers cannot map the tensors of {path}: "
                            f"{type(e).__name__}: {_first_line(e)}") from e
    expected = {param: name for name, param in to_param.items()}
    # parameter -> the file's tensor for it; in file order, the last one winning, as the
    # parameter is assigned in load_gguf_checkpoint's loop
    found = {to_param[name]: name for name in table if name in to_param}
    refs: dict[str, GGUFTensorRef] = {}
    for param, p in model.named_parameters():
        gguf_name = found.get(param)
        if gguf_name is None:
            raise FrontendError(f"{path} lacks tensor {expected.get(param, '(none named)')} "
                                f"(the model's {param}); the file is incomplete or names it "
                                "differently")
        ref = GGUFTensorRef(path, gguf_name, processor=processor, **table[gguf_name])
        if ref.shape != tuple(p.shape):
            raise FrontendError(f"{path}: tensor {gguf_name} is {list(ref.shape)} but the "
                                f"metadata's sizes make {param} {list(p.shape)}; the metadata "
                                "and the tensors must describe the same model")
        refs[param] = ref
    _check_dequantizable(path, refs.values())
    check_finite(read_each(refs, model), str(path))
    tokenizer, chat_template = _tokenizer(path)
    return bind_lazy(model, refs, source=str(path), tokenizer=tokenizer,
                     chat_template=chat_template)


# -- helpers ---------------------------------------------------------------------------------------

def _tensor_table(path: Path) -> tuple[str, dict[str, dict[str, Any]]]:
    """(general.architecture, {GGUF name: GGUFTensorRef fields}) of a GGUF file, checked: a
    GGUF file, parseable (gguf's reader also fails when a tensor's bytes run past the end of
    the file), little-endian, of an architecture transformers reads and splice imports."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES, read_field

    from .hf import check_gguf_file
    from .hf_families import FAMILIES

    check_gguf_file(path)
    try:
        reader = gguf.GGUFReader(str(path))
        architecture = read_field(reader, "general.architecture")
    except Exception as e:  # noqa: BLE001 - any parse failure means the file itself is bad
        raise FrontendError(f"{path} is a truncated or corrupt GGUF file ({type(e).__name__}: "
                            f"{e})") from e
    if reader.byte_order != "I":
        raise FrontendError(f"{path} is a big-endian GGUF file; only little-endian files (the "
                            "ones llama.cpp writes by default) are read")
    # the architectures transformers reads, gguf-py names tensors for, and splice imports
    accepted = [a for a in GGUF_SUPPORTED_ARCHITECTURES
                if a in FAMILIES and a in gguf.MODEL_ARCH_NAMES.values()]
    architecture = architecture[0] if architecture else None
    if architecture not in accepted:
        raise FrontendError(f"{path}: unsupported GGUF architecture {architecture!r}; "
                            f"supported: {', '.join(accepted)}")
    if _converted_by_weight_ops(architecture):  # pragma: no cover - no splice family is
        raise FrontendError(f"{path}: transformers converts GGUF {architecture!r} with weight "
                            "conversion ops, which lazy loading does not replay; use load_gguf")
    table: dict[str, dict[str, Any]] = {}
    for t in reader.tensors:  # .data is a view of the map: its dtype and shape read no page
        table[t.name] = dict(offset=int(t.data_offset), nbytes=int(t.n_bytes),
                             ggml_type=int(t.tensor_type), raw_dtype=t.data.dtype,
                             raw_shape=tuple(int(d) for d in t.data.shape),
                             shape=tuple(int(d) for d in reversed(t.shape.tolist())))
    del reader  # its memory map is dropped when parse_once ends, with the import
    return architecture, table


def _converted_by_weight_ops(architecture: str) -> bool:
    """Whether transformers loads this GGUF architecture through its newer path (weight
    conversion ops, transformers >= 5.2x) rather than load_gguf_checkpoint's processors."""
    try:
        from transformers.integrations.gguf.utils import is_gguf_arch_supported
    except ImportError:  # an older transformers 5: every architecture takes the processors
        return False
    return bool(is_gguf_arch_supported(architecture))


def _dequantize(raw: np.ndarray, ggml_type: int) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return dequantize(raw, GGMLQuantizationType(ggml_type))


def _check_dequantizable(path: Path, refs) -> None:
    """Every tensor the model reads is floating point or quantized in a type the gguf package
    can dequantize, checked once per type here rather than when a pass first reads the tensor
    (check_gguf_file checked the whole table already where its header walk could read it)."""
    from .hf import check_gguf_types

    check_gguf_types(path, {ref.name: ref.ggml_type for ref in refs})


def _tokenizer(path: Path):
    """(ir.Tokenizer or None, chat template) as `hf.load_gguf` gets them: transformers'
    tokenizer from the GGUF metadata, carried as its tokenizer.json."""
    from .hf import _carry_tokenizer, gguf_tokenizer

    return _carry_tokenizer(gguf_tokenizer(path))
