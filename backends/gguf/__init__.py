"""The gguf backend: splice's passes, llama.cpp's runtime (GGUF files for stock llama.cpp)."""

from .export import export

__all__ = ["export"]
