"""Checks of user arguments, shared by the CLI and the Python API, made before any work is done.

Each raises InputError with one line naming the argument, what was wrong and what is accepted.
An output is judged by what is on disk now (the path itself and its nearest existing ancestor);
the one thing created is an empty probe directory in that ancestor, removed at once, so a
refused command leaves the filesystem exactly as it found it.

Kinds of output directory:
  "artefact"  replaced atomically by the artefact writer: a new path, an empty directory or a
              previous splice artefact (backends/artefact.py refuses anything else too, but only
              after the work; here it is refused before);
  "dir"       written into (IR dumps, debug reports, caches): a new path or an existing directory.

Standard library only (and splice.errors), so that checking costs nothing before an import.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from .errors import InputError

MANIFEST = "manifest.json"


def path_argument(value: Any, what: str) -> Path:
    """`value` as a Path: a str or os.PathLike that is not empty."""
    if value is None:
        raise InputError(f"{what} is missing (None); give a path")
    if isinstance(value, bytes) or not isinstance(value, (str, os.PathLike)):
        raise InputError(f"{what} must be a path (str or pathlib.Path), got "
                         f"{type(value).__name__}")
    text = os.fspath(value)
    if isinstance(text, bytes):
        raise InputError(f"{what} must be a text path, got a bytes path {text!r:.60}")
    if not text.strip():
        raise InputError(f"{what} is an empty path; give a file or directory name")
    if "\0" in text:
        raise InputError(f"{what} contains a NUL character; give a real path")
    text_argument(text, what)
    return Path(text)


def input_file(value: Any, what: str) -> Path:
    """An existing, readable regular file (or a symlink to one)."""
    path = path_argument(value, what)
    try:
        if not path.exists():
            raise InputError(f"{what} {path} not found; give an existing file")
        if path.is_dir():
            raise InputError(f"{what} {path} is a directory; give a file")
        if not path.is_file():
            raise InputError(f"{what} {path} is not a regular file; give a file")
    except OSError as e:       # a name too long, a component that is not a directory
        raise InputError(f"{what} {path} cannot be read ({e.strerror}); give a file") from None
    if not os.access(path, os.R_OK):
        raise InputError(f"{what} {path} is not readable (permission denied)")
    return path


def output_dir(value: Any, what: str, kind: str = "dir") -> Path:
    """A directory splice may write (see the module docstring for `kind`); returns its Path."""
    if kind not in ("artefact", "dir"):
        raise ValueError(f"output kind {kind!r}")
    path = path_argument(value, what)
    try:
        _check_output(path, what, kind)
    except OSError as e:
        raise InputError(f"{what} {path} cannot be used ({e.strerror}); give a directory "
                         "path splice may write") from None
    return path


def _check_output(path: Path, what: str, kind: str) -> None:
    if path.is_symlink() and kind == "artefact":
        raise InputError(f"{what} {path} is a symlink; give the real directory")
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{what} {path} exists and is not a directory; give a "
                             "directory path")
        if kind == "artefact" and any(path.iterdir()) and not (path / MANIFEST).is_file():
            raise InputError(f"{what} {path} exists and is not a splice artefact (no "
                             f"{MANIFEST}); refusing to replace it: give a new or empty "
                             "directory")
        # an artefact is replaced through a sibling: its parent must be writable too
        where = path.absolute().parent if kind == "artefact" else path
    else:
        where = path.absolute().parent
    while not where.exists() and where != where.parent:
        if where.is_symlink():    # a dangling link: mkdir would fail on it
            raise InputError(f"{what} {path}: {where} is a broken symlink")
        where = where.parent
    if not where.is_dir():
        raise InputError(f"{what} {path}: {where} is not a directory")
    _probe_writable(where, f"{what} {path}")


def _probe_writable(directory: Path, what: str) -> None:
    """Whether an entry can be created in `directory`: a hidden empty directory is made and
    removed at once (permission bits alone do not tell: root ignores them, and a read-only mount
    or a kernel filesystem refuses what they allow)."""
    import tempfile

    try:
        probe = tempfile.mkdtemp(prefix=".splice-probe-", dir=directory)
    except OSError as e:
        raise InputError(f"{what}: cannot write in {directory} ({e.strerror}); give a "
                         "directory you can write") from None
    os.rmdir(probe)


def text_argument(value: Any, what: str, *, allow_empty: bool = True) -> str:
    """A str that encodes as UTF-8 (no lone surrogates)."""
    if not isinstance(value, str):
        raise InputError(f"{what} must be a str, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{what} is not valid Unicode text ({e.reason} at character "
                         f"{e.start}); give text that encodes as UTF-8") from None
    if not allow_empty and not value:
        raise InputError(f"{what} is empty")
    return value


def integer(value: Any, what: str, *, minimum: int | None = None, maximum: int | None = None,
            optional: bool = False) -> int | None:
    """An int (not a bool) in [minimum, maximum]; None passes when `optional`."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{what} must be an integer{_range(minimum, maximum)}, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise InputError(f"{what} must be an integer{_range(minimum, maximum)}, got {value}")
    return value


def number(value: Any, what: str, *, minimum: float | None = None, maximum: float | None = None,
           above: float | None = None, optional: bool = False) -> float | None:
    """A finite real number in range: >= minimum, > above, <= maximum."""
    if value is None and optional:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    accepted = _range(minimum, maximum, above)
    if not ok or not math.isfinite(value):
        raise InputError(f"{what} must be a finite number{accepted}, got {value!r}")
    if ((minimum is not None and value < minimum) or (above is not None and value <= above)
            or (maximum is not None and value > maximum)):
        raise InputError(f"{what} must be a finite number{accepted}, got {value!r}")
    return float(value)


def _range(minimum=None, maximum=None, above=None) -> str:
    parts = []
    if minimum is not None:
        parts.append(f">= {minimum}")
    if above is not None:
        parts.append(f"> {above}")
    if maximum is not None:
        parts.append(f"<= {maximum}")
    return " " + " and ".join(parts) if parts else ""
