"""The artefact format: manifest.json, file hashes, and the checks `runtime.load` makes.

An artefact is a directory holding manifest.json and the files it lists, each with its sha256. The
manifest is the only file not listed (it cannot hash itself); pin it by passing its own sha256 to
`runtime.load(expected_manifest_sha256=...)`. Loading refuses an artefact whose files were removed,
changed or added, and a manifest whose paths could reach outside the directory (absolute paths,
"..", symlinks). Nothing in an artefact is ever unpickled: the manifest is JSON, the model is ONNX.

This module is shared by the writer (backends/artefact.py) and the reader, and imports neither
torch nor onnxruntime, so both sides agree on one definition of the format.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from splice.errors import ArtefactError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_CHUNK = 1 << 22


def sha256_file(path: Path, *, fsync: bool = False) -> str:
    """Hex sha256 of a file, read in chunks so multi-gigabyte weights do not sit in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def check_relpath(rel: Any) -> str:
    """`rel` if it is a plain relative path inside the artefact ("a/b.bin"), else ArtefactError:
    no absolute paths, drive letters, backslashes, "..", "." or empty parts, no manifest.json."""
    if not isinstance(rel, str) or not rel:
        raise ArtefactError(f"artefact path {rel!r}: expected a non-empty relative path string")
    if "\\" in rel or "\0" in rel:
        raise ArtefactError(f"artefact path {rel!r}: backslashes and NUL bytes are not accepted; "
                            "use '/'-separated relative paths")
    p = PurePosixPath(rel)
    if p.is_absolute() or (len(rel) > 1 and rel[1] == ":"):
        raise ArtefactError(f"artefact path {rel!r} is absolute; only paths inside the artefact "
                            "directory are accepted")
    parts = rel.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ArtefactError(f"artefact path {rel!r} has an empty, '.' or '..' part; only plain "
                            "paths inside the artefact directory are accepted")
    if rel == MANIFEST:
        raise ArtefactError(f"artefact path {rel!r}: the manifest does not list itself")
    return rel


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The parsed manifest of an artefact directory, without checking the files (see
    `verify_artefact`). Raises ArtefactError when it is missing, not JSON, or not a manifest."""
    return parse_manifest(_manifest_bytes(Path(directory)), where=str(directory))


def _manifest_bytes(directory: Path) -> bytes:
    if not directory.is_dir():
        raise ArtefactError(f"artefact {directory}: not a directory")
    path = directory / MANIFEST
    if path.is_symlink() or not path.is_file():
        raise ArtefactError(f"artefact {directory}: no {MANIFEST} (is this a splice artefact?)")
    return path.read_bytes()


def parse_manifest(data: bytes, *, where: str) -> dict[str, Any]:
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtefactError(f"artefact {where}: {MANIFEST} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise ArtefactError(f"artefact {where}: {MANIFEST} must hold a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtefactError(f"artefact {where}: format_version {version!r}; this splice reads "
                            f"version {FORMAT_VERSION}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtefactError(f"artefact {where}: {MANIFEST} has no 'files' table of path -> sha256")
    for rel, digest in files.items():
        check_relpath(rel)
        if not (isinstance(digest, str) and len(digest) == 64
                and all(c in "0123456789abcdef" for c in digest)):
            raise ArtefactError(f"artefact {where}: the hash of {rel!r} is {digest!r}; expected "
                                "64 lowercase hex digits (sha256)")
    return manifest


def verify_artefact(directory: str | Path, *, expected_manifest_sha256: str | None = None
                    ) -> dict[str, Any]:
    """Check an artefact directory and return its manifest: the manifest's own hash when pinned,
    every listed file present, a regular file reached without symlinks, and of the listed sha256;
    no file present that the manifest does not list."""
    directory = Path(directory)
    data = _manifest_bytes(directory)
    if expected_manifest_sha256 is not None:
        got = hashlib.sha256(data).hexdigest()
        if got != expected_manifest_sha256.lower():
            raise ArtefactError(f"artefact {directory}: {MANIFEST} has sha256 {got}, not the "
                                f"pinned {expected_manifest_sha256}")
    manifest = parse_manifest(data, where=str(directory))
    files: dict[str, str] = manifest["files"]
    for rel, digest in files.items():
        path = _inside(directory, rel)
        got = sha256_file(path)
        if got != digest:
            raise ArtefactError(f"artefact {directory}: file {rel!r} was changed (sha256 {got}, "
                                f"the manifest lists {digest})")
    for rel in present_files(directory):
        if rel != MANIFEST and rel not in files:
            raise ArtefactError(f"artefact {directory}: file {rel!r} is not listed in the "
                                f"manifest (added after the artefact was written); remove it")
    cross_check(manifest, str(directory))
    return manifest


def cross_check(manifest: dict[str, Any], where: str) -> None:
    """The model config that `inspect` shows agrees with the graph's inputs that `run` feeds: the
    layer count and each layer's cache shape (where the manifest describes its cache)."""
    config, io = manifest.get("config"), manifest.get("io")
    if not isinstance(config, dict) or not isinstance(io, dict):
        return
    past = io.get("past")
    layers = {"config num_layers": config.get("num_layers"), "io num_layers": io.get("num_layers"),
              "io past entries": len(past) if isinstance(past, list) else None}
    known = {k: v for k, v in layers.items() if v is not None}
    if len(set(map(str, known.values()))) > 1:
        raise ArtefactError(f"artefact {where}: the manifest disagrees with itself about the layer "
                            f"count ({', '.join(f'{k} {v}' for k, v in known.items())})")
    for i, entry in enumerate(past if isinstance(past, list) else ()):
        for key, cfg_key in (("kv_heads", "num_kv_heads"), ("head_dim", "head_dim")):
            if isinstance(entry, dict) and key in entry and cfg_key in config \
                    and entry[key] != config[cfg_key]:
                raise ArtefactError(f"artefact {where}: layer {i}'s cache has {key} {entry[key]} "
                                    f"but the config's {cfg_key} is {config[cfg_key]}")


def _inside(directory: Path, rel: str) -> Path:
    """The listed file's path, refusing symlinks on the way and anything but a regular file."""
    path = directory
    for part in rel.split("/"):
        path = path / part
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise ArtefactError(f"artefact {directory}: file {rel!r} is missing") from None
        if stat.S_ISLNK(st.st_mode):
            raise ArtefactError(f"artefact {directory}: {rel!r} goes through the symlink "
                                f"{path.relative_to(directory)}; artefacts hold no symlinks")
    if not stat.S_ISREG(st.st_mode):
        raise ArtefactError(f"artefact {directory}: {rel!r} is not a regular file")
    return path


def present_files(directory: Path) -> list[str]:
    """Every file under `directory` as a '/'-separated relative path; a symlink anywhere is an
    error, since following one could read (or hash) something outside the artefact."""
    out = []
    for root, dirs, names in os.walk(directory, followlinks=False):
        for name in dirs + names:
            p = Path(root) / name
            if p.is_symlink():
                raise ArtefactError(f"artefact {directory}: {p.relative_to(directory)} is a "
                                    "symlink; artefacts hold no symlinks")
        out += [(Path(root) / n).relative_to(directory).as_posix() for n in names]
    return sorted(out)
