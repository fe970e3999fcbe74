"""The fits behind estimate_patch and fuse_patch's fold: LinearPatch's rotation and channel
scale, the ridge least-squares map towards the identity with per-token weights, and the stream
errors that compare patches (estimate_patch's docstring says why each is shaped as it is). All in
float64, from sums over tokens that `reduce` combines across processes."""

from __future__ import annotations

import math

import torch

from splice.ir.hadamard import factorize, hadamard_matrix, random_orthogonal
from ..infra.base import PassError


def rotation(d: int, seed: int) -> tuple[torch.Tensor, str, list[int] | None]:
    """The rotation for LinearPatch: (H, "hadamard", factors) or, for orders without a Hadamard
    construction, (Q, "random_orthogonal", None)."""
    factors = factorize(d)
    if factors is not None:
        return hadamard_matrix(d), "hadamard", factors
    return random_orthogonal(d, seed), "random_orthogonal", None


def linearpatch_scale(x_in: torch.Tensor, x_out: torch.Tensor, q: torch.Tensor,
                      reduce=None) -> torch.Tensor:
    """s_c = mean_t |(x_out Q)_tc| / mean_t |(x_in Q)_tc|; 1 for a channel that is always 0.
    The two means share their count, so s is the ratio of the sums, and `reduce` (a sum over
    processes holding shares of the tokens; PassContext.reduce) combines the sums."""
    num = (x_out @ q).abs().sum(0)
    den = (x_in @ q).abs().sum(0)
    if reduce is not None:
        num, den = reduce(num), reduce(den)
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), torch.ones_like(den))


def ridge_lstsq(x: torch.Tensor, y: torch.Tensor, ridge: float, pass_name: str, *,
                prior: torch.Tensor | None = None, token_weights: bool = True,
                reduce=None) -> torch.Tensor:
    """argmin_T sum_t w_t ||x_t T - y_t||^2 + lambda ||T - T0||^2, in float64.

    The prior T0 (identity by default: no patch) is what heavy regularisation falls back to.
    Shrinking towards 0 instead erases the stream: in LLMs a few massive-activation channels set
    the mean diagonal of X^T X, so lambda = ridge * mean diag is far above the energy of the
    hundreds of ordinary channels (measured on SmolLM2-135M, block [12, 16): perplexity 97
    against 45 towards identity). `token_weights` sets w_t = 1 / ||y_t||^2, the per-token
    relative error, which the next RMS norm sees, so the few attention-sink tokens whose norm is
    hundreds of times the median do not dominate the fit (42 against 45 on that block).
    lambda = ridge * the mean diagonal of the weighted X^T X, so the setting is scale-free.
    The normal equations X^T X and X^T Y are sums over tokens: `reduce` (PassContext.reduce)
    combines them over processes holding shares of the tokens before the solve."""
    if token_weights:
        w = 1.0 / y.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        x, y = x * w, y * w
    a, xty = x.T @ x, x.T @ y
    if reduce is not None:
        a, xty = reduce(a), reduce(xty)
    eye = torch.eye(a.shape[0], dtype=a.dtype)
    lam = ridge * float(a.diagonal().mean())
    t0 = eye if prior is None else prior.to(a.dtype)
    try:
        return torch.linalg.solve(a + lam * eye, xty + lam * t0)
    except torch.linalg.LinAlgError:
        raise PassError(f"{pass_name}: the least-squares system is singular (ridge = {ridge}); "
                        "use ridge > 0 or more calibration tokens") from None


def stream_errors(x: torch.Tensor, y: torch.Tensor, reduce=None) -> dict[str, float]:
    """How far the patched stream x is from the true y, per token t: the mean relative squared
    error ||x_t - y_t||^2 / ||y_t||^2 ("token_rel", what kind = auto compares), the mean cosine
    distance, and the relative squared error over all tokens ("rel_mse", dominated by the
    massive-activation tokens). Computed from sums over tokens, which `reduce`
    (PassContext.reduce) combines over processes holding shares of the tokens."""
    yy = y.pow(2).sum(-1).clamp_min(1e-300)
    cos = torch.nn.functional.cosine_similarity(x, y, dim=-1, eps=1e-12)
    sq = (x - y).pow(2).sum(-1)
    sums = torch.stack([(sq / yy).sum(), (1.0 - cos).sum(), sq.sum(), yy.sum(),
                        torch.tensor(float(x.shape[0]), dtype=yy.dtype)]).to(torch.float64)
    if reduce is not None:
        sums = reduce(sums)
    tok_rel, cosine, sq_all, yy_all, n = (float(v) for v in sums)
    if n == 0:
        return {"token_rel": math.nan, "cosine": math.nan, "rel_mse": math.nan}
    return {"token_rel": tok_rel / n, "cosine": cosine / n, "rel_mse": sq_all / yy_all}
