"""Choose the deployed form of each linear patch that estimate_patch inserted.

Strategies (each applies to every patch in the graph):

- "dense": one matmul by P. A factored LinearPatch (hadamard -> channel_scale(s) -> hadamard) is
  multiplied out, P = H diag(s) H computed in float64 and stored in the patch's dtype; so is a
  signed one (P = diag(sigma) H diag(s) H diag(sigma)) and a channel scale (P = diag(s)). Exact in
  float64 (storage rounding of P only). Costs d^2 multiply-adds per token; every backend has it.
- "fwht": the factored form, x P = ((x H) * s) H^T with H^T = H: two fast Hadamard transforms and
  a channel scale, O(d log d). A dense patch is converted only when it is exactly a LinearPatch:
  H symmetric (Sylvester or Paley II orders; Paley I and Williamson bases are not, and the
  `hadamard` op cannot apply H^T) and D = H P H diagonal to 1e-10 of its largest entry, s = diag D.
  Anything else (a least-squares patch, a P rounded to float32) is refused with the reason, so
  the strategy is exact in float64 whenever it succeeds.
  Signed patches (estimate_patch basis "r1") and channel scales are kept as they are.
- "auto": keep factored, signed and channel-scale patches and convert the dense ones that "fwht"
  can convert exactly; never fails, always exact.

An MLP patch (estimate_patch kind "mlp": a dense patch, then a gated MLP block on the stream) is
not linear: its MLP block stays as it is under every strategy but "fold", which refuses it, and
its dense part is treated as any dense patch.
- "fold": ReplaceMe's fold (Shopkhoev et al. 2025, "ReplaceMe: Network Simplification via Layer
  Pruning and Linear Transformations"): remove the patch and fold a d x d map T into the
  down_proj of the layer before the cut. The patched stream is (y + m) P, with y the stream after
  that layer's attention and m its MLP output; only m passes through a linear, so T is the ridge
  least-squares fit of y + m T to (y + m) P on the calibration tokens (per-token relative error,
  ridge towards T = P, as estimate_patch fits), and down_proj's weight becomes T^T W (its bias
  b T). Lossy: the report gives the fit's errors beside those of dropping the patch. It needs
  the pruned model (the stream the patch reads must feed nothing else) and a down_proj that
  writes the stream directly (not through Gemma's post norm); the patch must sit after a layer,
  not on the embedding.

Strategy (c) of the LinearPatch issue, P collapsing to a channel scale in a model whose residual
stream is Hadamard-rotated with the same matrix, happens in rotate, not here: estimate_patch with
basis "r1" measures s in rotate's R1 basis Q1 and emits the signed form, this pass keeps it
("auto"/"fwht"), and rotate turns Q1^T P Q1 = diag(s) into one channel_scale (exact by
construction: no fit, no rounding of P) through `r1_basis_patches` and `to_channel_scale` below. There is no "rotated" strategy: before rotate no
channel-scale form of P exists in the unrotated stream, and after it the patch already is one; a
check that a rotated dense P is diagonal would only hold when P is stored in float64 (in float32
its off-diagonal rounding is ~1e-8 of the diagonal), which is why the signed form exists.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import torch

from splice.ir.core import Module, Node, Value, emit
from splice.ir.hadamard import factorize, hadamard_matrix
from .infra.base import PassBase, PassContext, PassError, PassResult
from .estimate_patch import Patch, emit_patch, find_patches, remove_patch
from .numerics.patch_fits import ridge_lstsq, stream_errors
from .prune_layers import capture
from .infra.registry import register_pass

logger = logging.getLogger(__name__)

STRATEGIES = ("dense", "fwht", "fold", "auto")
KEPT_FORMS = ("factored", "signed", "scale")  # what "fwht" and "auto" leave as they are
DIAGONAL_RTOL = 1e-10


@register_pass
@dataclasses.dataclass(frozen=True)
class FusePatchPass(PassBase):
    """Turn every patch into the deployed form: dense, fwht (factored), auto or fold.

    Settings: `strategy`, `ridge` (the fold's least-squares regulariser, relative to the mean
    diagonal of M^T M).
    """

    name = "fuse_patch"

    strategy: Literal["dense", "fwht", "fold", "auto"] = "auto"
    ridge: float = 1e-2

    @property
    def exact(self) -> bool:  # type: ignore[override]
        return self.strategy != "fold"

    def call(self, module: Module, ctx: PassContext) -> PassResult:
        if self.strategy not in STRATEGIES:
            raise PassError(f"{self.name}: strategy {self.strategy!r}; accepted: "
                            f"{', '.join(STRATEGIES)}")
        if not self.ridge >= 0:
            raise PassError(f"{self.name}: ridge = {self.ridge}; it must be >= 0")
        patches = find_patches(module.graph)
        for p in patches:
            if p.form == "other":
                raise PassError(f"{self.name}: patch %{p.y.name} is "
                                f"{' -> '.join(n.op for n in p.nodes)}; accepted forms: one "
                                "matmul, one channel_scale, hadamard -> channel_scale -> "
                                "hadamard, that between two channel_scale(sigma), or an MLP "
                                "patch's block")
            if p.form == "mlp" and self.strategy == "fold":
                raise PassError(f"{self.name}: strategy 'fold' folds a linear patch into a "
                                f"down_proj; %{p.y.name} is an MLP patch (estimate_patch kind "
                                "'mlp'), which has no such fold; use strategy 'dense' or 'auto'")
        done: list[dict[str, Any]] = []
        # one patch at a time, re-reading the graph: a rewrite replaces the patch's values, and
        # the next patch may read them (two patches in a row); names are kept, so they identify
        handled: set[str] = set()
        while True:
            p = next((q for q in find_patches(module.graph) if q.y.name not in handled), None)
            if p is None:
                break
            handled.add(p.y.name)
            if p.form == "mlp":  # not linear: it runs as it is, after its dense patch
                entry = {"patch": p.y.name, "from": "mlp", "to": "mlp", "changed": False}
            elif self.strategy == "dense":
                entry = _to_dense(module, p, self.name)
            elif self.strategy == "fold":
                entry = _fold(module, ctx, p, self.ridge, self.name)
            else:
                entry = _to_factored(module, p, self.name, strict=self.strategy == "fwht")
            done.append(entry)
        changed = [e for e in done if e["changed"]]
        if changed:
            logger.info("fuse_patch: %s", ", ".join(f"{e['patch']} {e['from']} -> {e['to']}"
                                                    for e in changed))
        return PassResult(module, bool(changed), {"strategy": self.strategy, "patches": done})


def _replace(module: Module, p: Patch, new_out: Value) -> None:
    g = module.graph
    name = p.y.name
    p.y.replace_all_uses_with(new_out)
    g.outputs = [new_out if v is p.y else v for v in g.outputs]
    remove_patch(module, p)
    g.rename(new_out, name)


def _to_dense(module: Module, p: Patch, pass_name: str) -> dict[str, Any]:
    entry = {"patch": p.y.name, "from": p.form, "to": "dense", "changed": p.form != "dense"}
    if p.form == "dense":
        return entry
    dtype = module.weights[p.scale_value().const].dtype  # type: ignore[arg-type]
    out = emit_patch(module, p.x, matrix=p.matrix(module), dtype=dtype, base=p.y.name,
                     origin=pass_name, after=p.nodes[-1])
    _replace(module, p, out)
    return entry


def _to_factored(module: Module, p: Patch, pass_name: str, *, strict: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"patch": p.y.name, "from": p.form, "to": p.form, "changed": False}
    if p.form in KEPT_FORMS:
        return entry
    scale, why = _diagonal_in_hadamard(module, p)
    if scale is None:
        if strict:
            raise PassError(f"{pass_name}: strategy 'fwht' cannot turn patch %{p.y.name} into "
                            f"Hadamard transforms and a channel scale: {why}; use strategy "
                            "'dense' or 'auto' (which keeps such a patch dense)")
        entry["kept_dense"] = why
        return entry
    dtype = module.weights[p.nodes[0].inputs[1].const].dtype  # type: ignore[union-attr]
    out = emit_patch(module, p.x, scale=scale, dtype=dtype, base=p.y.name, origin=pass_name,
                     after=p.nodes[-1])
    _replace(module, p, out)
    entry.update(to="factored", changed=True)
    return entry


def _diagonal_in_hadamard(module: Module, p: Patch) -> tuple[torch.Tensor | None, str]:
    """(s, "") when the dense patch is exactly H diag(s) H for the symmetric Hadamard H of its
    order, else (None, the reason)."""
    w = p.nodes[0].inputs[1]
    assert w is not None
    d = w.shape[0]
    assert isinstance(d, int)
    if w.shape[0] != w.shape[1]:
        return None, f"it is {list(w.shape)}, not square"
    if factorize(d) is None:
        return None, f"order {d} has no Hadamard construction"
    h = hadamard_matrix(d)
    if not torch.equal(h, h.T):
        return None, (f"the Hadamard matrix of order {d} (base {factorize(d)[0]}) is not "
                      "symmetric, so H^T has no online transform")
    diag = h @ p.matrix(module) @ h
    s = diag.diagonal().clone()
    off = (diag - torch.diag(s)).abs().max()
    top = diag.abs().max().clamp_min(1e-300)
    if off > DIAGONAL_RTOL * top:
        return None, (f"H P H is not diagonal (largest off-diagonal entry {float(off / top):.2g} "
                      f"of the largest entry, allowed {DIAGONAL_RTOL:g}): it is not a LinearPatch "
                      "(a least-squares patch), or its P was rounded below float64")
    return s, ""


def _fold(module: Module, ctx: PassContext, p: Patch, ridge: float,
          pass_name: str) -> dict[str, Any]:
    g = module.graph
    x = p.x
    if p.dangling(g):
        raise PassError(f"{pass_name}: patch %{p.y.name} is not wired in yet; strategy 'fold' "
                        "needs the pruned model (run prune_layers first)")
    others = [u for u in x.users() if u is not p.nodes[0]]
    if others:
        raise PassError(f"{pass_name}: the stream %{x.name} that patch %{p.y.name} reads also "
                        f"feeds {others[0].op} ({others[0].role or 'no role'}); 'fold' can only "
                        "change a stream that nothing but the patch reads")
    add = x.producer
    if add is None or add.op != "add" or add.role != "mlp.residual":
        what = "a graph input" if add is None else f"{add.op} ({add.role or 'no role'})"
        raise PassError(f"{pass_name}: patch %{p.y.name} reads %{x.name}, made by {what}; 'fold' "
                        "needs the MLP residual add of the layer before the cut (a block "
                        "starting at layer 0 has none)")
    down, m_index = _down_proj(add)
    if down is None:
        kinds = ", ".join(f"{v.producer.op} ({v.producer.role})" for v in add.inputs
                          if v is not None and v.producer is not None)
        raise PassError(f"{pass_name}: the residual add before patch %{p.y.name} adds "
                        f"{kinds}; 'fold' needs an mlp.down_proj linear writing the stream "
                        "directly (a post norm between them is not linear)")
    y, m = add.inputs[1 - m_index], add.inputs[m_index]
    assert y is not None and m is not None
    ys, ms, xs = (t.to(torch.float64) for t in capture(module, ctx, [y, m, x], pass_name))
    target = xs @ p.matrix(module)
    # per-token relative error of the patched stream, ridge towards T = P (see ridge_lstsq)
    w = 1.0 / target.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    t = ridge_lstsq(ms * w, (target - ys) * w, ridge, pass_name, prior=p.matrix(module),
                    token_weights=False)
    errors = {"fold": stream_errors(ys + ms @ t, target), "unpatched": stream_errors(xs, target)}
    w = down.inputs[1]
    assert w is not None
    wt = module.weight(w)
    module.set_weight(w, (t.T @ wt.to(torch.float64)).to(wt.dtype))
    b = down.inputs[2] if len(down.inputs) > 2 else None
    if b is not None:
        bt = module.weight(b)
        module.set_weight(b, (bt.to(torch.float64) @ t).to(bt.dtype))
    name = p.y.name
    p.y.replace_all_uses_with(x)
    g.outputs = [x if v is p.y else v for v in g.outputs]
    dropped = remove_patch(module, p)
    logger.info("fuse_patch: folded %s into layer %s down_proj, relative error %.3g", name,
                down.layer, errors["fold"]["rel_mse"])
    return {"patch": name, "from": p.form, "to": f"layers.{down.layer}.mlp.down_proj",
            "changed": True, "calibration_errors": errors, "dropped_weights": dropped}


def _down_proj(add: Node) -> tuple[Node | None, int]:
    """The mlp.down_proj linear feeding `add` only, with constant weights, and its input index."""
    for i, v in enumerate(add.inputs):
        node = v.producer if v is not None else None
        if node is None or node.op != "linear" or node.role != "mlp.down_proj":
            continue
        consts = [c for c in node.inputs[1:] if c is not None]
        if len(v.uses) == 1 and all(c.is_const and len(c.uses) == 1 for c in consts):
            return node, i
    return None, -1


# -- strategy (c): a signed patch in a stream rotated by the same matrix (called by rotate) ------

def r1_basis_patches(module: Module, n: int, block: int, signs: torch.Tensor,
                     seed: int) -> tuple[dict[int, Patch], dict[int, str]]:
    """For rotate's R1 (order n, `block` 0 for a full Hadamard, `signs` drawn from `seed`): the
    signed patches in exactly its basis, by first node, and why each other signed patch is not.
    The signs are compared exactly: a collapse is exact only for Q = Q1."""
    collapsible: dict[int, Patch] = {}
    refused: dict[int, str] = {}
    recorded = module.config.extra.get("patch_basis", {})
    for p in find_patches(module.graph):
        if p.form != "signed":
            continue
        size = p.nodes[1].attrs["size"]
        if block or size != n:
            refused[id(p.nodes[0])] = (f"a signed patch of order {size}, R1 is "
                                       + (f"block-diagonal ({block})" if block else f"of order {n}"))
        elif not torch.equal(p.signs(module), signs):
            was = recorded.get(p.y.name, {}).get("seed")
            refused[id(p.nodes[0])] = (
                "a signed patch whose signs are not R1's ("
                + (f"estimate_patch basis_seed {was}" if was is not None else "other signs")
                + f", rotate seed {seed}); give estimate_patch basis_seed = rotate's seed")
        else:
            collapsible[id(p.nodes[0])] = p
    return collapsible, refused


def to_channel_scale(module: Module, p: Patch, origin: str) -> None:
    """Replace a signed chain whose basis the stream now is in by channel_scale(s), keeping the
    patch's name and its s weight: Q1^T (Q1 diag(s) Q1^T) Q1 = diag(s)."""
    out = emit(module.graph, "channel_scale", [p.x, p.scale_value()], name=p.y.name + ".r1",
               role="patch", origin=origin, after=p.nodes[-1]).output
    _replace(module, p, out)
