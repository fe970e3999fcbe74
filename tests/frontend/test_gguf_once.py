"""frontend/gguf_once.py: a GGUF import parses its file once (one gguf.GGUFReader, one
TensorNameMap), shares readers only inside the context and per version of the file, restores gguf
on the way out, and gives the module an import without it gives."""

from __future__ import annotations

import os

import gguf
import pytest
import torch
from transformers.modeling_gguf_pytorch_utils import read_field

from splice.errors import FrontendError
from splice.frontend import hf
from splice.frontend.gguf_once import parse_once
from splice.frontend.lazy_gguf import load_gguf_lazy
from tests.frontend.test_lazy_gguf import write_gguf


def test_an_import_builds_one_reader_and_one_name_map(tmp_path, monkeypatch):
    path = tmp_path / "llama.gguf"
    write_gguf(path, "llama")
    plain_reader, plain_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers, maps = [], []

    def reader(p, mode="r"):
        readers.append(os.fspath(p))
        return plain_reader(p, mode)

    def name_map(*args):
        maps.append(args)
        return plain_map(*args)

    monkeypatch.setattr(gguf, "GGUFReader", reader)
    monkeypatch.setattr(gguf, "get_tensor_name_map", name_map)
    for load in (hf.load_gguf, load_gguf_lazy):  # transformers alone: 3 readers, ~30 maps
        readers.clear()
        maps.clear()
        load(path)
        assert len(readers) == 1 and len(maps) == 1, load.__name__
        assert gguf.GGUFReader is reader and gguf.get_tensor_name_map is name_map


def test_the_import_equals_one_outside_the_context(tmp_path):
    path = tmp_path / "qwen2.gguf"
    write_gguf(path, "qwen2")
    once = hf.load_gguf(path)
    model = hf._load_model(path, path.parent, gguf_file=path.name)  # no parse_once here
    plain = hf.from_transformers(model, hf.gguf_tokenizer(path), source=str(path))
    assert str(once.graph) == str(plain.graph) and once.config == plain.config
    assert once.tokenizer == plain.tokenizer and sorted(once.weights) == sorted(plain.weights)
    for k, w in plain.weights.items():
        assert once.weights[k].dtype == w.dtype and torch.equal(once.weights[k], w), k


def test_readers_are_shared_inside_the_context_per_version_of_the_file(tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    write_gguf(a, "llama")
    write_gguf(b, "qwen2")
    plain = gguf.GGUFReader
    with parse_once():
        first = gguf.GGUFReader(str(a))
        assert gguf.GGUFReader(a) is first and gguf.GGUFReader(str(b)) is not first
        with parse_once():  # nested: the outer context's readers
            assert gguf.GGUFReader(str(a)) is first
        assert gguf.GGUFReader(str(a)) is first  # the inner exit left the outer one active
        copy = gguf.GGUFReader(str(a), "c")  # copy-on-write maps are not shared
        assert isinstance(copy, plain) and copy is not first
        os.replace(b, a)  # another file at the same path: read afresh
        again = gguf.GGUFReader(str(a))
        assert again is not first and read_field(again, "general.architecture") == ["qwen2"]
    assert gguf.GGUFReader is plain and isinstance(gguf.GGUFReader(str(a)), plain)
    with parse_once():  # the nesting count is back to 0: a new context shares again
        assert gguf.GGUFReader(str(a)) is gguf.GGUFReader(str(a))


def test_gguf_is_restored_when_the_import_fails(tmp_path):
    path = tmp_path / "llama.gguf"
    write_gguf(path, "llama")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    plain_reader, plain_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with pytest.raises(FrontendError, match="cut.gguf is a truncated or corrupt GGUF file"):
        hf.load_gguf(cut)
    assert gguf.GGUFReader is plain_reader and gguf.get_tensor_name_map is plain_map
