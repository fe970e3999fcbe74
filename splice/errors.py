"""Error types shared by every layer. No dependencies, so the torch-free runtime can import it.

`InputError` is bad input: a checkpoint, recipe, prompt or artefact that splice cannot accept. Its
message names what was wrong and what is accepted; the CLI prints it on one line and exits 2.
Any other exception is a bug in splice (exit 1).
"""


class InputError(ValueError):
    """Bad input from the user: the message says what was wrong and what is accepted."""


class FrontendError(InputError):
    """A checkpoint that cannot be imported (missing, truncated, unknown architecture or op)."""


class ArtefactError(InputError):
    """An artefact that cannot be loaded (missing or changed files, bad manifest)."""
