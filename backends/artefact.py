"""Write an artefact directory atomically: every file, then manifest.json with their sha256.

The files are written into a hidden temporary sibling of the target (same filesystem, so renames
are atomic), hashed and fsynced, the manifest is written last, and only then does the directory
take the target's name. A previous artefact at the target stays whole until the new one is
complete: on Linux the two directories are exchanged in one atomic renameat2(RENAME_EXCHANGE), so
the target always holds a whole artefact, the old or the new, even if the process is killed; then
the old one is deleted. Elsewhere it is renamed aside, the new one renamed in, and the old one
deleted. An exclusive lock on a sibling lock file (flock, released by the kernel if the process
dies) on the target's parent directory itself serialises two compiles into one target (and, as
a side effect, the final write phase of artefacts that share a parent); it needs no lock file, so
nothing is left beside the artefact, and no waiter can ever hold a lock on a file that another
writer has unlinked and recreated. What a killed writer leaves, the next write into that target
cleans up before it starts: its hidden temporary directory is deleted and an old artefact left
aside between the two renames of the fallback is restored.

The format itself (manifest name, hashing, accepted paths) is defined once in runtime/manifest.py,
which the reader uses too.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import functools
import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from splice.errors import ArtefactError
from splice.runtime.manifest import FORMAT_VERSION, MANIFEST, check_relpath, present_files, sha256_file

log = logging.getLogger(__name__)

# bytes are written as they are, a path is copied, a callable writes the file at the path it is
# given (and may write siblings beside it, such as a model's external weights: every file that
# ends up in the directory is hashed and listed)
FileSource = bytes | bytearray | memoryview | str | os.PathLike | Callable[[Path], None]

RESERVED_FIELDS = ("format_version", "files")


def write_artefact(out_dir: str | Path, files: Mapping[str, FileSource],
                   manifest_fields: Mapping[str, Any]) -> Path:
    """Write `files` (relative path -> source) and a manifest holding `manifest_fields` plus
    format_version and the sha256 of every file into `out_dir`, atomically. `manifest_fields` must
    name the backend and the target. Returns the artefact's path."""
    for key in ("backend", "target"):
        if not manifest_fields.get(key):
            raise ArtefactError(f"artefact manifest needs a {key!r} field")
    clash = [k for k in RESERVED_FIELDS if k in manifest_fields]
    if clash:
        raise ArtefactError(f"artefact manifest fields {clash} are computed by write_artefact; "
                            "do not pass them")
    if not files:
        raise ArtefactError("an artefact needs at least one file")
    for rel in files:
        check_relpath(rel)
    manifest_text = json.dumps(dict(manifest_fields), indent=2, default=_jsonable)  # fail early
    out = Path(out_dir).absolute()
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _locked(parent):
        _recover(out)
        _check_replaceable(out)
        tmp = parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:  # mkdir inside: an interrupt just after it must not leave the directory
            tmp.mkdir()
            for rel, source in files.items():
                _write_one(tmp, rel, source)
            hashes = {rel: sha256_file(tmp / rel, fsync=True) for rel in present_files(tmp)}
            if MANIFEST in hashes:
                raise ArtefactError(f"a file source wrote {MANIFEST}; that name is the manifest's")
            manifest = {"format_version": FORMAT_VERSION, **json.loads(manifest_text),
                        "files": hashes}
            with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
                json.dump(manifest, f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            _swap_in(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("wrote artefact %s (%d files)", out, len(hashes))
    return out


def _write_one(root: Path, rel: str, source: FileSource) -> None:
    dest = root / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(source, (bytes, bytearray, memoryview)):
        dest.write_bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        src = Path(source)
        if not src.is_file():
            raise ArtefactError(f"artefact file {rel!r}: source {src} is not a file")
        shutil.copyfile(src, dest)
    elif callable(source):
        source(dest)
        if not dest.is_file():
            raise ArtefactError(f"artefact file {rel!r}: its writer did not create it")
    else:
        raise ArtefactError(f"artefact file {rel!r}: source of type {type(source).__name__}; "
                            "accepted: bytes, a file path, or a callable that writes the file")


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive flock on `directory` (a descriptor of the directory itself, opened read-only)
    for the duration; waits for a concurrent writer. No file is created, so there is nothing to
    leave behind, and the lock is on the directory that holds the target: a writer never unlinks
    and recreates it, as a cleanup could a lock file that a waiter still holds open."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another artefact writer in %s", directory)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _siblings(out: Path, kind: str) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.{kind}-*"))


def _recover(out: Path) -> None:
    """Under the lock, no other writer is live: remove what a dead one left, and put back a
    previous artefact that a crash left renamed aside with nothing in its place."""
    for tmp in _siblings(out, "tmp"):
        log.warning("removing %s, left by an interrupted artefact write", tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    olds = _siblings(out, "old")
    if olds and not os.path.lexists(out):
        newest = max(olds, key=lambda p: p.stat().st_mtime)
        log.warning("restoring %s from %s, left aside by an interrupted artefact write", out,
                    newest)
        os.rename(newest, out)
        olds.remove(newest)
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)


def _check_replaceable(out: Path) -> None:
    """Only an artefact or an empty directory may be replaced: a typo in --out must never delete
    someone's home directory."""
    if out.is_symlink():
        raise ArtefactError(f"output {out} is a symlink; give the real directory")
    if not out.exists():
        return
    if not out.is_dir():
        raise ArtefactError(f"output {out} exists and is not a directory")
    if any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise ArtefactError(f"output {out} exists and is not a splice artefact (no {MANIFEST}); "
                            "refusing to replace it: give a new or empty directory")


def _swap_in(tmp: Path, out: Path) -> None:
    if not os.path.lexists(out):
        os.rename(tmp, out)
        _fsync_dir(out.parent)
        return
    if _exchange(tmp, out):
        # one atomic step: `out` is the new artefact and `tmp` holds the previous one, which a
        # crash before this rmtree leaves for the next write's _recover to delete
        _fsync_dir(out.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    _fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE, glibc >= 2.28); False
    where the platform or the filesystem cannot, and the caller falls back to two renames."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _jsonable(obj: Any) -> Any:
    """JSON for what manifests carry beyond plain JSON: dataclasses (recipes, reports), paths,
    tuples and sets, numpy and torch scalars."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return obj.to_dict()
    raise TypeError(f"manifest field value of type {type(obj).__name__} is not JSON: {obj!r:.80}")
