"""Refine a waiting linear patch by distillation from the unpruned model.

After estimate_patch and before prune_layers, the module still holds the whole model (the
teacher) and the patch waits on the stream entering the block. This pass trains only the patch —
the d x d matrix of a dense patch, or the d channel scales s of a factored or signed LinearPatch
(signs and Hadamard matrices fixed, so a signed patch still collapses under rotate) — so that
the model with the block bypassed through the patch (the student) matches the teacher's next-token
distribution: KL(teacher || student) over the teacher's top-k tokens (the teacher renormalised
over them, the student's full log-softmax gathered there), as LinearPatch's memory-light
fine-tuning does (Chen et al. 2025, section 3.3, which distils with KL on the dense model's
outputs). The teacher's top-k logits are computed once; the stream entering the block is cached
per sample, so a training step runs only the patch and the layers after the block. AdamW with a
cosine learning-rate schedule, float32.

Data: `samples` sequences of `seq_len` tokens cut from the calibration rows; one in eight (at
least one) is held out and the report gives the held-out KL before and after. Deterministic for
a given ctx.seed.

Exactness: the patch's output is still unused when the pass runs, so the module computes exactly
what it did; prune_layers then puts the trained patch to work.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch

from splice.ir.core import Module, Node, Value
from splice.ir.hadamard import hadamard_matrix
from splice.ir.interpreter import Interpreter, default_feeds
from splice.ir.opdef import get_op
from .infra.base import PassBase, PassContext, PassError, PassResult
from .estimate_patch import Patch, find_patches
from .prune_layers import check_calibration, resolve_block, stream_in, stream_out
from .infra.registry import register_pass

logger = logging.getLogger(__name__)


@register_pass
@dataclasses.dataclass(frozen=True)
class DistillPatchPass(PassBase):
    """Train the waiting patch by top-k KL distillation from the unpruned model.

    Settings: `samples` (sequences), `seq_len`, `steps`, `batch`, `lr` (AdamW peak learning
    rate, cosine decay to 0), `top_k` (teacher logits kept per token).
    """

    name = "distill_patch"
    exact = True

    samples: int = 64
    seq_len: int = 128
    steps: int = 100
    batch: int = 4
    lr: float = 1e-3
    top_k: int = 50

    def _check(self, vocab: int) -> None:
        for key in ("samples", "seq_len", "steps", "batch", "top_k"):
            if getattr(self, key) < 1:
                raise PassError(f"{self.name}: {key} = {getattr(self, key)}; it must be >= 1")
        if self.samples < 2:
            raise PassError(f"{self.name}: samples = {self.samples}; at least 2 (one is held out)")
        if not self.lr > 0 or math.isinf(self.lr):
            raise PassError(f"{self.name}: lr = {self.lr}; it must be a finite number > 0")
        if self.top_k > vocab:
            raise PassError(f"{self.name}: top_k = {self.top_k} exceeds the vocabulary ({vocab})")

    def call(self, module: Module, ctx: PassContext) -> PassResult:
        self._check(module.config.vocab_size)
        block = resolve_block(module, -1, -1, True, self.name)
        if block is None:
            if module.config.extra.get("pruned"):
                return PassResult(module, False, {"skipped": "no block pending"})
            raise PassError(f"{self.name}: no block pending; run select_layers and "
                            "estimate_patch first (distillation needs the unpruned teacher)")
        start, n, _ = block
        x_in, x_out = stream_in(module, start, self.name), stream_out(module, start + n - 1,
                                                                      self.name)
        patch = next((p for p in find_patches(module.graph)
                      if p.x is x_in and p.dangling(module.graph)), None)
        mlp = next((p for p in find_patches(module.graph) if p.form == "mlp"
                    and p.dangling(module.graph) and p.x.producer is not None
                    and p.x.producer.inputs[0] is x_in), None)
        if mlp is not None:
            raise PassError(f"{self.name}: the patch waiting on %{x_in.name} is an MLP patch "
                            f"(%{mlp.y.name}, estimate_patch kind 'mlp'), trained already; "
                            "distill_patch trains a linear patch (kind 'lstsq', 'linearpatch' "
                            "or 'auto')")
        if patch is None:
            raise PassError(f"{self.name}: no patch waits on %{x_in.name} (the stream entering "
                            f"layer {start}); run estimate_patch first")
        if patch.form == "other":
            raise PassError(f"{self.name}: patch %{patch.y.name} has an unknown form")
        if module.config.extra.get("distilled") == patch.y.name:
            return PassResult(module, False, {"skipped": f"patch %{patch.y.name} was distilled "
                                              "already"})
        ids = calibration_sequences(check_calibration(module, ctx, self.name), self.seq_len,
                                    self.samples, self.name)
        report = _train(module, ctx, self, patch, x_out, ids)
        report["block"] = [start, start + n]
        module.config = module.config.replace(extra={**module.config.extra,
                                                     "distilled": patch.y.name})
        return PassResult(module, True, report)


def calibration_sequences(calib: torch.Tensor, seq_len: int, samples: int,
                          pass_name: str) -> torch.Tensor:
    """Up to `samples` sequences of `seq_len` tokens cut from the calibration rows [rows, len]."""
    if calib.shape[1] < seq_len:
        raise PassError(f"{pass_name}: calibration rows have {calib.shape[1]} tokens, fewer than "
                        f"seq_len = {seq_len}")
    per_row = calib.shape[1] // seq_len
    seqs = calib[:, :per_row * seq_len].reshape(-1, seq_len)
    if seqs.shape[0] < 2:
        raise PassError(f"{pass_name}: the calibration data gives {seqs.shape[0]} sequence of "
                        f"{seq_len} tokens; distillation needs at least 2 (one held out)")
    return seqs[:samples]


class _Student:
    """The module with the block bypassed through a trainable patch, run from the cached stream
    entering the block: only the patch and the nodes after the block, with autograd on."""

    def __init__(self, module: Module, patch: Patch, x_out: Value, param: torch.Tensor):
        g = module.graph
        self.module, self.patch, self.param = module, patch, param
        after = g.nodes.index(x_out.producer) + 1  # type: ignore[arg-type]
        self.nodes: list[Node] = [nd for nd in g.nodes[after:] if nd.role != "patch"]
        self.x_out = x_out
        made = {id(v) for nd in self.nodes for v in nd.outputs} | {id(x_out)}
        self.external = [v for nd in self.nodes for v in nd.inputs
                         if v is not None and not v.is_const and v.producer is not None
                         and id(v) not in made]
        self.weights: dict[str, torch.Tensor] = {}
        self.h = hadamard_matrix(param.shape[0], dtype=torch.float32) \
            if patch.form in ("factored", "signed") else None
        self.sigma = patch.signs(module).to(torch.float32) if patch.form == "signed" else None

    def matrix(self) -> torch.Tensor:
        if self.patch.form == "scale":
            return torch.diag(self.param)
        if self.h is None:
            return self.param
        if self.sigma is not None:
            return ((self.sigma[:, None] * self.h * self.param) @ self.h) * self.sigma
        return (self.h * self.param) @ self.h

    def logits(self, feeds: dict[int, torch.Tensor], x_in: torch.Tensor) -> torch.Tensor:
        env = dict(feeds)
        env[id(self.x_out)] = x_in @ self.matrix()
        for node in self.nodes:
            args = [None if v is None else self._const(v) if v.is_const else env[id(v)]
                    for v in node.inputs]
            for v, t in zip(node.outputs, get_op(node.op).reference(node.attrs, *args)):
                env[id(v)] = t
        return env[id(self.module.graph.outputs[0])]

    def _const(self, v: Value) -> torch.Tensor:
        t = self.weights.get(v.name)
        if t is None:
            t = self.module.weight(v)
            t = t.to(torch.float32) if t.is_floating_point() else t
            self.weights[v.name] = t
        return t


def _kl(logits: torch.Tensor, top_vals: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(top_vals, dim=-1)
    logq = torch.log_softmax(logits, dim=-1).gather(-1, top_idx)
    return (p * (torch.log(p.clamp_min(1e-30)) - logq)).sum(-1).mean()


def _train(module: Module, ctx: PassContext, s: DistillPatchPass, patch: Patch, x_out: Value,
           ids: torch.Tensor) -> dict[str, Any]:
    g = module.graph
    init = patch.matrix(module) if patch.form == "dense" else patch.scale(module)
    param = torch.nn.Parameter(init.to(torch.float32).clone())
    student = _Student(module, patch, x_out, param)
    teacher = Interpreter(module, torch.float32)
    logits_name = g.outputs[0].name
    cache = []  # per sample: (graph-input feeds by value id, externals, x_in, top vals, top idx)
    for row in ids:
        feeds = default_feeds(module, row[None], None, torch.float32)
        names = [patch.x.name] + [v.name for v in student.external]
        out = teacher.run(feeds, capture=names)
        top = out[logits_name].topk(s.top_k, dim=-1)
        by_id = {id(v): feeds[v.name] for v in g.inputs}
        by_id.update({id(v): out[v.name] for v in student.external})
        cache.append((by_id, out[patch.x.name], top.values, top.indices))
    n_hold = max(1, len(cache) // 8)
    train, hold = cache[n_hold:], cache[:n_hold]
    if not train:
        raise PassError(f"{s.name}: {len(cache)} sequences leave none to train on after holding "
                        "one out; give more calibration tokens or more samples")

    def held_out_kl() -> float:
        with torch.no_grad():
            return float(sum(_kl(student.logits(f, x), v, i) for f, x, v, i in hold) / len(hold))

    kl_before = held_out_kl()
    opt = torch.optim.AdamW([param], lr=s.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(ctx.seed)
    losses = []
    with torch.enable_grad():
        for step in range(s.steps):
            for group in opt.param_groups:
                group["lr"] = s.lr * 0.5 * (1 + math.cos(math.pi * step / s.steps))
            pick = torch.randint(0, len(train), (s.batch,), generator=gen)
            opt.zero_grad()
            loss = sum(_kl(student.logits(train[k][0], train[k][1]), train[k][2], train[k][3])
                       for k in pick.tolist()) / s.batch
            loss.backward()  # type: ignore[union-attr]
            opt.step()
            losses.append(float(loss.detach()))  # type: ignore[union-attr]
    kl_after = held_out_kl()
    changed = kl_after < kl_before
    if changed:
        target = patch.nodes[0].inputs[1] if patch.form == "dense" else patch.scale_value()
        assert target is not None
        module.set_weight(target, param.detach().to(module.weight(target).dtype))
    logger.info("distill_patch: held-out KL %.4g -> %.4g over %d steps%s", kl_before, kl_after,
                s.steps, "" if changed else " (no gain: patch kept)")
    return {"changed": changed, "patch": patch.y.name, "trained": patch.form,
            "parameters": param.numel(), "heldout_kl_before": kl_before,
            "heldout_kl_after": kl_after, "train_loss_first": losses[0],
            "train_loss_last": losses[-1], "train_sequences": len(train),
            "heldout_sequences": len(hold)}
