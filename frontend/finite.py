"""Weights that load but are not usable: NaN or infinite values, refused at import naming the
tensor. An artefact compiled from them computes NaN logits (or logits in the thousands) without
any other sign, so every frontend checks before anything else is done with the checkpoint (the
tokenizer is parsed after this check: a refusal is then the command's one line)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from splice.errors import FrontendError


def check_finite(named: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
    """Refuse the first floating-point tensor of `named` ((name, tensor) pairs, read one at a
    time: a lazy checkpoint's weights are loaded and dropped in turn) that holds a NaN or an
    infinity, naming it, what it holds and how many of its values."""
    for name, t in named:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = t[~torch.isfinite(t)]
            what = "NaN" if bool(torch.isnan(bad).any()) else "infinite values"
            raise FrontendError(f"{source}: weight {name} holds {what} ({bad.numel()} of "
                                f"{t.numel()}); a usable checkpoint has finite weights")
