"""Builders for the bad-input corpus: every named input is a file or directory made from a good one
(stories260K, a tiny random Hugging Face llama saved with save_pretrained, a tiny GGUF written with
gguf.GGUFWriter, a compiled artefact) by truncating, flipping bits, editing a config, or removing,
changing or adding a file.

`build_inputs(root, artefact)` writes them all under `root` and returns {name: path}; the corpus
(corpus.py) refers to them by name, so a new bad input is one entry in BUILDERS and one line there.
Bit flips are at fixed, seeded offsets so that a failure reproduces.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

from tests.paths import STORIES, TINYSTORIES

TOK512 = STORIES.with_name("tok512.bin")
# the 7-int32 legacy llama2.c header of stories260K: the weights start at byte 28
L2C_HEADER = 28


def tiny_hf_model():
    """A tiny random LLaMA (2 layers, hidden 64) as transformers builds it; seeded."""
    import torch
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        tie_word_embeddings=False)
    return T.LlamaForCausalLM(cfg).eval()


def write_hf_dir(path: Path) -> Path:
    tiny_hf_model().save_pretrained(path)
    return path


def write_gguf_file(path: Path) -> Path:
    from tests.frontend.test_hf import write_gguf

    write_gguf(tiny_hf_model(), path)
    return path


# -- byte edits ---------------------------------------------------------------------------------

def truncated(src: Path, dst: Path, keep: int | float) -> Path:
    """`dst` holds the first `keep` bytes of `src` (a fraction of its size when a float; negative
    counts from the end)."""
    data = src.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    dst.write_bytes(data[:n])
    return dst


def flipped(src: Path, dst: Path, offset: int, bit: int = 0) -> Path:
    """`dst` is `src` with one bit flipped at byte `offset` (negative counts from the end)."""
    data = bytearray(src.read_bytes())
    data[offset] ^= 1 << bit
    dst.write_bytes(bytes(data))
    return dst


def random_flips(src: Path, dst: Path, seed: int, count: int, lo: int = 0) -> Path:
    """`dst` is `src` with `count` random bits flipped at or after byte `lo` (negative: from the
    end), seeded."""
    data = bytearray(src.read_bytes())
    lo = lo % len(data)
    rng = random.Random(seed)
    for _ in range(count):
        data[rng.randrange(lo, len(data))] ^= 1 << rng.randrange(8)
    dst.write_bytes(bytes(data))
    return dst


def _copy_stories(dst_dir: Path, name: str) -> Path:
    """A copy of stories260K with its tokenizer beside it, as the frontend expects."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    if TOK512.is_file():
        shutil.copyfile(TOK512, dst_dir / TOK512.name)
    return dst_dir / name


def _hf_variant(base: Path, dst: Path, config: dict | None = None,
                edit: Callable[[Path], None] | None = None) -> Path:
    """A copy of the tiny HF directory with config.json fields replaced and/or files edited."""
    shutil.copytree(base, dst)
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        for k, v in config.items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        (dst / "config.json").write_text(json.dumps(cfg))
    if edit is not None:
        edit(dst)
    return dst


def _st_edit(how: Callable[[Path, Path], Path]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        st = d / "model.safetensors"
        tmp = d / "orig.bin"
        st.rename(tmp)
        how(tmp, st)
        tmp.unlink()
    return edit


def _safetensors_data_start(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def _artefact_variant(art: Path, dst: Path, edit: Callable[[Path], None]) -> Path:
    shutil.copytree(art, dst)
    edit(dst)
    return dst


def _flip_file(rel: str, offset: int) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        f = d / rel
        data = bytearray(f.read_bytes())
        data[offset] ^= 0x01
        f.write_bytes(bytes(data))
    return edit


def _edit_manifest(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        m = json.loads((d / "manifest.json").read_text())
        fn(m)
        (d / "manifest.json").write_text(json.dumps(m))
    return edit


def _symlink_tokenizer(d: Path) -> None:
    outside = d.parent / f"{d.name}-outside.bin"
    (d / "tokenizer.bin").rename(outside)
    (d / "tokenizer.bin").symlink_to(outside)


def _llama70b_config(d: Path) -> None:
    """config.json of Llama-2-70B and no weights: only the memory estimate can refuse it early."""
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000,
        "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False}))


def _float_at(src: Path, dst: Path, offset: int, value: float) -> Path:
    """`dst` is `src` with the float32 at byte `offset` replaced by `value` (NaN, inf)."""
    import struct

    data = bytearray(src.read_bytes())
    data[offset:offset + 4] = struct.pack("<f", value)
    dst.write_bytes(bytes(data))
    return dst


def _st_tensor(name: str, how: Callable) -> Callable[[Path], None]:
    """Edit one tensor of the directory's model.safetensors (`how(tensor) -> tensor`)."""
    def edit(d: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(d / "model.safetensors")
        tensors[name] = how(tensors[name])
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return edit


def _nan_row(t):
    t = t.clone()
    t[3] = float("nan")
    return t


def _as_int32(t):
    import torch

    return (t * 100).to(torch.int32)


def _gguf_edited(dst: Path, edit: Callable) -> Path:
    """The tiny GGUF of the tiny model, one of its weights edited first (`edit(model)`)."""
    from tests.frontend.test_hf import write_gguf

    model = tiny_hf_model()
    edit(model)
    write_gguf(model, dst)
    return dst


def _gguf_inf(model) -> None:
    import torch

    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[2, 5] = float("inf")


def _gguf_int32(model) -> None:
    """down_proj of layer 0 as int32 (a parameter without gradient may hold integers); the
    writer stores it as GGML's I32."""
    import torch

    lin = model.model.layers[0].mlp.down_proj
    lin.weight = torch.nn.Parameter(_as_int32(lin.weight.detach()), requires_grad=False)


def _gguf_arch(src: Path, dst: Path, arch: bytes) -> Path:
    """`dst` is `src` with general.architecture's value ("llama") replaced by `arch` (5 bytes)."""
    data = bytearray(src.read_bytes())
    key = data.index(b"general.architecture")
    at = data.index(b"llama", key + len(b"general.architecture"))
    data[at:at + 5] = arch
    dst.write_bytes(bytes(data))
    return dst


def _text(content: str | bytes) -> Callable[[Path], Path]:
    def write(p: Path) -> Path:
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
        return p
    return write


# name -> builder(dst path, bases) -> path. `bases` holds the good inputs: "stories", "hf",
# "gguf", "artefact". Names ending in .bin/.gguf/.txt/.toml keep their suffix, as the CLI
# dispatches on it.
Bases = dict[str, Path]
BUILDERS: dict[str, Callable[[Path, Bases], Path]] = {
    # llama2.c
    "l2c_missing.bin": lambda p, b: p,
    "l2c_empty.bin": lambda p, b: truncated(b["stories"], p, 0),
    "l2c_header_only.bin": lambda p, b: truncated(b["stories"], p, L2C_HEADER),
    "l2c_short_header.bin": lambda p, b: truncated(b["stories"], p, 10),
    "l2c_half.bin": lambda p, b: truncated(b["stories"], p, 0.5),
    "l2c_minus_one.bin": lambda p, b: truncated(b["stories"], p, -1),
    "l2c_trailing.bin": lambda p, b: _text(b["stories"].read_bytes() + b"\0\0\0\0")(p),
    "l2c_flip_dim.bin": lambda p, b: flipped(b["stories"], p, 2, 7),      # dim 64 -> 8388672
    "l2c_flip_vocab_sign.bin": lambda p, b: flipped(b["stories"], p, 23, 7),  # untied classifier
    "l2c_flip_heads.bin": lambda p, b: flipped(b["stories"], p, 12, 0),   # n_heads 8 -> 9
    "l2c_flip_weights.bin": lambda p, b: random_flips(b["stories"], _copy_stories(
        p.parent / "fw", p.name), seed=1, count=8, lo=L2C_HEADER),
    "l2c_flip_exponent.bin": lambda p, b: flipped(b["stories"], _copy_stories(
        p.parent / "fx", p.name), L2C_HEADER + 4003, 6),                  # a weight -> huge/inf
    "l2c_random.bin": lambda p, b: _text(random.Random(3).randbytes(4096))(p),
    "l2c_nan.bin": lambda p, b: _float_at(b["stories"], _copy_stories(p.parent / "nan", p.name),
                                          L2C_HEADER + 4 * 1000, float("nan")),
    "l2c_inf.bin": lambda p, b: _float_at(b["stories"], _copy_stories(p.parent / "inf", p.name),
                                          L2C_HEADER + 4 * 70000, float("-inf")),
    # Hugging Face safetensors directories
    "hf_missing": lambda p, b: p,
    "hf_no_config": lambda p, b: _hf_variant(
        b["hf"], p, edit=lambda d: (d / "config.json").unlink()),
    "hf_config_not_json": lambda p, b: _hf_variant(
        b["hf"], p, edit=lambda d: (d / "config.json").write_text("{model_type: llama")),
    "hf_empty_st": lambda p, b: _hf_variant(b["hf"], p, edit=_st_edit(
        lambda s, d: truncated(s, d, 0))),
    "hf_truncated_st": lambda p, b: _hf_variant(b["hf"], p, edit=_st_edit(
        lambda s, d: truncated(s, d, 0.6))),
    "hf_header_cut_st": lambda p, b: _hf_variant(b["hf"], p, edit=_st_edit(
        lambda s, d: truncated(s, d, 100))),
    "hf_flip_header_st": lambda p, b: _hf_variant(b["hf"], p, edit=_st_edit(
        lambda s, d: flipped(s, d, 40, 1))),
    "hf_flip_len_st": lambda p, b: _hf_variant(b["hf"], p, edit=_st_edit(
        lambda s, d: flipped(s, d, 6, 0))),                               # header length huge
    "hf_flip_weights_st": lambda p, b: _hf_variant(b["hf"], p, edit=_st_edit(
        lambda s, d: random_flips(s, d, seed=2, count=8, lo=_safetensors_data_start(s)))),
    "hf_pickle_only": lambda p, b: _hf_variant(b["hf"], p, edit=lambda d: (
        d / "model.safetensors").rename(d / "pytorch_model.bin")),
    "hf_heads_not_dividing": lambda p, b: _hf_variant(b["hf"], p, {"num_attention_heads": 5,
                                                                   "num_key_value_heads": 5,
                                                                   "head_dim": None}),
    "hf_kv_not_dividing": lambda p, b: _hf_variant(b["hf"], p, {"num_key_value_heads": 3}),
    "hf_zero_layers": lambda p, b: _hf_variant(b["hf"], p, {"num_hidden_layers": 0}),
    "hf_vocab_zero": lambda p, b: _hf_variant(b["hf"], p, {"vocab_size": 0}),
    "hf_hidden_negative": lambda p, b: _hf_variant(b["hf"], p, {"hidden_size": -64}),
    "hf_hidden_string": lambda p, b: _hf_variant(b["hf"], p, {"hidden_size": "64"}),
    "hf_intermediate_zero": lambda p, b: _hf_variant(b["hf"], p, {"intermediate_size": 0}),
    "hf_sizes_disagree": lambda p, b: _hf_variant(b["hf"], p, {"hidden_size": 128}),
    "hf_unknown_type": lambda p, b: _hf_variant(b["hf"], p, {"model_type": "frobnicator"}),
    "hf_70b_no_weights": lambda p, b: (_llama70b_config(p), p)[1],
    "hf_nan_st": lambda p, b: _hf_variant(b["hf"], p, edit=_st_tensor(
        "model.layers.1.mlp.up_proj.weight", _nan_row)),
    "hf_int_st": lambda p, b: _hf_variant(b["hf"], p, edit=_st_tensor(
        "model.layers.0.mlp.down_proj.weight", _as_int32)),
    "gguf_bloom.gguf": lambda p, b: _gguf_arch(b["gguf"], p, b"bloom"),
    "gguf_inf.gguf": lambda p, b: _gguf_edited(p, _gguf_inf),
    "gguf_int.gguf": lambda p, b: _gguf_edited(p, _gguf_int32),
    # paths of the wrong kind, for every argument that names a file or a directory
    "a_directory": lambda p, b: (p.mkdir(), p)[1],
    "a_file.txt": lambda p, b: _text("a file where a directory is expected\n")(p),
    # GGUF
    "gguf_missing.gguf": lambda p, b: p,
    "gguf_empty.gguf": lambda p, b: truncated(b["gguf"], p, 0),
    "gguf_magic_only.gguf": lambda p, b: truncated(b["gguf"], p, 4),
    "gguf_header_cut.gguf": lambda p, b: truncated(b["gguf"], p, 300),
    "gguf_half.gguf": lambda p, b: truncated(b["gguf"], p, 0.5),
    "gguf_minus_one.gguf": lambda p, b: truncated(b["gguf"], p, -1),
    "gguf_flip_magic.gguf": lambda p, b: flipped(b["gguf"], p, 0, 0),
    "gguf_flip_version.gguf": lambda p, b: flipped(b["gguf"], p, 5, 3),
    "gguf_flip_counts.gguf": lambda p, b: flipped(b["gguf"], p, 14, 4),   # tensor count huge
    "gguf_flip_meta.gguf": lambda p, b: random_flips(b["gguf"], p, seed=4, count=4, lo=24),
    "gguf_flip_weights.gguf": lambda p, b: random_flips(b["gguf"], p, seed=5, count=8, lo=-4000),
    # calibration texts
    "calib_empty.txt": lambda p, b: _text("")(p),
    "calib_blank.txt": lambda p, b: _text(" \n\n \t\n")(p),
    "calib_short.txt": lambda p, b: _text("Once upon a time there was a cat.")(p),
    "calib_binary.txt": lambda p, b: _text(bytes(range(128, 256)) * 4)(p),
    "calib_missing.txt": lambda p, b: p,
    "calib_ok.txt": lambda p, b: _text(TINYSTORIES.read_text(encoding="utf-8")[:6000])(p),
    "recipe_missing.toml": lambda p, b: p,
    # artefacts
    "art_removed_model": lambda p, b: _artefact_variant(
        b["artefact"], p, lambda d: (d / "model.onnx.data").unlink()),
    "art_removed_tokenizer": lambda p, b: _artefact_variant(
        b["artefact"], p, lambda d: (d / "tokenizer.bin").unlink()),
    "art_removed_manifest": lambda p, b: _artefact_variant(
        b["artefact"], p, lambda d: (d / "manifest.json").unlink()),
    "art_changed_weights": lambda p, b: _artefact_variant(
        b["artefact"], p, _flip_file("model.onnx.data", 1000)),
    "art_changed_graph": lambda p, b: _artefact_variant(
        b["artefact"], p, _flip_file("model.onnx", 200)),
    "art_changed_manifest_json": lambda p, b: _artefact_variant(
        b["artefact"], p, lambda d: (d / "manifest.json").write_text("{\"format_version\": 1,")),
    "art_added_file": lambda p, b: _artefact_variant(
        b["artefact"], p, lambda d: (d / "extra.py").write_text("import os\n")),
    "art_added_dir": lambda p, b: _artefact_variant(
        b["artefact"], p, lambda d: ((d / "sub").mkdir(), (d / "sub" / "x.bin").write_bytes(b"1"))),
    "art_escape_parent": lambda p, b: _artefact_variant(
        b["artefact"], p, _edit_manifest(lambda m: m["files"].update({"../x.bin": "0" * 64}))),
    "art_escape_absolute": lambda p, b: _artefact_variant(
        b["artefact"], p, _edit_manifest(lambda m: m["files"].update({"/etc/passwd": "0" * 64}))),
    "art_symlink": lambda p, b: _artefact_variant(b["artefact"], p, _symlink_tokenizer),
    "art_format_version": lambda p, b: _artefact_variant(
        b["artefact"], p, _edit_manifest(lambda m: m.update(format_version=99))),
    "art_no_io": lambda p, b: _artefact_variant(
        b["artefact"], p, _edit_manifest(lambda m: m.update(io={}))),
    "art_bad_config": lambda p, b: _artefact_variant(
        b["artefact"], p, _edit_manifest(lambda m: m["config"].pop("max_position"))),
    "art_bad_tokenizer_kind": lambda p, b: _artefact_variant(
        b["artefact"], p, _edit_manifest(lambda m: m["tokenizer"].update(kind="sentencepiece"))),
    "art_not_dir": lambda p, b: _text("not an artefact")(p),
    # a manifest whose config disagrees with the graph it describes (issue 26: inspect said fine)
    "art_config_layers": lambda p, b: _artefact_variant(
        b["artefact"], p, _edit_manifest(lambda m: m["config"].update(num_layers=7))),
    "art_config_kv_heads": lambda p, b: _artefact_variant(
        b["artefact"], p, _edit_manifest(lambda m: m["config"].update(num_kv_heads=1))),
}


def build_inputs(root: Path, bases: Bases, names: list[str] | None = None) -> dict[str, Path]:
    """Write the named inputs (all of BUILDERS by default) under `root`; {name: path}."""
    out = {}
    for name in names or BUILDERS:
        path = root / name
        out[name] = BUILDERS[name](path, bases)
    return out
