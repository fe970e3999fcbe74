"""Text in and out of token ids for compile-time work (calibration, evaluation)."""

from __future__ import annotations

from pathlib import Path

from splice.errors import InputError


def read_text(path: Path) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"text file {path} not found") from None
    except IsADirectoryError:
        raise InputError(f"text file {path} is a directory; give a UTF-8 text file") from None
    except OSError as e:
        raise InputError(f"text file {path} cannot be read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise InputError(f"text file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise InputError(f"text file {path} is empty")
    return text


def module_tokenizer(module):
    """The runtime tokenizer for a Module's carried tokenizer files."""
    from splice.runtime.tokenizer import load_tokenizer

    if module.tokenizer is None:
        raise InputError("this model carries no tokenizer; give token ids instead of text")
    return load_tokenizer(module.tokenizer.kind, module.tokenizer.files)


def encode_text(module, text: str) -> list[int]:
    return list(module_tokenizer(module).encode(text))
