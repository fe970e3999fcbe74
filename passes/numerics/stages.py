"""Calibration in stages: a module's graph run one decoder layer (one stage) at a time over the
whole calibration batch, and the X^T X of a stage's linear inputs (GPTQ's Hessians). Used by
quantize_weights and by the layer-by-layer driver (passes/infra/layerwise.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from splice.ir.core import Module, Node
from splice.ir.interpreter import default_feeds
from splice.ir.opdef import get_op

CHUNK_TOKENS = 4096          # calibration tokens run through one stage at a time


def stage_hessians(runner: StageRunner, s: int, wanted: set[int],
                   reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[int, torch.Tensor]:
    """X^T X of the inputs of stage s's wanted linears (node ids) over this process's calibration
    chunks, by input value id (linears reading one value share it), combined over processes by
    `reduce` (a sum: X^T X over a split token set is the sum of the parts' X^T X)."""
    xtx: dict[int, torch.Tensor] = {}

    def observe(node: Node, x: torch.Tensor) -> None:
        # one chunk's X^T X in the working precision, the sum over chunks in float64
        if id(node) in wanted:
            x2 = x.reshape(-1, x.shape[-1])
            part = (x2.T @ x2).to(torch.float64)
            key = id(node.inputs[0])
            xtx[key] = xtx[key] + part if key in xtx else part
    runner.run(s, observe=observe, commit=False)
    return {k: reduce(v) for k, v in xtx.items()}


class StageRunner:
    """Runs a module's graph one stage at a time over a calibration batch cut into chunks.

    A stage is a maximal run of consecutive nodes with the same `layer` (so each decoder layer is
    one, and the nodes before, between and after layers are others). Between stages only the values
    a later stage reads are kept, one environment per chunk; `run(s)` executes stage s on every
    chunk, optionally replacing linear weights (`override`: node id -> weight) and showing each
    node its first input before it runs (`observe`), and with commit=False leaves the kept values
    as they were (a measuring run).
    """

    def __init__(self, module: Module, calib: torch.Tensor, dtype: torch.dtype,
                 chunk_tokens: int = CHUNK_TOKENS):
        self.module = module
        self.dtype = dtype
        self.stages: list[list[Node]] = []
        key: object = object()
        for node in module.graph.nodes:
            if not self.stages or node.layer != key:
                self.stages.append([])
                key = node.layer
            self.stages[-1].append(node)
        self.stage_of = {id(n): s for s, nodes in enumerate(self.stages) for n in nodes}
        self.last_use: dict[int, int] = {}
        for node in module.graph.nodes:
            for v in node.inputs:
                if v is not None and not v.is_const:
                    here = self.stage_of[id(node)]
                    self.last_use[id(v)] = max(self.last_use.get(id(v), -1), here)
        rows = max(1, chunk_tokens // max(1, calib.shape[1]))
        self.envs = []
        for chunk in calib.split(rows):
            feeds = default_feeds(module, chunk, None, dtype)
            self.envs.append({id(v): feeds[v.name] for v in module.graph.inputs})

    def run(self, s: int, *, override: dict[int, torch.Tensor] | None = None,
            observe: Callable[[Node, torch.Tensor], None] | None = None,
            commit: bool = True) -> None:
        override = override or {}
        weights: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for i, env in enumerate(self.envs):
                local = env if commit else dict(env)
                for node in self.stages[s]:
                    args = []
                    for j, v in enumerate(node.inputs):
                        if v is None:
                            args.append(None)
                        elif j == 1 and id(node) in override:
                            args.append(override[id(node)])
                        elif v.is_const:
                            if id(v) not in weights:
                                t = self.module.weight(v)
                                weights[id(v)] = t.to(self.dtype) if t.is_floating_point() else t
                            args.append(weights[id(v)])
                        else:
                            args.append(local[id(v)])
                    if observe is not None:
                        observe(node, args[0])
                    outs = get_op(node.op).reference(node.attrs, *args)
                    for v, t in zip(node.outputs, outs):
                        local[id(v)] = t
                if commit:
                    for vid in [vid for vid in local if self.last_use.get(vid, -1) <= s]:
                        del local[vid]
