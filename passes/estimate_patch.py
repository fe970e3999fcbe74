"""Estimate the linear patch that bridges a block of layers about to be pruned.

LinearPatch (Chen et al. 2025, "LinearPatch: A Simple Linear Patch for Layer Pruning in LLMs")
replaces a pruned block [start, start + n) by one d x d matrix on the residual stream,
P = H diag(s) H^T, H an orthonormal Hadamard matrix and s the per-channel ratio of mean |x H|
just after the block to just before it, measured on calibration tokens in the rotated space:
the Hadamard rotation spreads the few massive-activation channels over all channels, so one
scale per rotated channel fits well. The alternative is a ridge least-squares map T (a dense
linear map, as LLM-Streamline, Chen et al. 2024, and ReplaceMe, Shopkhoev et al. 2025, fit one)
minimising sum_t ||x_t T - y_t||^2 / ||y_t||^2 + lambda ||T - I||^2: per-token relative error,
and ridge towards the identity (no patch) rather than towards 0, with lambda = `ridge` times the
mean diagonal of the weighted X^T X. Both departures from a plain ridge fit matter in LLMs, whose
few massive-activation tokens and channels otherwise dominate the fit (see `ridge_lstsq`; on
SmolLM2-135M, block [12, 16), they take the perplexity from 97 to 42). `token_weights = False`
gives the unweighted fit. `kind = "auto"` fits both on the calibration tokens minus a seeded
held-out share (`holdout`) and keeps the one with the lower held-out mean per-token relative
error ||x_t P - y_t||^2 / ||y_t||^2; every error (and the unpatched baseline's) is in the report.

`kind = "mlp"` goes beyond a linear map: the least-squares T, then a gated MLP block on the
stream after it, u + down(silu(gate(z)) * up(z)) with u = x T and z = rms_norm(u) (no weight),
trained with T by AdamW (cosine schedule, seeded batches) on the same per-token relative error
over the fit tokens; the down projection starts at zero, so training starts from least squares.
The pruned layers' MLPs are token-local and nonlinear, which a d x d map cannot follow (their
attention, which mixes tokens, no token-local patch can). SmolLM2-135M, block [12, 16), rank
512 on 512 x 512 tokens: 26.94 (least squares 31.36; the README's table). It costs d^2 + 3 r d
parameters (331,776 + 884,736 at r = 512, 1.0% of the pruned model's float32 weights), runs
as a dense matmul and an MLP block in every backend, and passes rotate exactly (its norm reads
the stream, its gate/up read the norm, its down writes the stream through the block's add). It
trains on one process's tokens (refused across processes), and distill_patch and fuse_patch's
fold, which take linear patches, refuse it.

Pass order. The pass runs on the unpruned model, after select_layers and before prune_layers: it
reads the block from config.extra["prune_block"] (or from its own start/n settings, which it then
records there), measures X_in (the stream entering layer start) and X_out (the stream leaving
layer start + n - 1) through the reference interpreter in ctx.precision (the fit itself is always
float64), and inserts the patch on X_in with its output unused. The module still computes what it
did (the pass is exact). Then prune_layers removes the block and wires the patch's output to
everything that read X_out.

The patch's form (all nodes role "patch", origin "estimate_patch"):
- LinearPatch with a symmetric Hadamard H (Sylvester and Paley II orders, e.g. 64, 576 = 36 x 16,
  4096): hadamard -> channel_scale(s) -> hadamard, the factored form that computes x P exactly
  in O(d log d). It is kept factored because multiplying it out is exact in float64 while
  recovering s from a rounded dense P is not; fuse_patch picks the deployed form.
- LinearPatch with a non-symmetric Hadamard (Paley I or Williamson bases, where H^T != H and
  the hadamard op cannot apply H^T) or with a random orthogonal rotation: matmul by P.
- Least squares: matmul by T.
- LinearPatch in the R1 basis (`basis = "r1"`): measured in Q = random_hadamard(d, basis_seed)
  = diag(sigma) H instead of H. Any signed Hadamard matrix is an orthonormal Hadamard matrix, so
  this is the paper's method with another H (the same outlier spreading, the same parameter
  count): P = Q diag(s) Q^T, s_c = mean |x_out Q|_c / mean |x_in Q|_c, emitted as the "signed"
  chain channel_scale(sigma) -> hadamard -> channel_scale(s) -> hadamard -> channel_scale(sigma)
  (x P = ((((x * sigma) H) * s) H) * sigma, H symmetric; one sigma weight read twice). Its point:
  when rotate's R1 later rotates the residual stream by Q1 = random_hadamard(d, seed) with the
  same seed, the patch becomes Q1^T P Q1 = diag(s) exactly (Q1 = Q, Q^T Q = I), and rotate
  replaces the chain by one channel_scale(s): d parameters and d multiplies per token. basis_seed
  must be rotate's `seed` (0 by default for both; rotate draws R1's signs from its own setting,
  not from ctx.seed). The basis is recorded in the report and in
  config.extra["patch_basis"][patch name] = {"basis", "size", "seed"}. It needs a symmetric
  Hadamard matrix of order d (Sylvester or Paley II orders; no random-orthogonal fallback), else
  the pass raises; least squares ignores the basis.
Across processes (torch.distributed; passes/infra/reduce.py) each holds a share of the calibration
batches: the tokens are numbered over all processes, the seeded fit/hold-out split is drawn over
that numbering, and the sums behind s (sums of |x Q|), the normal equations X^T X and X^T Y and
the hold-out errors are all-reduced, so every process fits the one-process patch (to rounding).
Orders with no Hadamard construction (2 mod 4, e.g. 30) fall back to a seeded Haar-random
orthogonal rotation (ir.hadamard.random_orthogonal(d, ctx.seed)), with a warning in the report.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from typing import Any, Literal

import torch

from splice.ir.core import Graph, Module, Node, Value, emit
from splice.ir.hadamard import hadamard_matrix
from .infra.base import PassBase, PassContext, PassError, PassResult
from .numerics.mlp_patch import MLP_OPS, emit_mlp_patch, fit_mlp_patch, mlp_block_ending_at
from .numerics.patch_fits import linearpatch_scale, ridge_lstsq, rotation, stream_errors
from .prune_layers import (capture, check_calibration, dangling_patch, resolve_block, stream_in,
                           stream_out)
from .infra.registry import register_pass
from .numerics.rotation import random_signs

logger = logging.getLogger(__name__)

KINDS = ("linearpatch", "lstsq", "auto", "mlp")
BASES = ("hadamard", "r1")
SIGNED_OPS = ["channel_scale", "hadamard", "channel_scale", "hadamard", "channel_scale"]


# -- patches in the graph ----------------------------------------------------------------------

@dataclasses.dataclass
class Patch:
    """A chain of role "patch" nodes from stream value `x` to `y`, in form "factored"
    (hadamard, channel_scale, hadamard), "signed" (channel_scale(sigma), hadamard,
    channel_scale(s), hadamard, channel_scale(sigma): LinearPatch in a signed Hadamard basis),
    "scale" (one channel_scale: what a signed patch becomes in a model rotated by the same signed
    Hadamard matrix), "dense" (one matmul), "mlp" (the residual block u + down(silu(gate(z)) *
    up(z)), z = rms_norm(u), that follows a dense patch in estimate_patch's kind "mlp"; not
    linear) or "other"."""

    nodes: list[Node]
    x: Value
    y: Value
    form: str

    def dangling(self, graph: Graph) -> bool:
        return not self.y.uses and self.y not in graph.outputs

    def matrix(self, module: Module) -> torch.Tensor:
        """The d x d matrix the patch multiplies by, in float64."""
        if self.form == "dense":
            return module.weight(self.nodes[0].inputs[1]).to(torch.float64)
        if self.form == "factored":
            h = hadamard_matrix(self.nodes[0].attrs["size"])
            return (h * self.scale(module)) @ h.T
        if self.form == "signed":  # diag(sigma) H diag(s) H diag(sigma), H symmetric
            h = hadamard_matrix(self.nodes[1].attrs["size"])
            sigma = self.signs(module)
            return ((sigma[:, None] * h * self.scale(module)) @ h) * sigma
        if self.form == "scale":
            return torch.diag(self.scale(module))
        if self.form == "mlp":
            raise PassError(f"patch %{self.y.name} is an MLP patch: it is not one matrix")
        raise PassError(f"patch %{self.y.name} has an unknown form "
                        f"({' -> '.join(n.op for n in self.nodes)})")

    def scale_value(self) -> Value:
        """The constant holding s (the channel scales) of a factored, signed or scale patch."""
        index = {"factored": 1, "signed": 2, "scale": 0}.get(self.form)
        if index is None:
            raise PassError(f"patch %{self.y.name} ({self.form}) has no channel scale")
        v = self.nodes[index].inputs[1]
        assert v is not None
        return v

    def scale(self, module: Module) -> torch.Tensor:
        return module.weight(self.scale_value()).to(torch.float64)

    def signs(self, module: Module) -> torch.Tensor:
        """sigma of a signed patch, in float64."""
        assert self.form == "signed"
        return module.weight(self.nodes[0].inputs[1]).to(torch.float64)


def find_patches(graph: Graph) -> list[Patch]:
    """Every patch in the graph, in graph order. Chains are parsed by form from their last node,
    so two patches in a row (a second pruning at the same cut) stay two patches."""
    patches: list[Patch] = []
    claimed: set[int] = set()
    for node in reversed(graph.nodes):
        if node.role != "patch" or id(node) in claimed:
            continue
        chain = _chain_ending_at(node)
        claimed.update(id(n) for n in chain)
        x = chain[0].inputs[0]
        assert x is not None
        patches.append(Patch(chain, x, node.outputs[0], _form(chain)))
    return patches[::-1]


def _chain_ending_at(node: Node) -> list[Node]:
    if node.op == "add":
        return mlp_block_ending_at(node) or [node]
    if node.op == "channel_scale":
        chain = [node]
        while len(chain) < 5:
            p = _patch_producer(chain[0])
            if p is None or p.op != ("hadamard" if len(chain) % 2 else "channel_scale"):
                break
            chain.insert(0, p)
        return chain if len(chain) == 5 and _form(chain) == "signed" else [node]
    if node.op == "hadamard":
        scale = _patch_producer(node)
        first = _patch_producer(scale) if scale is not None and scale.op == "channel_scale" \
            else None
        if first is not None and first.op == "hadamard":
            return [first, scale, node]  # type: ignore[list-item]
    return [node]


def _patch_producer(node: Node) -> Node | None:
    """The role "patch" node whose output only `node` reads as its first input, if any."""
    x = node.inputs[0]
    p = x.producer if x is not None else None
    if p is None or p.role != "patch" or x.users() != [node]:  # type: ignore[union-attr]
        return None
    return p


def _form(chain: list[Node]) -> str:
    ops = [n.op for n in chain]

    def const(node: Node) -> bool:
        return node.inputs[1] is not None and node.inputs[1].is_const

    def plain(*hs: Node) -> bool:
        a = hs[0].attrs
        return all(h.attrs == a for h in hs) and all(
            a[k] == v for k, v in {"block": 0, "group": 0, "scale": 1.0}.items())

    if ops == ["matmul"] and const(chain[0]):
        return "dense"
    if ops == MLP_OPS and all(const(n) for n in chain if n.op == "linear") \
            and (len(chain[0].inputs) < 2 or chain[0].inputs[1] is None):
        return "mlp"
    if ops == ["channel_scale"] and const(chain[0]):
        return "scale"
    if ops == ["hadamard", "channel_scale", "hadamard"] and const(chain[1]) \
            and plain(chain[0], chain[2]):
        return "factored"
    if ops == SIGNED_OPS and all(const(n) for n in chain[::2]) \
            and chain[0].inputs[1] is chain[4].inputs[1] and plain(chain[1], chain[3]):
        return "signed"
    return "other"


def remove_patch(module: Module, patch: Patch) -> list[str]:
    """Delete a patch chain whose output nothing reads any more; returns the weights dropped."""
    g = module.graph
    consts = [v.const for n in patch.nodes for v in n.inputs if v is not None and v.is_const]
    for node in reversed(patch.nodes):
        g.remove(node)
    dropped = []
    for name in consts:
        v = g.consts.get(name)
        if v is not None and not v.uses:
            g.remove_const(name)
            del module.weights[name]
            dropped.append(name)
    return dropped


def storage_dtype(module: Module) -> torch.dtype:
    """The floating dtype most of the module's weights are stored in (what a new weight gets)."""
    counts = Counter(t.dtype for t in module.weights.values() if t.is_floating_point())
    return counts.most_common(1)[0][0] if counts else torch.float32


def emit_patch(module: Module, x: Value, *, matrix: torch.Tensor | None = None,
               scale: torch.Tensor | None = None, signs: torch.Tensor | None = None,
               dtype: torch.dtype, base: str, origin: str, before: Node | None = None,
               after: Node | None = None) -> Value:
    """Insert a patch on `x`: the factored Hadamard form for `scale` (the signed form when
    `signs` is given too), a matmul for `matrix`, its weights stored in `dtype`; returns the
    patch output (named `base`)."""
    g = module.graph
    d = x.shape[-1]
    place: dict[str, Any] = {"before": before} if before is not None else {"after": after}
    meta = {"role": "patch", "origin": origin}

    def add(op: str, inputs: list[Value], attrs: dict | None, name: str) -> Value:
        node = emit(g, op, inputs, attrs, name=name, **meta, **place)
        _advance(place, node)
        return node.output

    if scale is not None:
        sigma = module.add_weight(base + ".signs", signs.to(dtype)) if signs is not None else None
        s = module.add_weight(base + ".scale", scale.to(dtype))
        y = x if sigma is None else add("channel_scale", [x, sigma], None, base + ".signed")
        y = add("hadamard", [y], {"size": d}, base + ".rotate")
        y = add("channel_scale", [y, s], None, base + ".scaled")
        if sigma is None:
            return add("hadamard", [y], {"size": d}, base)
        y = add("hadamard", [y], {"size": d}, base + ".unrotate")
        return add("channel_scale", [y, sigma], None, base)
    assert matrix is not None
    w = module.add_weight(base + ".weight", matrix.to(dtype))
    return emit(g, "matmul", [x, w], name=base, **meta, **place).output


def _advance(place: dict[str, Any], node: Node) -> None:
    if "after" in place:
        place["after"] = node


# -- the pass ----------------------------------------------------------------------------------

@register_pass
@dataclasses.dataclass(frozen=True)
class EstimatePatchPass(PassBase):
    """Fit the patch for the selected block and leave it waiting on the stream entering it.

    Settings: `kind` ("linearpatch", "lstsq", "auto": the better of those two on held-out
    tokens, or "mlp": the least-squares patch and a gated MLP after it trained together, see
    `fit_mlp_patch`; `mlp_rank`, `mlp_steps`, `mlp_lr`, `mlp_batch` set it), `ridge`
    (least-squares regulariser towards the identity, relative to the mean diagonal of X^T X),
    `token_weights` (least squares on per-token relative error), `holdout` (share of the
    calibration tokens kept out of the fit to compare the two), `start`/`n`/`allow_first` (the
    block, when not the one select_layers recorded; see prune_layers), `basis` ("hadamard": H;
    "r1": rotate's R1 matrix random_hadamard(d, basis_seed), so that rotate with seed =
    basis_seed collapses the patch to a channel scale).
    """

    name = "estimate_patch"
    exact = True

    kind: Literal["linearpatch", "lstsq", "auto", "mlp"] = "auto"
    ridge: float = 1e-2
    token_weights: bool = True
    holdout: float = 0.25
    start: int = -1
    n: int = -1
    allow_first: bool = False
    basis: Literal["hadamard", "r1"] = "hadamard"
    basis_seed: int = 0
    mlp_rank: int = 128
    mlp_steps: int = 2000
    mlp_lr: float = 1e-3
    mlp_batch: int = 2048

    def _check(self) -> None:
        if self.kind not in KINDS:
            raise PassError(f"{self.name}: kind {self.kind!r}; accepted: {', '.join(KINDS)}")
        if self.basis not in BASES:
            raise PassError(f"{self.name}: basis {self.basis!r}; accepted: {', '.join(BASES)}")
        if isinstance(self.basis_seed, bool) or not isinstance(self.basis_seed, int):
            raise PassError(f"{self.name}: basis_seed = {self.basis_seed!r}; it must be an "
                            "integer (rotate's seed)")
        if not self.ridge >= 0 or math.isinf(self.ridge):
            raise PassError(f"{self.name}: ridge = {self.ridge}; it must be a finite number >= 0")
        if not 0 <= self.holdout < 1:
            raise PassError(f"{self.name}: holdout = {self.holdout}; it must be in [0, 1)")
        for key in ("mlp_rank", "mlp_steps", "mlp_batch"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise PassError(f"{self.name}: {key} = {v!r}; it must be an integer >= 1")
        if not 0 < self.mlp_lr < math.inf:
            raise PassError(f"{self.name}: mlp_lr = {self.mlp_lr}; it must be a finite number > 0")
        if self.kind == "auto" and self.holdout == 0:
            raise PassError(f"{self.name}: kind 'auto' compares the patches on held-out tokens; "
                            "give holdout > 0, or choose kind 'linearpatch' or 'lstsq'")

    def call(self, module: Module, ctx: PassContext) -> PassResult:
        self._check()
        block = resolve_block(module, self.start, self.n, self.allow_first, self.name)
        if block is None:
            if module.config.extra.get("pruned"):
                return PassResult(module, False, {"skipped": "no block pending"})
            raise PassError(f"{self.name}: no block to patch: give start and n, or run "
                            "select_layers first (it records config.extra['prune_block'])")
        start, n, recorded = block
        g = module.graph
        x_in, x_out = stream_in(module, start, self.name), stream_out(module, start + n - 1,
                                                                      self.name)
        modified = False
        if not recorded and module.config.extra.get("prune_block") != [start, n]:
            module.config = module.config.replace(extra={**module.config.extra,
                                                         "prune_block": [start, n]})
            modified = True
        stale: list[Patch] = []
        while True:  # removing an MLP block leaves its dense patch dangling: stale in turn
            waiting = {id(n) for n in dangling_patch(g, x_in) or []}
            more = [p for p in find_patches(g) if p.dangling(g) and id(p.nodes[0]) not in waiting]
            if not more:
                break
            for p in more:
                remove_patch(module, p)
            stale += more
        recorded_bases = module.config.extra.get("patch_basis", {})
        if any(p.y.name in recorded_bases for p in stale):
            kept = {k: v for k, v in recorded_bases.items() if k not in {p.y.name for p in stale}}
            module.config = module.config.replace(extra={**module.config.extra,
                                                         "patch_basis": kept})
        if dangling_patch(g, x_in) is not None:
            return PassResult(module, modified or bool(stale), {
                "block": [start, start + n], "skipped": "a patch already waits on this block"})
        report = self._estimate(module, ctx, start, n, x_in, x_out)
        report["removed_stale_patches"] = len(stale)
        return PassResult(module, True, report)

    def _estimate(self, module: Module, ctx: PassContext, start: int, n: int, x_in: Value,
                  x_out: Value) -> dict[str, Any]:
        d = x_in.shape[-1]
        assert isinstance(d, int)
        # tokens are numbered over all processes (rank r holds [offset, offset + mine)); the
        # fit/hold-out split is drawn over that numbering, so it is the one-process split
        mine = int(check_calibration(module, ctx, self.name).numel())
        counts = torch.zeros(ctx.reducer.world_size, dtype=torch.int64)
        counts[ctx.reducer.rank] = mine
        counts = ctx.reduce(counts)
        total, offset = int(counts.sum()), int(counts[:ctx.reducer.rank].sum())
        n_hold = int(round(total * self.holdout))
        if total - n_hold < d or (self.holdout > 0 and n_hold < 1):
            need = max(d + 1, math.ceil(d / (1 - self.holdout)) + 1)
            raise PassError(f"{self.name}: {total} calibration tokens are too few: a {d} x {d} "
                            f"patch needs at least {d} tokens to fit, plus the held-out share "
                            f"{self.holdout}; give at least {need} tokens")
        xi, xo = (t.to(torch.float64) for t in capture(module, ctx, [x_in, x_out], self.name))
        gen = torch.Generator().manual_seed(ctx.seed)
        perm = torch.randperm(total, generator=gen)
        fit_all, hold_all = perm[n_hold:], perm[:n_hold]

        def local(idx: torch.Tensor) -> torch.Tensor:
            return idx[(idx >= offset) & (idx < offset + mine)] - offset
        fit, hold = local(fit_all), local(hold_all)
        warnings = []
        q, rot, factors = rotation(d, ctx.seed)
        if rot != "hadamard":
            warnings.append(f"hidden size {d} has no Hadamard construction (orders 2 mod 4 and "
                            "odd orders have none); LinearPatch uses a seeded random orthogonal "
                            "rotation instead, which spreads outliers as well but has no fast "
                            "transform: the patch stays a dense matmul")
            logger.warning("estimate_patch: %s", warnings[-1])
        symmetric = rot == "hadamard" and bool(torch.equal(q, q.T))
        signs = None
        if self.basis == "r1" and self.kind != "lstsq":
            if not symmetric:
                why = ("has no Hadamard construction" if rot != "hadamard" else
                       f"has a non-symmetric Hadamard matrix (base {factors[0]})")  # type: ignore
                raise PassError(f"{self.name}: basis 'r1' needs a symmetric Hadamard matrix of the "
                                f"hidden size (Sylvester or Paley II orders), and {d} {why}; use "
                                "basis 'hadamard' (or kind 'lstsq')")
            signs = random_signs(d, self.basis_seed)
            q = signs[:, None] * q  # random_hadamard(d, basis_seed): R1's Q1
        candidates: dict[str, torch.Tensor] = {}
        scale = None
        if self.kind in ("linearpatch", "auto"):
            scale = linearpatch_scale(xi[fit], xo[fit], q, reduce=ctx.reduce)
            candidates["linearpatch"] = (q * scale) @ q.T
        if self.kind == "mlp" and ctx.reducer.world_size > 1:
            raise PassError(f"{self.name}: kind 'mlp' trains on one process's tokens; across "
                            f"{ctx.reducer.world_size} processes use kind 'lstsq' or 'auto'")
        if self.kind in ("lstsq", "auto", "mlp"):
            candidates["lstsq"] = ridge_lstsq(xi[fit], xo[fit], self.ridge, self.name,
                                              token_weights=self.token_weights,
                                              reduce=ctx.reduce)
        errors = {"none": stream_errors(xi[hold], xo[hold], ctx.reduce)}
        errors.update({k: stream_errors(xi[hold] @ m, xo[hold], ctx.reduce)
                       for k, m in candidates.items()})
        mlp = None
        if self.kind == "mlp":
            mlp = fit_mlp_patch(xi[fit], xo[fit], candidates["lstsq"], rank=self.mlp_rank,
                                steps=self.mlp_steps, lr=self.mlp_lr, batch=self.mlp_batch,
                                seed=ctx.seed, pass_name=self.name)
            errors["mlp"] = stream_errors(mlp(xi[hold]), xo[hold], ctx.reduce)
        if self.kind == "auto":
            chosen = min(candidates, key=lambda k: (errors[k]["token_rel"], k))
        else:
            chosen = self.kind
        anchor = min((u for u in x_in.users()), key=module.graph.nodes.index)
        base = module.graph.free_name(f"patch.{start}")
        if chosen == "linearpatch" and symmetric:
            assert scale is not None
            out = emit_patch(module, x_in, scale=scale, signs=signs, dtype=storage_dtype(module),
                             base=base, origin=self.name, before=anchor)
            form = "factored" if signs is None else "signed"
        elif mlp is not None:
            u = emit_patch(module, x_in, matrix=mlp.t, dtype=storage_dtype(module),
                           base=base + ".linear", origin=self.name, before=anchor)
            assert u.producer is not None
            out = emit_mlp_patch(module, u, mlp, dtype=storage_dtype(module), base=base,
                                 origin=self.name, after=u.producer)
            form = "mlp"
        else:
            out = emit_patch(module, x_in, matrix=candidates[chosen], dtype=storage_dtype(module),
                             base=base, origin=self.name, before=anchor)
            form = "dense"
        logger.info("estimate_patch: block [%d, %d), %s patch (%s), held-out per-token relative "
                    "error %s", start, start + n, chosen, form,
                    {k: round(v["token_rel"], 5) for k, v in errors.items()})
        report: dict[str, Any] = {
            "block": [start, start + n], "kind": chosen, "form": form, "patch": out.name,
            "holdout_errors": errors, "tokens_fit": int(fit_all.numel()),
            "tokens_holdout": int(hold_all.numel()), "rotation": rot, "factors": factors,
            "symmetric": symmetric, "ridge": self.ridge, "token_weights": self.token_weights,
            "warnings": warnings}
        if mlp is not None:
            report["mlp"] = {"rank": self.mlp_rank, "steps": self.mlp_steps, "lr": self.mlp_lr,
                             "batch": self.mlp_batch,
                             "parameters": sum(t.numel() for t in vars(mlp).values())}
        if chosen == "linearpatch":
            report["basis"] = {"basis": self.basis if signs is not None else rot, "size": d,
                               **({"seed": self.basis_seed} if signs is not None else {})}
        if form == "signed":
            record = {**module.config.extra.get("patch_basis", {}), out.name: report["basis"]}
            module.config = module.config.replace(extra={**module.config.extra,
                                                         "patch_basis": record})
        if scale is not None:
            report["scale"] = {"min": float(scale.min()), "max": float(scale.max()),
                               "mean": float(scale.mean())}
        return report
