"""Untrusted artefacts and checkpoints: nothing is ever unpickled, a pinned manifest cannot be
swapped, and no path inside an artefact reaches outside it.

The source scan reads every module of the installed package (splice/, frontend/, ir/, passes/,
backends/, runtime/) with `ast`: no pickle-family import or call, torch.load only with
weights_only=True, np.load never with allow_pickle=True, no torch.jit.load, no yaml.load without
a safe loader, no trust_remote_code=True. tests/runtime/test_runtime.py covers removed, changed
and added files, '..' and absolute manifest paths and symlinks; this file adds what an attacker
who can rewrite the whole artefact (its manifest included) could try.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from splice.errors import ArtefactError
from splice.runtime import load
from splice.runtime.manifest import MANIFEST, sha256_file
from tests.reliability.conftest import TRIED

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = ("splice", "frontend", "ir", "passes", "backends", "runtime")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve",
                  "marshal", "pickletools"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_uses(source: str, filename: str = "<source>") -> list[str]:
    """Every place in `source` that could unpickle or run code from a file: 'file:line: what'."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in PICKLE_MODULES:
                found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            last = name.rsplit(".", 1)[-1]
            if name.split(".")[0] in PICKLE_MODULES or last in ("Unpickler", "unsafe_load"):
                found.append(f"{where}: {name}()")
            elif name == "torch.load" and not _is_true(_kw(node, "weights_only")):
                found.append(f"{where}: torch.load without weights_only=True")
            elif name in ("np.load", "numpy.load") and _kw(node, "allow_pickle") is not None \
                    and not (isinstance(_kw(node, "allow_pickle"), ast.Constant)
                             and _kw(node, "allow_pickle").value is False):
                found.append(f"{where}: {name} with allow_pickle")
            elif name in ("torch.jit.load", "torch.package.PackageImporter"):
                found.append(f"{where}: {name}()")
            elif name == "yaml.load" and "Safe" not in ast.unparse(_kw(node, "Loader") or
                                                                     ast.Constant(None)):
                found.append(f"{where}: yaml.load without a safe loader")
            if _is_true(_kw(node, "trust_remote_code")):
                found.append(f"{where}: trust_remote_code=True")
    return found


def test_the_scanner_finds_what_it_looks_for():
    bad = ("import pickle\nfrom dill import loads\nimport torch, numpy as np, yaml\n"
           "torch.load(f)\ntorch.load(f, weights_only=False)\nnp.load(f, allow_pickle=True)\n"
           "torch.jit.load(f)\nyaml.load(s)\nAutoModel.from_pretrained(p, trust_remote_code=True)\n"
           "pickle.Unpickler(f).load()\n")
    assert len(unsafe_uses(bad)) == 9, unsafe_uses(bad)     # one per line but the third
    good = ("import torch, numpy as np, yaml\ntorch.load(f, weights_only=True)\nnp.load(f)\n"
            "np.load(f, allow_pickle=False)\nyaml.load(s, Loader=yaml.SafeLoader)\n"
            "AutoModel.from_pretrained(p, local_files_only=True)\n")
    assert unsafe_uses(good) == []


def test_no_source_file_can_unpickle():
    files = [p for d in PACKAGE_DIRS for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 30, "the package sources were not found"
    found = [u for p in files for u in unsafe_uses(p.read_text(encoding="utf-8"),
                                                     str(p.relative_to(ROOT)))]
    assert found == []
    TRIED["untrusted"]["source files scanned"] += len(files)


# -- a pinned manifest ------------------------------------------------------------------------

@pytest.fixture
def copy(bases, tmp_path) -> Path:
    dst = tmp_path / "art"
    shutil.copytree(bases["artefact"], dst)
    return dst


def _rewrite(path: Path, rel: str, data: bytes) -> None:
    """What an attacker who controls the directory does: replace a file and re-hash it in the
    manifest, so that the artefact is self-consistent."""
    (path / rel).write_bytes(data)
    m = json.loads((path / MANIFEST).read_text())
    m["files"][rel] = hashlib.sha256(data).hexdigest()
    (path / MANIFEST).write_text(json.dumps(m))


def test_pinned_manifest_refuses_a_consistent_substitute(copy):
    pin = sha256_file(copy / MANIFEST)
    load(copy, expected_manifest_sha256=pin)
    load(copy, expected_manifest_sha256=pin.upper())
    tok = bytearray((copy / "tokenizer.bin").read_bytes())
    tok[-1] ^= 1
    _rewrite(copy, "tokenizer.bin", bytes(tok))
    load(copy)              # without a pin, a self-consistent artefact is all one can check
    with pytest.raises(ArtefactError, match="not the pinned"):
        load(copy, expected_manifest_sha256=pin)
    for wrong in ("0" * 64, "not a hash", ""):
        with pytest.raises(ArtefactError, match="not the pinned"):
            load(copy, expected_manifest_sha256=wrong)
    TRIED["untrusted"]["pins"] += 6


# -- paths that try to leave the artefact -----------------------------------------------------

def _edit(path: Path, fn) -> None:
    m = json.loads((path / MANIFEST).read_text())
    fn(m)
    (path / MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("bad", ["../art2/model.onnx", "/etc/passwd", "sub/../../x"])
def test_model_and_tokenizer_paths_cannot_escape(copy, bad):
    _edit(copy, lambda m: m["onnx"].update(model=bad))
    with pytest.raises(ArtefactError, match="artefact path"):
        load(copy)
    _edit(copy, lambda m: m["onnx"].update(model="model.onnx"))
    _edit(copy, lambda m: m["tokenizer"].update(files=[bad]))
    with pytest.raises(ArtefactError, match="artefact path"):
        load(copy).tokenizer  # noqa: B018 - the tokenizer is read on first use
    TRIED["untrusted"]["escaping paths"] += 2


@pytest.mark.parametrize("where", ["../outside.data", "ABSOLUTE"])
def test_onnx_external_data_cannot_point_outside(copy, where):
    """model.onnx names its weights file itself; ONNX Runtime must not follow it out of the
    artefact, even when the manifest's hashes were made to match."""
    import onnx

    outside = copy.parent / "outside.data"
    shutil.copyfile(copy / "model.onnx.data", outside)
    location = str(outside) if where == "ABSOLUTE" else where
    model = onnx.load(str(copy / "model.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    (copy / "model.onnx.data").unlink()
    _edit(copy, lambda m: m["files"].pop("model.onnx.data"))
    _rewrite(copy, "model.onnx", model.SerializeToString())
    with pytest.raises(ArtefactError, match="ONNX Runtime cannot load"):
        load(copy)
    TRIED["untrusted"]["escaping paths"] += 1


def test_special_files_are_refused(copy):
    """A FIFO in place of a listed file would block the hashing forever; a symlinked manifest
    could be any file."""
    tok = (copy / "tokenizer.bin").read_bytes()
    (copy / "tokenizer.bin").unlink()
    os.mkfifo(copy / "tokenizer.bin")
    with pytest.raises(ArtefactError, match="not a regular file"):
        load(copy)
    (copy / "tokenizer.bin").unlink()
    (copy / "tokenizer.bin").write_bytes(tok)
    os.mkfifo(copy / "extra")
    with pytest.raises(ArtefactError, match="'extra' is not listed"):
        load(copy)
    (copy / "extra").unlink()
    (copy / "real.json").write_bytes((copy / MANIFEST).read_bytes())
    (copy / MANIFEST).unlink()
    (copy / MANIFEST).symlink_to(copy / "real.json")
    with pytest.raises(ArtefactError, match="no manifest.json"):
        load(copy)
    TRIED["untrusted"]["special files"] += 3
