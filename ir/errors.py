"""IRError, the error every IR check raises: the bottom of ir/, imported by the op definitions
(opdef.py) and by core.py alike, so neither has to import the other for it."""

from __future__ import annotations

from splice.errors import InputError


class IRError(InputError):
    """A malformed graph or a misuse of the IR's API."""
