"""The checks every runtime makes before it opens an artefact, once: the manifest read and every
file's hash checked (manifest.verify_artefact), the backend the runtime runs, the manifest sections
it reads present as tables, the model config's fields of the right types, and a file the manifest
names being one of its hashed files.

Each backend's runtime (onnx_runtime, tvm_runtime, npu_runtime, ...) opens through
`checked_manifest`; `splice.runtime.load` (loader.py) reads the backend from the checked manifest
and hands it to that runtime. This module imports no backend runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from splice.errors import ArtefactError
from .manifest import check_relpath, verify_artefact

__all__ = ["check_config", "checked_manifest", "listed_file", "require_sections"]


def checked_manifest(path: str | Path, *, backend: str | None = None,
                     expected_manifest_sha256: str | None = None) -> tuple[Path, dict[str, Any]]:
    """The artefact's path and its verified manifest (hashes checked, pinned manifest hash when
    given); refuses another `backend` than the one named (None: any)."""
    path = Path(path)
    manifest = verify_artefact(path, expected_manifest_sha256=expected_manifest_sha256)
    if backend is not None and manifest.get("backend") != backend:
        raise ArtefactError(f"artefact {path}: backend {manifest.get('backend')!r}; this runtime "
                            f"runs {backend!r} artefacts")
    return path, manifest


def require_sections(path: Path, manifest: dict[str, Any], *keys: str) -> None:
    """Refuse a manifest without one of the sections `keys` as a table."""
    for key in keys:
        if not isinstance(manifest.get(key), dict):
            raise ArtefactError(f"artefact {path}: the manifest has no {key!r} section")


def listed_file(path: Path, manifest: dict[str, Any], rel: Any, what: str) -> str:
    """`rel` (a path the manifest names) when it is a plain relative path among the artefact's
    hashed files; `what` names it in the error ("the model file", "the library")."""
    rel = check_relpath(rel)
    if rel not in manifest["files"]:
        raise ArtefactError(f"artefact {path}: {what} {rel!r} is not among its files")
    return rel


def _is_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def check_config(path: Path, manifest: dict[str, Any],
                 positive: tuple[str, ...] = ("max_position", "vocab_size")) -> None:
    """The config and tokenizer sections hold what generation reads, of the right types: a
    manifest edited by hand (its hashes cover the other files, not itself unless pinned) fails
    here with its defect named, not later with a KeyError in the middle of a generation."""
    def bad(what: str) -> ArtefactError:
        return ArtefactError(f"artefact {path}: the manifest's {what}")

    cfg = manifest["config"]
    for key in positive:
        if not isinstance(cfg.get(key), int) or isinstance(cfg.get(key), bool) or cfg[key] < 1:
            raise bad(f"config.{key} is {cfg.get(key)!r}; expected a positive integer")
    if cfg.get("bos_token_id") is not None and not _is_id(cfg["bos_token_id"]):
        raise bad(f"config.bos_token_id is {cfg['bos_token_id']!r}; expected a token id or null")
    eos = cfg.get("eos_token_ids")
    if eos is not None and not (isinstance(eos, list) and all(map(_is_id, eos))):
        raise bad(f"config.eos_token_ids is {eos!r}; expected a list of token ids or null")
    tok = manifest.get("tokenizer")
    if tok is not None and not (isinstance(tok, dict) and isinstance(tok.get("kind"), str)
                                and isinstance(tok.get("files"), list)
                                and all(isinstance(f, str) for f in tok["files"])):
        raise bad(f"tokenizer section is {tok!r:.80}; expected null or a table with a 'kind' "
                  "name and a list of 'files'")
