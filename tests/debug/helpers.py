"""Shared pieces of the debugging tests: a five-layer tiny model and deliberately broken passes,
registered under test-only names for the length of one test."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from splice.frontend.decoder import build_decoder
from splice.ir.core import Module
from splice.passes.infra.base import PassBase, PassContext, PassResult
from splice.passes.infra.registry import PASSES, register_pass

from tests.passes.models import SPECS, random_weights


def five_layer_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> Module:
    spec = dataclasses.replace(SPECS["llama"], num_layers=5)
    return build_decoder(spec, random_weights(spec, seed, dtype), origin="tests.models",
                         source=f"random llama 5 layers seed {seed}")


@dataclasses.dataclass(frozen=True)
class CorruptLayerPass(PassBase):
    """Multiplies one weight of one layer: lossy, and says so."""

    name = "test_corrupt_layer"
    exact = False

    layer: int = 3
    weight: str = "mlp.down_proj.weight"
    factor: float = 50.0

    def call(self, module: Module, ctx: PassContext) -> PassResult:
        v = module.graph.consts[f"layers.{self.layer}.{self.weight}"]
        module.set_weight(v, module.weight(v) * self.factor)
        return PassResult(module, True, {"corrupted": v.name})


@dataclasses.dataclass(frozen=True)
class FalselyExactPass(CorruptLayerPass):
    """The same corruption, but claiming to be exact: the numeric check must catch it."""

    name = "test_falsely_exact"
    exact = True


@contextlib.contextmanager
def registered(*classes: type[PassBase]) -> Iterator[None]:
    """Register test passes for the length of a `with` block."""
    for cls in classes:
        register_pass(cls)
    try:
        yield
    finally:
        for cls in classes:
            PASSES.pop(cls.name, None)
