"""Will a compile fit in memory? An estimate made before anything heavy is loaded.

A compile that outgrows the machine is killed by the kernel's OOM killer: no message, no exit
code splice chose, minutes lost. So `splice.compile` first estimates what it will need and
refuses with the numbers when that exceeds what is available (an InputError: exit 2).

The estimate, deliberately simple and on the cautious side:
  * parameters, read without loading any weight: the tensor shapes in safetensors headers, else
    the sizes in config.json; a llama2.c file is float32, so its size / 4; a GGUF file is assumed
    4-bit (size x 2 parameters), which overestimates 8-bit and float GGUF files;
  * x 4 bytes (every frontend works in float32) x COPIES: the frontend's source tensors, the IR
    module, and the lowered ONNX model being serialised are alive together at the peak (measured:
    a SmolLM2-135M fold_norms compile peaks at 1.8 GB RSS for 0.54 GB of float32 weights, about
    2.5 copies over a 0.45 GB process); a model already in memory needs one copy fewer;
  * plus calibration activations when the recipe asks for calibration and config.json gives the
    sizes: every token's residual stream at every layer and its logits, in float64 (what
    select_layers and estimate_patch hold);
  * plus BASE_BYTES for the libraries a compile imports after this check (transformers, onnx,
    onnxruntime); the process as it stands is already counted out of what is available.
Available memory is MemAvailable from /proc/meminfo, lowered to a cgroup's limit when the
process runs in one (a container), else sysconf's available pages; when none can be read the
check is skipped. `memory_limit` replaces the measured figure (the CLI's --memory-limit).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from splice.errors import InputError

COPIES = 3
BYTES_PER_PARAM = 4
BASE_BYTES = 256 * 2**20
GGUF_PARAMS_PER_BYTE = 2     # 4-bit weights; see the module docstring
GB = 1e9


def available_memory() -> int | None:
    """Bytes this process can still allocate without swapping or hitting its cgroup's limit."""
    candidates = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit != "max" and int(limit) < 1 << 60:
                candidates.append(int(limit) - int(Path(usage_file).read_text().strip()))
        except (OSError, ValueError):
            continue
    if not candidates:
        try:
            candidates.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return max(0, min(candidates))


def _config_parameters(cfg: dict) -> int | None:
    """Parameters of a decoder from its config.json sizes (None when they are not all there)."""
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    try:
        v, h, layers = text["vocab_size"], text["hidden_size"], text["num_hidden_layers"]
        heads = text["num_attention_heads"]
        kv = text.get("num_key_value_heads") or heads
        inter = text["intermediate_size"]
        hd = text.get("head_dim") or h // heads
        sizes = [v, h, layers, heads, kv, inter, hd]
        if not all(isinstance(x, int) and x > 0 for x in sizes):
            return None
    except (KeyError, TypeError, ZeroDivisionError):
        return None
    tied = bool(text.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False)))
    attn = h * heads * hd * 2 + h * kv * hd * 2
    return v * h * (1 if tied else 2) + layers * (attn + 3 * h * inter + 2 * h) + h


def _safetensors_parameters(shards: list[Path]) -> int | None:
    total = 0
    for shard in shards:
        try:
            with shard.open("rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if n > min(shard.stat().st_size, 1 << 28):
                    return None
                header = json.loads(f.read(n))
            for key, t in header.items():
                if key != "__metadata__":
                    count = 1
                    for d in t["shape"]:
                        count *= int(d)
                    total += count
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None     # a broken shard: the frontend says what is wrong with it
    return total


def parameter_count(model: Any) -> tuple[int, str] | None:
    """(parameters, how they were counted) without loading weights; None when unknown."""
    from splice.frontend import DEFAULT_MODEL

    if not isinstance(model, (str, Path)):
        if hasattr(model, "num_parameters") and hasattr(model, "graph"):
            return model.num_parameters(), "the module's weights"
        params = getattr(model, "parameters", None)
        if callable(params):
            return sum(p.numel() for p in params()), "the model's parameters"
        return None
    if str(model) == DEFAULT_MODEL:
        from splice.frontend.hf import default_model_path

        try:
            model = default_model_path()
        except InputError:
            return None
    path = Path(model)
    try:
        if path.is_dir() and (path / "config.json").is_file():
            shards = sorted(path.glob("*.safetensors"))
            n = _safetensors_parameters(shards) if shards else None
            if n:
                return n, "safetensors headers"
            cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
            n = _config_parameters(cfg) if isinstance(cfg, dict) else None
            return (n, "config.json sizes") if n else None
        if path.is_file() and path.suffix.lower() == ".gguf":
            return path.stat().st_size * GGUF_PARAMS_PER_BYTE, "GGUF size, 4-bit weights assumed"
        if path.is_file() and path.suffix.lower() == ".bin":
            return path.stat().st_size // 4, "llama2.c float32 size"
    except (OSError, ValueError):
        return None
    return None


def _calibration_bytes(model: Any, recipe) -> tuple[int, int]:
    """(bytes, tokens) of the float64 activations a calibrated recipe keeps."""
    tokens = recipe.calibration_samples * recipe.calibration_seq_len
    if not tokens or not isinstance(model, (str, Path)) or not Path(model).is_dir():
        return 0, tokens
    try:
        cfg = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
        text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
        width = text["hidden_size"] * (text["num_hidden_layers"] + 1) + text["vocab_size"]
        return int(tokens * width * 8), tokens
    except (OSError, ValueError, KeyError, TypeError):
        return 0, tokens


def check_memory(model: Any, recipe, memory_limit: int | float | None = None) -> None:
    """Raise InputError when compiling `model` with `recipe` would need more memory than
    `memory_limit` bytes (None: what the machine has available now)."""
    counted = parameter_count(model)
    if counted is None:
        return
    params, how = counted
    available = memory_limit if memory_limit is not None else available_memory()
    if available is None:
        return
    copies = COPIES if isinstance(model, (str, Path)) else COPIES - 1
    weights = params * BYTES_PER_PARAM * copies
    calib, tokens = _calibration_bytes(model, recipe)
    need = weights + calib + BASE_BYTES
    if need <= available:
        return
    calib_text = (f" + {calib / GB:.1f} GB of float64 calibration activations for {tokens} tokens"
                  if calib else "")
    what = "the given memory_limit" if memory_limit is not None else "available"
    raise InputError(
        f"compiling {model} needs about {need / GB:.1f} GB of memory ({params / 1e9:.2f}B "
        f"parameters from {how} x {BYTES_PER_PARAM} bytes (float32) x {copies} copies = "
        f"{weights / GB:.1f} GB{calib_text} + {BASE_BYTES / GB:.1f} GB for libraries), but "
        f"only {available / GB:.1f} GB is {what}; use a machine with more memory, fewer "
        "calibration tokens (the recipe's [calibration] samples and seq_len), or a higher "
        "--memory-limit (memory_limit=) if the estimate is too cautious")
