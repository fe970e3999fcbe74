"""End-to-end tuning of quantized weights' group scales by distillation from the float model.

GPTQ and RTN choose each linear's codes and scales to keep that linear's output close, one layer
at a time; what each leaves adds up through the model. This stage (quantize_weights' setting
`tune_steps`) then trains the scales of every quantized linear at once on the model's output.
With the integer codes q and zero points z fixed, W = (q - z) * s is linear in the group scales
s, so the model is differentiable in them without a straight-through estimator, and the artefact
keeps the same packed weights and kernels: only the float32 scales change. EfficientQAT's E2E-QP
(Chen et al. 2024, "EfficientQAT: Efficient Quantization-Aware Training for Large Language
Models") trains the step sizes end to end with the codes frozen on the language-model loss of the
training text; here the target is the float model's next-token distribution (the module before
quantize_weights: the teacher), so the tuning gives back what quantization lost instead of
fitting the calibration text.

Loss, per token: KL(teacher || student) over the teacher's top-k tokens and the rest of the
vocabulary as one more outcome (k + 1 outcomes, the full KL coarsened: a lower bound of it that is
exact when both put the same share on the rest). Renormalising over the top-k alone instead
rewards a student that piles all its mass there, and on SmolLM2 that raised the perplexity.
Each group's scale is s0 * exp(theta), theta trained from 0: steps relative to the scale, and a
scale stays positive. Adam with a cosine schedule from `lr`, one sequence per step, seeded by
ctx.seed. One sequence in eight (at least one) is held out: the report gives its KL before and
after, and the scales are kept only when it fell.

Cost: a forward and a backward pass of the whole model per step in float32; memory: the codes as
float32 and the dequantized weights that one forward keeps for its backward (8 bytes per weight
beside the activations of one sequence).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from splice.ir import quant
from splice.ir.core import Module, Node
from splice.ir.interpreter import Interpreter, default_feeds
from ..infra.base import PassError

logger = logging.getLogger(__name__)

TOP_K = 64  # teacher tokens kept per position; the rest of the vocabulary is one more outcome
LOG_EVERY = 25  # steps between progress lines


def teacher_targets(module: Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The float module's top-k log-probabilities and token ids per position of `ids` [n, seq]:
    ([n, seq, k], [n, seq, k]), computed one sequence at a time in float32."""
    logger.info("scale tuning: the float model's targets on %d sequences of %d tokens",
                len(ids), ids.shape[1])
    interp = Interpreter(module, torch.float32)
    name = module.graph.outputs[0].name
    k = min(TOP_K, module.config.vocab_size)
    logp, idx = [], []
    for row in ids:
        logits = interp.run(default_feeds(module, row[None], None, torch.float32),
                            outputs=[name])[name][0]
        top = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
        logp.append(top.values)
        idx.append(top.indices)
    return torch.stack(logp), torch.stack(idx)


def coarse_kl(logits: torch.Tensor, logp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p || q) over the top-k outcomes `idx` of p (log-probabilities
    `logp`) and the rest of the vocabulary as one outcome; q = softmax(logits)."""
    p = logp.exp()
    logq = torch.log_softmax(logits, dim=-1).gather(-1, idx)
    p_rest = (1.0 - p.sum(-1)).clamp_min(1e-12)
    q_rest = (1.0 - logq.exp().sum(-1)).clamp_min(1e-12)
    kl = (p * (logp - logq)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
    return kl.mean()


class ScaledLinears:
    """The qlinear nodes of a module with trainable log-multipliers of their group scales:
    `compute` runs such a node as x @ ((q - z) * s0 * exp(theta))^T for the Interpreter."""

    def __init__(self, module: Module, nodes: list[Node]):
        self.module = module
        self.entries: dict[int, tuple[Node, torch.Tensor, torch.Tensor, torch.nn.Parameter]] = {}
        for node in nodes:
            a = node.attrs
            s0 = module.weight(node.inputs[2]).to(torch.float32)
            zp = node.inputs[3] if len(node.inputs) > 3 else None
            centered = quant.dequantize(module.weight(node.inputs[1]), torch.ones_like(s0),
                                        None if zp is None else module.weight(zp), a["bits"],
                                        a["group_size"], torch.float32)
            theta = torch.nn.Parameter(torch.zeros_like(s0))
            self.entries[id(node)] = (node, centered.reshape(*s0.shape, -1), s0, theta)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [e[3] for e in self.entries.values()]

    def compute(self, node: Node, args: list) -> tuple[torch.Tensor, ...] | None:
        entry = self.entries.get(id(node))
        if entry is None:
            return None
        _, centered, s0, theta = entry
        w = (centered * (s0 * theta.exp())[..., None]).reshape(centered.shape[0], -1)
        bias = args[4] if len(args) > 4 else None
        return (torch.nn.functional.linear(args[0], w[:, :node.attrs["in_features"]], bias),)

    def write(self, scale_dtype: torch.dtype = torch.float32) -> None:
        """Store the tuned scales in the module (float32, the MatMulNBits scales' dtype), rounded
        to `scale_dtype` values (float16: llama.cpp's block scales)."""
        for node, _, s0, theta in self.entries.values():
            scales = (s0 * theta.detach().exp()).to(scale_dtype).to(torch.float32)
            self.module.set_weight(node.inputs[2], scales.reshape(node.inputs[2].shape))


def tunable(module: Module) -> tuple[list[Node], list[str]]:
    """The qlinear nodes whose scales this stage may train, and the skipped ones with why: a
    scales table that another node also reads (a tied int8 lm_head shares its table with the
    qembedding) stays as it is."""
    nodes, skipped = [], []
    for node in module.graph.nodes:
        if node.op != "qlinear":
            continue
        if len(module.graph.consts[node.inputs[2].const].uses) > 1:
            skipped.append(f"{node.output.name}: its scales are shared with another node")
            continue
        nodes.append(node)
    return nodes, skipped


def tune_scales(module: Module, ids: torch.Tensor, logp: torch.Tensor, idx: torch.Tensor, *,
                steps: int, lr: float, seed: int, pass_name: str,
                scale_dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Train the group scales of every tunable qlinear of `module` towards the teacher targets
    (teacher_targets of the float module on `ids`); write them back, rounded to `scale_dtype`
    values, when the held-out KL falls (the KL of the unrounded scales)."""
    nodes, skipped = tunable(module)
    if not nodes:
        raise PassError(f"{pass_name}: tune_steps = {steps}, but the module has no quantized "
                        "linear whose scales can be tuned")
    n_hold = max(1, len(ids) // 8)
    if len(ids) - n_hold < 1:
        raise PassError(f"{pass_name}: {len(ids)} tuning sequence(s) leave none to train on after "
                        "holding one out; give more calibration tokens or a larger tune_samples")
    lin = ScaledLinears(module, nodes)
    interp = Interpreter(module, torch.float32)
    name = module.graph.outputs[0].name

    def kl(k: int, grad: bool) -> torch.Tensor:
        feeds = default_feeds(module, ids[k][None], None, torch.float32)
        logits = interp.run(feeds, outputs=[name], compute=lin.compute, grad=grad)[name][0]
        return coarse_kl(logits, logp[k], idx[k])

    def held_out() -> float:
        return sum(float(kl(k, False)) for k in range(n_hold)) / n_hold

    before = held_out()
    opt = torch.optim.Adam(lin.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        k = n_hold + int(torch.randint(0, len(ids) - n_hold, (1,), generator=gen))
        opt.zero_grad()
        loss = kl(k, True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % LOG_EVERY == 0:
            logger.info("%s: tuning scales, step %d/%d, KL %.4g", pass_name, step + 1, steps,
                        sum(losses[-LOG_EVERY:]) / LOG_EVERY)
    after = held_out()
    kept = math.isfinite(after) and after < before
    if kept:
        lin.write(scale_dtype)
    logger.info("%s: scale tuning: held-out KL %.4g -> %.4g over %d steps%s", pass_name, before,
                after, steps, "" if kept else " (no gain: scales kept)")
    return {"linears": len(nodes), "parameters": sum(p.numel() for p in lin.parameters()),
            "steps": steps, "train_sequences": len(ids) - n_hold, "heldout_sequences": n_hold,
            "heldout_kl_before": before, "heldout_kl_after": after, "changed": kept,
            "train_loss_first": losses[0] if losses else None,
            "train_loss_last": losses[-1] if losses else None, "skipped": skipped}
