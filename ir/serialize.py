"""Save and load a Module as a directory: graph.txt (the text form), weights.safetensors,
config.json and the tokenizer files. No pickle anywhere."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from .core import IRError, Module, ModelConfig, Tokenizer
from .parser import parse_graph
from .printer import print_graph


def save_module(module: Module, path: str | Path) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "graph.txt").write_text(print_graph(module.graph))
    save_file({k: v.contiguous() for k, v in module.weights.items()}, str(path / "weights.safetensors"))
    meta = {"config": module.config.to_json(), "tokenizer": None}
    if module.tokenizer is not None:
        tdir = path / "tokenizer"
        tdir.mkdir(exist_ok=True)
        for name, data in module.tokenizer.files.items():
            (tdir / name).write_bytes(data)
        meta["tokenizer"] = {"kind": module.tokenizer.kind, "files": sorted(module.tokenizer.files)}
    (path / "module.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


def load_module(path: str | Path) -> Module:
    path = Path(path)
    for f in ("graph.txt", "weights.safetensors", "module.json"):
        if not (path / f).is_file():
            raise IRError(f"{path} is not a saved module: {f} is missing")
    meta = json.loads((path / "module.json").read_text())
    tok = None
    if meta.get("tokenizer"):
        t = meta["tokenizer"]
        tok = Tokenizer(t["kind"], {n: (path / "tokenizer" / Path(n).name).read_bytes() for n in t["files"]})
    return Module(parse_graph((path / "graph.txt").read_text()), load_file(str(path / "weights.safetensors")),
                  ModelConfig.from_json(meta["config"]), tok)
