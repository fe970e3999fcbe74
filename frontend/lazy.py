"""Lazy weights: a Hugging Face checkpoint bound to the IR without loading it.

`load_hf_lazy(dir)` builds the canonical decoder of a config.json + *.safetensors directory
(sharded or not) with every weight left on disk: `Module.weights` is a `LazyWeights` mapping
whose entries are references (file, tensor key, row range) read when a pass or a backend asks
for them, and dropped again when the caller lets go. It is what layer-by-layer compilation
(passes/infra/layerwise.py) starts from, so a model larger than memory can be imported.

How the graph is built without the weights. The transformers model is instantiated with its
parameters on the meta device (accelerate's `init_empty_weights`, buffers on the CPU): no
parameter memory, but the modules exist, so `hf_families.convert` derives the DecoderSpec from
them exactly as the in-memory frontend does (attention scaling, rotary frequencies, the
embedding scale, fused Phi-3 projections, tied heads). The canonical-name -> checkpoint-key map
is recorded by running the same family converter (`_convert_layer`) with a recorder in place of
its weight collector: each weight it would copy is traced back to the meta parameter it views,
whose name is the checkpoint key, and a row slice (Phi-3's qkv_proj) becomes a row range. Weights
the converter makes up (zero biases filling a family's missing ones, rotary frequencies) are
small and held in memory. One family map therefore serves both frontends, and a lazy module's
weights equal the eager one's bit for bit (float32 from the checkpoint's float32/16/bf16, as
transformers loads them; a test checks it).

Reading: safetensors files are read with plain positioned reads of the header's byte ranges
rather than through a memory map (safetensors' `safe_open`): the bytes read are copied into a
tensor the caller owns, and no mapped file page stays charged to the process's resident set,
so the peak memory a test measures is the memory the compile actually needs. A row range reads
only those rows. Checkpoint keys that transformers renames while loading (a model whose
parameter names differ from its checkpoint's) are refused with the missing key named. A GGUF
file is bound lazily by frontend/lazy_gguf.py (`load_gguf_lazy`): its refs read and dequantize
one GGUF tensor per access, and it shares `meta_model` and `bind_lazy` with this frontend.

Weights that load but are not usable are refused at import, as the eager frontends refuse them:
an integer tensor where a float weight belongs from the header alone, and NaN or infinite
values by reading each weight once, one at a time (`read_each`, before the tokenizer is
parsed; the import's cost is then one read of the checkpoint, which the compile that follows
makes at least once anyway).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import torch

from splice.errors import FrontendError
from splice.ir.core import IRError, Module, Tokenizer
from .finite import check_finite

logger = logging.getLogger(__name__)

__all__ = ["LazyWeights", "TensorRef", "load_hf_lazy", "read_header"]

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


def read_header(path: Path) -> tuple[int, dict]:
    """(byte offset of the data section, the JSON header) of a safetensors file."""
    with Path(path).open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FrontendError(f"{path} is truncated: a safetensors file starts with an 8-byte "
                                "header length")
        n = int.from_bytes(head, "little")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise FrontendError(f"{path} is not a safetensors file (its header is not JSON)") \
                from None
    header.pop("__metadata__", None)
    return 8 + n, header


class RowRange:
    """The shape a reference reads: its `shape`, or the rows [row0, row1) of its first dim when
    `rows` is set (TensorRef, lazy_gguf.GGUFTensorRef)."""

    shape: tuple[int, ...]
    rows: tuple[int, int] | None

    @property
    def out_shape(self) -> tuple[int, ...]:
        if self.rows is None:
            return self.shape
        return (self.rows[1] - self.rows[0], *self.shape[1:])


@dataclasses.dataclass(frozen=True)
class TensorRef(RowRange):
    """Where one weight lies: a safetensors file, the tensor's byte range and dtype, optionally a
    row range [row0, row1) of its first dim; `as_float32` casts floats on reading (the frontends'
    working dtype)."""

    path: Path
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    rows: tuple[int, int] | None = None
    as_float32: bool = True

    @property
    def out_dtype(self) -> torch.dtype:
        return torch.float32 if self.as_float32 and self.dtype.is_floating_point else self.dtype

    def load(self) -> torch.Tensor:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        row = math.prod(self.shape[1:]) * itemsize
        start = self.offset + (self.rows[0] * row if self.rows else 0)
        count = math.prod(self.out_shape) * itemsize
        buf = read_bytes(self.path, start, count, "a tensor")
        t = torch.frombuffer(buf, dtype=self.dtype) if count else torch.empty(0, dtype=self.dtype)
        t = t.reshape(self.out_shape)
        return t.to(torch.float32) if self.out_dtype != self.dtype else t


def read_bytes(path: Path, start: int, count: int, what: str) -> bytearray:
    """`count` bytes of `path` from `start`, with a positioned read into memory the caller owns
    (no memory map, so no mapped page stays in the resident set); `what` names the reader's
    object in the error for a file that ends too soon."""
    buf = bytearray(count)
    with path.open("rb") as f:
        f.seek(start)
        if f.readinto(buf) != count:
            raise FrontendError(f"{path} is truncated: {what} needs bytes "
                                f"{start}..{start + count}")
    return buf


def file_refs(path: Path, *, as_float32: bool = False) -> dict[str, TensorRef]:
    """A TensorRef for every tensor of one safetensors file."""
    base, header = read_header(path)
    refs = {}
    for key, info in header.items():
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise FrontendError(f"{path}: tensor {key} has dtype {info.get('dtype')!r}; supported: "
                                f"{', '.join(SAFETENSORS_DTYPES)}")
        refs[key] = TensorRef(Path(path), base + int(info["data_offsets"][0]), dtype,
                              tuple(int(d) for d in info["shape"]), as_float32=as_float32)
    return refs


class LazyWeights(MutableMapping):
    """A dict of weights whose entries are tensors or TensorRefs read on each access.

    Reading a lazy entry returns a fresh tensor and keeps nothing; assigning stores the tensor
    in memory (a pass's result) and drops the reference. `ref(name)` is the reference of a lazy
    entry (None for an in-memory one), which a backend uses to stream the weight to its output
    instead of holding it; `shape`/`dtype` answer without reading."""

    def __init__(self, refs: dict[str, TensorRef] | None = None,
                 tensors: dict[str, torch.Tensor] | None = None):
        self._refs: dict[str, TensorRef] = dict(refs or {})
        self._tensors: dict[str, torch.Tensor] = dict(tensors or {})
        self._spill: Path | None = None
        self._spill_min = 0

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self._tensors.get(name)
        if t is not None:
            return t
        return self._refs[name].load()

    def __setitem__(self, name: str, tensor: torch.Tensor) -> None:
        self._refs.pop(name, None)  # a spilled file stays: a clone may still read it
        if self._spill is None or tensor.numel() * tensor.element_size() < self._spill_min:
            self._tensors[name] = tensor
            return
        from safetensors.torch import save_file

        path = self._spill / f"{SPILL_PREFIX}{next(_SPILLED):07d}.safetensors"
        save_file({"w": tensor.contiguous()}, str(path))
        self._tensors.pop(name, None)
        self._refs[name] = file_refs(path)["w"]

    def spill_to(self, folder: Path | None, min_bytes: int = 1 << 20) -> None:
        """From now on write each assigned tensor of at least `min_bytes` to its own safetensors
        file in `folder` and keep only its reference (None: keep assigned tensors in memory
        again). A pass that rewrites weights of a model larger than memory (absorb_post_norm's
        scaled linears, fuse_patch's folded down_proj) then holds one at a time. The folder must
        outlive the mapping."""
        if folder is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)
        self._spill, self._spill_min = (Path(folder) if folder is not None else None), min_bytes

    def move(self, old: str, new: str) -> None:
        """Rename entry `old` to `new` without reading it."""
        if old in self._tensors:
            self._tensors[new] = self._tensors.pop(old)
        else:
            self._refs[new] = self._refs.pop(old)

    def clone(self) -> LazyWeights:
        """A copy: the same references (files are never written in place), the in-memory
        tensors cloned, the same spill setting."""
        c = LazyWeights(self._refs, {k: t.clone() for k, t in self._tensors.items()})
        c._spill, c._spill_min = self._spill, self._spill_min
        return c

    def __delitem__(self, name: str) -> None:
        if name in self._tensors:
            del self._tensors[name]
        else:
            del self._refs[name]

    def __iter__(self) -> Iterator[str]:
        yield from self._tensors
        yield from (k for k in self._refs if k not in self._tensors)

    def __len__(self) -> int:
        return len(self._tensors) + len(self._refs)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors or name in self._refs

    def ref(self, name: str) -> TensorRef | None:
        return None if name in self._tensors else self._refs.get(name)

    def shape(self, name: str) -> tuple[int, ...]:
        r = self.ref(name)
        return r.out_shape if r is not None else tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        r = self.ref(name)
        return r.out_dtype if r is not None else self._tensors[name].dtype

    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())


SPILL_PREFIX = "spilled_"
_SPILLED = itertools.count()  # spill file numbers, unique in the process (clones share folders)


def lazy_ref(weights, name: str) -> TensorRef | None:
    """The on-disk reference of weight `name` when `weights` is lazy and the entry is on disk."""
    return weights.ref(name) if isinstance(weights, LazyWeights) else None


# -- Hugging Face directories --------------------------------------------------------------------

def checkpoint_refs(path: Path) -> dict[str, TensorRef]:
    """Every tensor of a safetensors checkpoint directory (model.safetensors.index.json's shards,
    or every *.safetensors file), by checkpoint key; floats read as float32."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise FrontendError(f"{index} is not a safetensors index ({type(e).__name__}: {e})") \
                from None
        shards = sorted({path / f for f in weight_map.values()})
    else:
        shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise FrontendError(f"{path} has no *.safetensors weights")
    refs: dict[str, TensorRef] = {}
    from . import hf

    for shard in shards:
        if not shard.is_file():
            raise FrontendError(f"{path}: shard {shard.name} named by the index does not exist")
        hf._check_safetensors(shard)   # as load_hf: complete, and floating-point weights
        refs.update(file_refs(shard, as_float32=True))
    return refs


class _Recorder:
    """Stands in for hf_families' weight collector: records, for each canonical weight, the meta
    parameter (hence checkpoint key) and row range it is taken from; real tensors (made-up zero
    biases, rotary frequencies) are kept as float32 copies."""

    def __init__(self, names: dict[int, str]):
        self.names = names
        self.used: set[int] = set()
        self.keys: dict[str, tuple[str, tuple[int, int] | None]] = {}
        self.tensors: dict[str, torch.Tensor] = {}

    def take(self, name: str, param: torch.Tensor) -> None:
        self.used.add(id(param))
        self.put(name, param)

    def put(self, name: str, tensor: torch.Tensor) -> None:
        if not tensor.is_meta:
            self.tensors[name] = tensor.detach().to(torch.float32).clone()
            return
        base = tensor._base if tensor._base is not None else tensor
        key = self.names.get(id(base))
        if key is None:
            raise FrontendError(f"lazy loading: canonical weight {name} is not a view of a model "
                                "parameter; load this model with load_hf instead")
        rows = None
        if base is not tensor:
            if tensor.dim() != base.dim() or tensor.shape[1:] != base.shape[1:]:
                raise FrontendError(f"lazy loading: {name} takes a non-row slice of {key}")
            r0 = tensor.storage_offset() // max(1, base.stride(0))
            rows = (r0, r0 + tensor.shape[0])
        self.keys[name] = (key, rows)


def load_hf_lazy(path: str | Path) -> Module:
    """The canonical decoder of a Hugging Face directory with every weight left on disk (see
    the module docstring)."""
    from transformers import AutoConfig

    from . import hf

    path = Path(path)
    if not path.is_dir():
        raise FrontendError(f"lazy loading needs a Hugging Face model directory; {path} is not one")
    hf._check_config(path)
    refs = checkpoint_refs(path)
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any config transformers rejects is a bad checkpoint
        raise FrontendError(f"transformers cannot build {path}: {type(e).__name__}: "
                            f"{_first_line(e)}") from e
    model = meta_model(config, path)
    check_finite(read_each(refs, model), str(path))
    files, chat_template = hf._dir_tokenizer(path)
    return bind_lazy(model, refs, source=str(path),
                     tokenizer=Tokenizer("hf", files) if files else None,
                     chat_template=chat_template)


# -- shared by the lazy frontends (this one and lazy_gguf.py) ------------------------------------

def read_each(refs: Mapping[str, Any], model) -> Iterator[tuple[str, torch.Tensor]]:
    """(parameter name, its tensor) for each parameter of `model` (from `meta_model`) that `refs`
    holds, read one at a time: what `finite.check_finite` walks before the lazy import goes on,
    as the eager frontends check the parameters transformers loaded."""
    for name, _ in model.named_parameters():
        if name in refs:
            yield name, refs[name].load()


def meta_model(config, source: str | Path):
    """transformers' causal LM for `config` with its parameters on the meta device (buffers, such
    as the rotary frequencies, real and on the CPU) and its embeddings tied as from_pretrained
    ties them; whatever transformers rejects is a FrontendError naming `source`."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.tie_weights()  # from_pretrained ties; on meta parameters from_config does not
    except Exception as e:  # noqa: BLE001 - any config transformers rejects is a bad checkpoint
        raise FrontendError(f"transformers cannot build {source}: {type(e).__name__}: "
                            f"{_first_line(e)}") from e
    return model


def bind_lazy(model, refs: Mapping[str, Any], *, source: str, tokenizer: Tokenizer | None,
              chat_template: str | None) -> Module:
    """The canonical decoder of `model` (from `meta_model`) with each canonical weight bound to
    `refs[key]`, key being the name of the model parameter it is taken from (the checkpoint key,
    as `model.named_parameters()` names it). A ref is a frozen dataclass with TensorRef's
    interface: a `rows` field (replaced by the row range of a sliced weight), `out_shape`,
    `out_dtype`, `load()` and `path`. Weights the converter makes up are held in memory."""
    from . import hf_families
    from .decoder import build_decoder

    spec, meta = hf_families.convert(model)
    model_type, _, core, lm_head = hf_families.text_parts(model)
    family = hf_families.FAMILIES[model_type]
    names = {id(p): n for n, p in model.named_parameters()}
    rec = _Recorder(names)
    rec.take("embed.weight", core.embed_tokens.weight)
    rec.take("final_norm.weight", core.norm.weight)
    if not spec.tie_embeddings:
        rec.take("lm_head.weight", lm_head.weight)
    for i, layer in enumerate(list(core.layers)[:spec.num_layers]):
        hf_families._convert_layer(rec, f"layers.{i}.", layer, layer.self_attn, family,
                                   spec.num_heads, spec.num_kv_heads, spec.head_dim,
                                   qkv_bias=spec.qkv_bias, o_bias=spec.o_bias,
                                   mlp_bias=spec.mlp_bias)
    weights = LazyWeights()
    for name, t in meta.items():
        if name in rec.keys:
            key, rows = rec.keys[name]
            ref = refs.get(key)
            if ref is None:
                raise FrontendError(f"{source} lacks tensor {key} (canonical {name}); the "
                                    "checkpoint is incomplete or names it differently")
            ref = dataclasses.replace(ref, rows=rows)
            if ref.out_shape != tuple(t.shape):
                raise FrontendError(f"{source}: {key} is {list(ref.out_shape)} in the checkpoint "
                                    f"but {list(t.shape)} by the config")
            weights._refs[name] = ref
        elif not t.is_meta:
            weights[name] = t
        else:
            weights[name] = rec.tensors[name]
    try:
        module = build_decoder(spec, meta, origin="frontend.hf", source=source,
                               tokenizer=tokenizer, chat_template=chat_template)
    except IRError as e:
        raise FrontendError(f"{source}: {e}") from None
    consts = module.graph.consts
    module.weights = LazyWeights({k: r for k, r in weights._refs.items() if k in consts},
                                 {k: t for k, t in weights._tensors.items()
                                  if k in module.graph.consts})
    logger.info("%s: %d weights bound lazily, %.1f MB held in memory", source,
                len(weights._refs), module.weights.resident_bytes() / 1e6)
    return module


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else ""
