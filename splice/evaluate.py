"""Perplexity over non-overlapping windows, for an artefact (runtime) or a module (interpreter).

numpy only at module level, so evaluating an artefact does not import torch. Windows: the token
stream is cut into chunks of `window` tokens; with `bos`, each chunk is fed after a BOS token and
every chunk token is predicted (llama2.c's convention, and SOURCE.md's reference figures);
without, the first token of each chunk is context only. `perplexity_of` gives a BOS to every
window exactly when the model's tokenizer adds one to encoded text (`window_bos`), and the result's
"protocol" says which, so that figures of different models and engines compare.

Why this engine stays in splice/ (the public face) when the others moved next to what they work
on: it is `splice eval`, and it runs both sides of the compiler, a model through the frontend and
the reference interpreter and an artefact through the runtime, as `compile()` runs the frontend,
the passes and a backend. Below splice/ it would point a layer at one it must not import: in
runtime/ the torch-free runtime would import the frontend and the IR; in ir/ or frontend/ the
compile side would import the runtime.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from .errors import InputError


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def perplexity(logits_fn: Callable[[np.ndarray], np.ndarray], ids: Sequence[int], *, window: int,
               bos: int | None = None, progress: bool = False) -> dict:
    """`logits_fn(ids [1, n]) -> logits [1, n, vocab]`. Returns ppl, nll, tokens, windows."""
    ids = list(ids)
    if window < 2:
        raise InputError(f"window must be at least 2 tokens, got {window}")
    n_win = len(ids) // window
    if n_win == 0:
        raise InputError(f"the text has {len(ids)} tokens, fewer than one window of {window}")
    nll, count = 0.0, 0
    it = range(n_win)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="perplexity", unit="window", disable=False)  # asked for: shown
    for w in it:
        chunk = ids[w * window:(w + 1) * window]
        inp = ([bos] + chunk[:-1]) if bos is not None else chunk
        targets = np.asarray(chunk if bos is not None else chunk[1:])
        logits = logits_fn(np.asarray([inp], dtype=np.int64))[0]
        if bos is None:
            logits = logits[:-1]
        lp = log_softmax(logits)
        nll -= float(lp[np.arange(len(targets)), targets].sum())
        count += len(targets)
    lead = (f"BOS {bos} before each window, every token scored" if bos is not None else
            "no BOS, each window's first token context only")
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count, "windows": n_win,
            "window": window, "bos": bos,
            "protocol": f"{n_win} windows of {window} tokens, {lead}, {count} tokens scored"}


def window_bos(tok) -> int | None:
    """The BOS id to feed before every window, or None. A tokenizer that puts a BOS before the text
    it encodes (llama2.c's; Hugging Face ones whose post-processor adds one, as Gemma's) says the
    model always saw one at the start of a sequence, so every window gets it (Gemma's windows
    after the first would otherwise be scored without); one that adds none (SmolLM2's) gets none."""
    bos = getattr(tok, "bos_id", None)
    if bos is None:
        return None
    added = list(tok.encode("a", bos=True))[:1] == [bos] and list(tok.encode("a"))[:1] != [bos]
    return bos if added else None


def perplexity_of(model, text_path, *, max_tokens: int = 16384, window: int | None = None,
                  progress: bool = False) -> dict:
    """Perplexity of an artefact directory (through its runtime) or of anything load_model takes
    (through the reference interpreter, float32) on the first `max_tokens` tokens of a text file."""
    from pathlib import Path

    from splice.checks import input_file, integer
    from splice.frontend.text import read_text

    integer(max_tokens, "max_tokens", minimum=1)
    integer(window, "window", minimum=2, optional=True)
    text = read_text(input_file(text_path, "text file"))
    if isinstance(model, (str, Path)) and (Path(model) / "manifest.json").is_file():
        from splice.runtime import load

        art = load(model)
        tok, config = art.tokenizer, art.config
        engine = f"artefact {art.manifest.get('backend', '?')}"

        def logits_fn(ids: np.ndarray) -> np.ndarray:
            return art.logits(ids)[0]
    else:
        import torch

        from splice.frontend import load_model
        from splice.ir.interpreter import run_logits
        from splice.frontend.text import module_tokenizer

        module = load_model(model)
        tok, config = module_tokenizer(module), module.config.to_json()
        engine = "reference interpreter float32"

        def logits_fn(ids: np.ndarray) -> np.ndarray:
            return run_logits(module, torch.from_numpy(ids))["logits"].numpy()
    ids = list(tok.encode(text))[:max_tokens]
    ctx = int(config["max_position"])
    bos = window_bos(tok)
    window = window or min(1024, ctx - (1 if bos is not None else 0))
    if window + (1 if bos is not None else 0) > ctx:
        raise InputError(f"window {window} does not fit the context of {ctx} tokens")
    result = perplexity(logits_fn, ids, window=window, bos=bos, progress=progress)
    result["engine"] = engine
    return result
