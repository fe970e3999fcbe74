"""Run an artefact: `load(path)` checks it and returns an `Artefact` with `logits()`,
`generate()`, `generate_ids()` and `stream()`. numpy, onnxruntime and tokenizers only (no torch),
so an edge device needs nothing else."""

from ..errors import ArtefactError, InputError
from .artefact import Artefact, Generation, KVCache, load
from .manifest import read_manifest, verify_artefact
from .sampling import Sampling
from .tokenizer import load_tokenizer

__all__ = ["Artefact", "ArtefactError", "Generation", "InputError", "KVCache", "Sampling", "load",
           "load_tokenizer", "read_manifest", "verify_artefact"]
