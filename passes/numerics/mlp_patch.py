"""The MLP patch (estimate_patch kind "mlp"): the least-squares patch T, then a gated MLP block
on the stream after it, u + down(silu(gate(z)) * up(z)) with u = x T and z = rms_norm(u) (no
weight), trained together with T by regression on the calibration streams. Here: the function
(MLPWeights), its training (fit_mlp_patch), its nodes (emit_mlp_patch) and how find_patches
recognises the block (mlp_block_ending_at); estimate_patch's docstring says when to use it.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from splice.ir.core import Module, Node, Value, emit
from ..infra.base import PassError

MLP_OPS = ["rms_norm", "linear", "linear", "silu", "mul", "linear", "add"]
MLP_EPS = 1e-6  # the MLP patch's rms_norm


@dataclasses.dataclass
class MLPWeights:
    """The MLP patch x -> u + down(silu(gate(z)) * up(z)), u = x T, z = u / rms(u): T [d, d] and
    the gate, up [r, d] and down [d, r] weights (linear's [out, in])."""

    t: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        u = x @ self.t.to(x.dtype)
        z = u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + MLP_EPS)
        h = torch.nn.functional.silu(z @ self.gate.T.to(x.dtype)) * (z @ self.up.T.to(x.dtype))
        return u + h @ self.down.T.to(x.dtype)


def fit_mlp_patch(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, *, rank: int, steps: int,
                  lr: float, batch: int, seed: int, pass_name: str) -> MLPWeights:
    """T (the least-squares patch) and a gated MLP on the stream after it, trained together by
    AdamW with a cosine schedule on the per-token relative error sum_t ||f(x_t) - y_t||^2 /
    ||y_t||^2 (what the least-squares fit minimises), `batch` tokens a step drawn with `seed`, in
    float32. The down projection starts at zero, so training starts from the least-squares patch.
    """
    d = x.shape[-1]
    gen = torch.Generator().manual_seed(seed)
    xf, yf = x.to(torch.float32), y.to(torch.float32)
    w = 1.0 / yf.pow(2).sum(-1).clamp_min(1e-30)
    leaves = [t.to(torch.float32).clone(), torch.randn(rank, d, generator=gen) / math.sqrt(d),
              torch.randn(rank, d, generator=gen) / math.sqrt(d), torch.zeros(d, rank)]
    for leaf in leaves:
        leaf.requires_grad_(True)
    f = MLPWeights(*leaves)
    with torch.enable_grad():
        opt = torch.optim.AdamW(leaves, lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        for _ in range(steps):
            idx = torch.randint(x.shape[0], (min(batch, x.shape[0]),), generator=gen)
            loss = (w[idx] * (f(xf[idx]) - yf[idx]).pow(2).sum(-1)).mean()
            if not torch.isfinite(loss):
                raise PassError(f"{pass_name}: the MLP patch's training diverged (loss {loss}); "
                                "lower mlp_lr")
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return MLPWeights(*(leaf.detach().to(torch.float64) for leaf in leaves))


def emit_mlp_patch(module: Module, u: Value, mlp: MLPWeights, *, dtype: torch.dtype,
                   base: str, origin: str, after: Node) -> Value:
    """Insert the MLP patch's residual block on `u` (a dense patch's output): u + down(silu(
    gate(z)) * up(z)), z = rms_norm(u) without a weight; returns its output (named `base`)."""
    g = module.graph
    last = [after]

    def add(op: str, inputs: list[Value], attrs: dict | None, name: str) -> Value:
        last[0] = emit(g, op, inputs, attrs, name=name, role="patch", origin=origin,
                       after=last[0])
        return last[0].output

    def weight(name: str, t: torch.Tensor) -> Value:
        return module.add_weight(base + name, t.to(dtype))

    z = add("rms_norm", [u], {"eps": MLP_EPS}, base + ".norm")
    gate = add("linear", [z, weight(".gate.weight", mlp.gate)], None, base + ".gate")
    up = add("linear", [z, weight(".up.weight", mlp.up)], None, base + ".up")
    m = add("mul", [add("silu", [gate], None, base + ".act"), up], None, base + ".mul")
    down = add("linear", [m, weight(".down.weight", mlp.down)], None, base + ".down")
    return add("add", [u, down], None, base)


def mlp_block_ending_at(add: Node) -> list[Node] | None:
    """[rms_norm, gate, up, silu, mul, down, add] of an MLP patch ending at `add`, else None."""
    def made(v: Value | None, op: str) -> Node | None:
        p = v.producer if v is not None else None
        return p if p is not None and p.role == "patch" and p.op == op else None

    down = made(add.inputs[1], "linear")
    mul = made(down.inputs[0], "mul") if down is not None else None
    act = made(mul.inputs[0], "silu") if mul is not None else None
    gate = made(act.inputs[0], "linear") if act is not None else None
    up = made(mul.inputs[1], "linear") if mul is not None else None
    norm = made(gate.inputs[0], "rms_norm") if gate is not None else None
    if norm is None or up is None or up.inputs[0] is not norm.output \
            or norm.inputs[0] is not add.inputs[0]:
        return None
    return [norm, gate, up, act, mul, down, add]  # type: ignore[list-item]
