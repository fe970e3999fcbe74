"""Choose the contiguous block of n decoder layers that matters least, on calibration data.

Every block [i, i + n) gets a score; the lowest is chosen and recorded in
config.extra["prune_block"] = [start, n] for estimate_patch and prune_layers. Metrics:

- "cosine": mean over calibration tokens of 1 - cos(x_i, x_{i+n}), the cosine taken per token
  over the hidden dim, x_i the residual stream entering layer i (the embedding output for i = 0)
  and x_L the stream leaving the last layer. This is ShortGPT's Block Influence (Men et al. 2024,
  "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect") extended to a
  block, as LLM-Streamline (Chen et al. 2024) and LinearPatch (Chen et al. 2025) select it.
- "angular": mean of arccos(cos(x_i, x_{i+n})) / pi, the angular distance of Gromov et al. 2024
  ("The Unreasonable Ineffectiveness of the Deeper Layers").
- "ppl": the calibration perplexity of the model with the block removed (prune_layers on a
  clone, no patch): direct but one full calibration run per candidate block.

Layer 0 is a candidate only with `allow_first`: the first layer turns token embeddings into the
stream the rest expects and is almost never redundant, so choosing it is usually a mistake in the
calibration data rather than a finding. Calibration runs in ctx.precision (float64 by default).
Scores are sums over tokens divided by the token count; across processes (passes/infra/reduce.py) the
sums and counts are all-reduced, so every process picks the one-process block.

Exactness: the module's function is untouched (only config.extra changes), so the pass is exact;
`modified` is true only when the recorded block changes, so a second run changes nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Literal

import torch

from splice.ir.core import Module
from splice.ir.interpreter import Interpreter, default_feeds
from .infra.base import PassBase, PassContext, PassError, PassResult
from .prune_layers import (check_block_size, check_calibration, num_layers, prune, row_chunks,
                           stream_values, walk_calibration)
from .infra.registry import register_pass

logger = logging.getLogger(__name__)

METRICS = ("cosine", "angular", "ppl")


@register_pass
@dataclasses.dataclass(frozen=True)
class SelectLayersPass(PassBase):
    """Score every block of n contiguous layers and record the least important one.

    Settings: `n` (layers in the block), `metric` ("cosine", "angular" or "ppl"), `allow_first`
    (let the block start at layer 0).
    """

    name = "select_layers"
    exact = True

    n: int = 4
    metric: Literal["cosine", "angular", "ppl"] = "cosine"
    allow_first: bool = False

    def call(self, module: Module, ctx: PassContext) -> PassResult:
        if self.metric not in METRICS:
            raise PassError(f"{self.name}: metric {self.metric!r}; accepted: {', '.join(METRICS)}")
        L = num_layers(module, self.name)
        check_block_size(self.n, L, self.name)
        starts = list(range(0 if self.allow_first else 1, L - self.n + 1))
        if self.metric == "ppl":
            scores = _ppl_scores(module, ctx, self.n, starts, self.name)
        else:
            scores = _distance_scores(module, ctx, self.n, starts, self.metric, self.name)
        start = min(starts, key=lambda s: (scores[s], s))
        block = [start, self.n]
        modified = module.config.extra.get("prune_block") != block
        if modified:
            module.config = module.config.replace(extra={**module.config.extra,
                                                         "prune_block": block})
        logger.info("select_layers: block [%d, %d) by %s (score %.4g)", start, start + self.n,
                    self.metric, scores[start])
        return PassResult(module, modified, {
            "metric": self.metric, "n": self.n, "start": start, "block": [start, start + self.n],
            "score": scores[start], "scores": {s: scores[s] for s in starts},
            "tokens": int(ctx.reduce(torch.tensor(check_calibration(module, ctx,
                                                                   self.name).numel())))})


def _distance_scores(module: Module, ctx: PassContext, n: int, starts: list[int], metric: str,
                     pass_name: str) -> dict[int, float]:
    """Mean per-token distance between the stream entering block i and the stream leaving it.
    The streams arrive in order as the calibration run computes them; only the last n + 1 are
    kept, so memory does not grow with the depth."""
    streams = stream_values(module, pass_name)
    total = {s: 0.0 for s in starts}
    tokens = 0
    window: dict[int, torch.Tensor] = {}

    def visit(b: int, x: torch.Tensor) -> None:
        window[b] = x
        s = b - n
        if s in total:
            cos = torch.nn.functional.cosine_similarity(window[s], x, dim=-1, eps=1e-12)
            if metric == "cosine":
                d = 1.0 - cos
            else:
                d = torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi
            total[s] += float(d.sum())
        window.pop(s, None)

    for _ in walk_calibration(module, ctx, streams, pass_name, visit):
        tokens += window[len(streams) - 1].shape[0]
        window.clear()
    # sums over this process's tokens; combined over processes (identity in one)
    sums = ctx.reduce(torch.tensor([total[s] for s in starts] + [tokens], dtype=torch.float64))
    return {s: float(sums[k]) / float(sums[-1]) for k, s in enumerate(starts)}


def _ppl_scores(module: Module, ctx: PassContext, n: int, starts: list[int],
                pass_name: str) -> dict[int, float]:
    """Calibration perplexity with each candidate block removed (no patch)."""
    calib = check_calibration(module, ctx, pass_name)
    if calib.shape[1] < 2:
        raise PassError(f"{pass_name}: metric 'ppl' needs calibration rows of at least 2 tokens "
                        f"(it predicts each next token), got rows of {calib.shape[1]}")
    scores = {}
    for s in starts:
        clone = module.clone()
        prune(clone, s, n, pass_name)
        total, count = _nll(clone, calib, ctx.precision, pass_name)
        sums = ctx.reduce(torch.tensor([total, count], dtype=torch.float64))
        scores[s] = math.exp(float(sums[0]) / float(sums[1]))
    return scores


def _nll(module: Module, calib: torch.Tensor, dtype: torch.dtype,
         pass_name: str) -> tuple[float, int]:
    """(summed negative log-likelihood, predicted tokens) on this process's calibration rows."""
    interp = Interpreter(module, dtype)
    logits_name = module.graph.outputs[0].name
    total, count = 0.0, 0
    for chunk in row_chunks(calib):
        logits = interp.run(default_feeds(module, chunk, None, dtype),
                            outputs=[logits_name])[logits_name]
        if not torch.isfinite(logits).all():
            raise PassError(f"{pass_name}: the logits on the calibration data hold NaN or inf; "
                            "the model or its calibration data is broken")
        logp = torch.log_softmax(logits[:, :-1].to(torch.float64), dim=-1)
        total -= float(logp.gather(-1, chunk[:, 1:, None]).sum())
        count += chunk[:, 1:].numel()
    return total, count
