"""llama2.c checkpoints -> ir.Module.

Two float32 layouts are read, both written by llama2.c's export.py:
  * legacy (version 0): a header of 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads,
    vocab_size, seq_len; a negative vocab_size means the classifier is not tied to the embedding),
    then token_embedding, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, freq_cis_real,
    freq_cis_imag and, when untied, wcls;
  * version 1: a 256-byte header (magic "ak42", version 1, the same 7 int32, a shared-classifier
    byte, zero padding), then the norms first (rms_att, rms_ffn, rms_final), token_embedding,
    wq, wk, wv, wo, w1, w2, w3, and wcls when not shared. It has no freq_cis arrays.
Version 2 (int8 Q8_0 groups) is refused with a clear error rather than half-supported.

The file is read with numpy (never unpickled) after its size has been checked against the header,
so a truncated file or one with trailing bytes is reported, not misread. The freq_cis tables are
skipped: the graph computes the same angles from rope_theta 10000 (inv_freq = theta^(-2i/hd)).

llama2.c applies RoPE to interleaved pairs (2i, 2i+1) of each head. The canonical graph uses the
rotate-half layout of Hugging Face transformers, so each head's rows of wq and wk are permuted
(reshape(heads, hd/2, 2, dim).transpose(1, 2)): q.k products, and so attention, are unchanged, and
every backend's RotaryEmbedding sees the common layout. w1 is the gate, w3 the up projection and
w2 the down projection.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import numpy as np
import torch

from splice.errors import ArtefactError, FrontendError
from splice.ir.core import IRError, Module, Tokenizer
from splice.runtime.llama2c_tokenizer import Llama2cTokenizer
from .decoder import DecoderSpec, build_decoder

log = logging.getLogger(__name__)

ORIGIN = "frontend.llama2c"
ROPE_THETA = 10000.0
RMS_EPS = 1e-5
LEGACY_HEADER_BYTES = 7 * 4
V1_HEADER_BYTES = 256
V1_MAGIC = 0x616B3432           # "ak42" as a little-endian uint32, llama2.c export.py
# Bounds far above any released llama-family model; a header beyond them is corruption, and
# checking them first keeps the byte arithmetic below meaningful.
_LIMITS = {"dim": 1 << 16, "hidden_dim": 1 << 18, "n_layers": 1 << 10, "n_heads": 1 << 10,
           "n_kv_heads": 1 << 10, "vocab_size": 1 << 22, "seq_len": 1 << 22}
_FIELDS = tuple(_LIMITS)


def load_llama2c(bin_path: str | Path, tokenizer_path: str | Path | None = None) -> Module:
    """Import a llama2.c checkpoint (legacy or version-1 float32) as the canonical decoder.

    Without `tokenizer_path`, tok{vocab}.bin and then tokenizer.bin beside the checkpoint are
    used when present; a module without a tokenizer still runs on ids. Any defect of either file
    raises FrontendError naming the file and what was expected.
    """
    path = Path(bin_path)
    head, size = _read_head(path)
    header, version, body_offset, tied = _parse_header(path, head, size)
    arrays = _read_arrays(path, size, header, version, body_offset, tied)
    spec = DecoderSpec(
        architecture="llama2c", vocab_size=header["vocab_size"], hidden_size=header["dim"],
        intermediate_size=header["hidden_dim"], num_layers=header["n_layers"],
        num_heads=header["n_heads"], num_kv_heads=header["n_kv_heads"],
        head_dim=header["dim"] // header["n_heads"], rms_eps=RMS_EPS,
        max_position=header["seq_len"], tie_embeddings=tied, bos_token_id=1, eos_token_ids=(2,))
    weights = _canonical_weights(arrays, spec)
    tokenizer = _load_tokenizer(path, tokenizer_path, spec.vocab_size)
    try:
        module = build_decoder(spec, weights, origin=ORIGIN, source=str(path), tokenizer=tokenizer)
    except IRError as e:
        raise FrontendError(f"llama2.c checkpoint {path}: {e}") from None
    module.config = module.config.replace(
        extra={**module.config.extra, "llama2c_version": version, "rope_theta": ROPE_THETA})
    log.info("loaded llama2.c checkpoint %s (version %d): %d layers, dim %d, vocab %d, %s",
             path, version, spec.num_layers, spec.hidden_size, spec.vocab_size,
             "tied classifier" if tied else "separate classifier")
    return module


# -- reading and checking ---------------------------------------------------------------------

def _read_head(path: Path) -> tuple[bytes, int]:
    """The first bytes (enough for either header) and the file's size; the weights are read
    later straight into one array, so a large checkpoint is held in memory once."""
    if not path.exists():
        raise FrontendError(f"llama2.c checkpoint {path}: no such file")
    if not path.is_file():
        raise FrontendError(f"llama2.c checkpoint {path}: not a regular file")
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(V1_HEADER_BYTES)
    except OSError as e:
        raise FrontendError(f"llama2.c checkpoint {path}: cannot read it ({e.strerror})") from None
    if not size:
        raise FrontendError(f"llama2.c checkpoint {path}: the file is empty; expected a "
                            f"{LEGACY_HEADER_BYTES}-byte header of 7 int32 and float32 weights")
    return head, size


def _parse_header(path: Path, data: bytes, size: int) -> tuple[dict[str, int], int, int, bool]:
    """The 7 sizes, the format version, where the weights start and whether wcls is tied."""
    if size >= 8 and struct.unpack_from("<I", data, 0)[0] == V1_MAGIC:
        (version,) = struct.unpack_from("<i", data, 4)
        if version != 1:
            raise FrontendError(f"llama2.c checkpoint {path}: export version {version}; accepted: "
                                "the legacy float32 format and version 1 (float32)")
        if size < V1_HEADER_BYTES:
            raise FrontendError(f"llama2.c checkpoint {path}: {size} bytes, shorter than the "
                                f"{V1_HEADER_BYTES}-byte version-1 header")
        values = struct.unpack_from("<7i", data, 8)
        shared = data[36]
        if shared not in (0, 1):
            raise FrontendError(f"llama2.c checkpoint {path}: shared-classifier flag is {shared}; "
                                "expected 0 or 1")
        header = dict(zip(_FIELDS, values))
        _check_sizes(path, header)
        return header, 1, V1_HEADER_BYTES, bool(shared)
    if size < LEGACY_HEADER_BYTES:
        raise FrontendError(f"llama2.c checkpoint {path}: {size} bytes, shorter than the "
                            f"{LEGACY_HEADER_BYTES}-byte header of 7 int32")
    header = dict(zip(_FIELDS, struct.unpack_from("<7i", data, 0)))
    tied = header["vocab_size"] > 0
    header["vocab_size"] = abs(header["vocab_size"])
    _check_sizes(path, header)
    return header, 0, LEGACY_HEADER_BYTES, tied


def _check_sizes(path: Path, h: dict[str, int]) -> None:
    shown = ", ".join(f"{k}={v}" for k, v in h.items())
    for field, limit in _LIMITS.items():
        if not 0 < h[field] <= limit:
            raise FrontendError(f"llama2.c checkpoint {path}: header {field} = {h[field]} "
                                f"({shown}); expected 1..{limit} (a corrupt or non-llama2.c file?)")
    if h["dim"] % h["n_heads"]:
        raise FrontendError(f"llama2.c checkpoint {path}: n_heads {h['n_heads']} does not divide "
                            f"dim {h['dim']} ({shown})")
    if h["n_heads"] % h["n_kv_heads"]:
        raise FrontendError(f"llama2.c checkpoint {path}: n_kv_heads {h['n_kv_heads']} does not "
                            f"divide n_heads {h['n_heads']} ({shown})")
    if (h["dim"] // h["n_heads"]) % 2:
        raise FrontendError(f"llama2.c checkpoint {path}: head size {h['dim'] // h['n_heads']} is "
                            f"odd; RoPE rotates pairs, so it must be even ({shown})")


def _layout(h: dict[str, int], version: int, tied: bool) -> list[tuple[str, tuple[int, ...]]]:
    """The arrays of the file, in file order, with their shapes."""
    dim, hid, n, v = h["dim"], h["hidden_dim"], h["n_layers"], h["vocab_size"]
    hd = dim // h["n_heads"]
    kvd = h["n_kv_heads"] * hd
    matrices = [("wq", (n, dim, dim)), ("wk", (n, kvd, dim)), ("wv", (n, kvd, dim)),
                ("wo", (n, dim, dim))]
    ffn = [("w1", (n, hid, dim)), ("w2", (n, dim, hid)), ("w3", (n, hid, dim))]
    wcls = [] if tied else [("wcls", (v, dim))]
    if version == 1:
        return [("rms_att", (n, dim)), ("rms_ffn", (n, dim)), ("rms_final", (dim,)),
                ("token_embedding", (v, dim)), *matrices, *ffn, *wcls]
    freq = h["seq_len"] * hd // 2
    return [("token_embedding", (v, dim)), ("rms_att", (n, dim)), *matrices,
            ("rms_ffn", (n, dim)), *ffn, ("rms_final", (dim,)), ("freq_cis_real", (freq,)),
            ("freq_cis_imag", (freq,)), *wcls]


def _read_arrays(path: Path, size: int, h: dict[str, int], version: int, offset: int,
                 tied: bool) -> dict[str, np.ndarray]:
    layout = _layout(h, version, tied)
    expected = offset + 4 * sum(int(np.prod(shape)) for _, shape in layout)
    if size != expected:
        what = "truncated" if size < expected else f"{size - expected} trailing bytes"
        shown = ", ".join(f"{k}={v}" for k, v in h.items())
        raise FrontendError(
            f"llama2.c checkpoint {path}: {size} bytes ({what}); the header ({shown}, "
            f"{'tied' if tied else 'untied'} classifier, format version {version}) implies "
            f"{expected} bytes")
    try:
        flat = np.fromfile(path, dtype="<f4", offset=offset).astype(np.float32, copy=False)
    except OSError as e:
        raise FrontendError(f"llama2.c checkpoint {path}: cannot read it ({e})") from None
    if flat.size * 4 != size - offset:      # the file changed under us
        raise FrontendError(f"llama2.c checkpoint {path}: read {flat.size * 4} bytes of weights, "
                            f"expected {size - offset}")
    # NaN or infinite weights are refused by load_model (frontend/__init__.py), naming the tensor
    arrays: dict[str, np.ndarray] = {}
    pos = 0
    for name, shape in layout:      # views into `flat`: no copies of the weights
        n = int(np.prod(shape))
        arrays[name] = flat[pos:pos + n].reshape(shape)
        pos += n
    return arrays


# -- conversion ---------------------------------------------------------------------------------

def _rope_rows_to_rotate_half(w: np.ndarray, heads: int) -> np.ndarray:
    """Reorder each head's output rows from interleaved pairs (2i, 2i+1) to halves (i, hd/2+i)."""
    out_dim, in_dim = w.shape
    hd = out_dim // heads
    return w.reshape(heads, hd // 2, 2, in_dim).transpose(0, 2, 1, 3).reshape(out_dim, in_dim)


def _canonical_weights(a: dict[str, np.ndarray], spec: DecoderSpec) -> dict[str, torch.Tensor]:
    def t(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x))

    hd = spec.head_dim
    weights = {
        "embed.weight": t(a["token_embedding"]),
        "final_norm.weight": t(a["rms_final"]),
        "rope.inv_freq": (1.0 / ROPE_THETA ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
                          ).to(torch.float32),
    }
    if "wcls" in a:
        weights["lm_head.weight"] = t(a["wcls"])
    for i in range(spec.num_layers):
        p = f"layers.{i}."
        weights[p + "attn_norm.weight"] = t(a["rms_att"][i])
        weights[p + "attn.q_proj.weight"] = t(_rope_rows_to_rotate_half(a["wq"][i], spec.num_heads))
        weights[p + "attn.k_proj.weight"] = t(
            _rope_rows_to_rotate_half(a["wk"][i], spec.num_kv_heads))
        weights[p + "attn.v_proj.weight"] = t(a["wv"][i])
        weights[p + "attn.o_proj.weight"] = t(a["wo"][i])
        weights[p + "mlp_norm.weight"] = t(a["rms_ffn"][i])
        weights[p + "mlp.gate_proj.weight"] = t(a["w1"][i])
        weights[p + "mlp.down_proj.weight"] = t(a["w2"][i])
        weights[p + "mlp.up_proj.weight"] = t(a["w3"][i])
    return weights


def _load_tokenizer(bin_path: Path, tokenizer_path: str | Path | None,
                    vocab_size: int) -> Tokenizer | None:
    """The tokenizer file as bytes, checked to parse and to have the model's vocabulary size."""
    if tokenizer_path is None:
        candidates = [bin_path.with_name(f"tok{vocab_size}.bin"), bin_path.with_name("tokenizer.bin")]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            log.warning("llama2.c checkpoint %s: no tokenizer beside it (looked for %s); the "
                        "module carries none", bin_path, " and ".join(c.name for c in candidates))
            return None
        tok_path = found
    else:
        tok_path = Path(tokenizer_path)
        if not tok_path.is_file():
            raise FrontendError(f"llama2.c tokenizer {tok_path}: no such file")
    try:
        data = tok_path.read_bytes()
    except OSError as e:
        raise FrontendError(f"llama2.c tokenizer {tok_path}: cannot read it ({e.strerror})") from None
    try:
        Llama2cTokenizer.from_bytes(data, vocab_size=vocab_size, name=str(tok_path))
    except ArtefactError as e:
        raise FrontendError(str(e)) from None
    return Tokenizer("llama2c", {"tokenizer.bin": data})
