"""Quantize the weights of the decoder's linears to 4 or 8 bits: `linear` nodes become `qlinear`.

Methods:
- "rtn": round to nearest, groupwise (optionally with an MSE search of the clip ratio per group).
  Needs no calibration; with calibration tokens it also reports each linear's output error
  (unless output_error = false: that is a calibration run through every layer, which a recipe
  calibrating only its pruning passes may not want to pay for on a large model).
- "gptq": GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
  Pre-trained Transformers", ICLR 2023; the solver is splice.passes.numerics.quantizers.gptq). The Hessian of each
  linear, H = 2 X^T X / n, comes from its inputs on the calibration tokens, collected layer by
  layer as the paper's reference code does: the graph is run one stage (one decoder layer; the
  nodes between layers form their own stages) at a time over the whole calibration batch, the
  inputs of that stage's selected linears are accumulated into X^T X, those linears are quantized,
  and the stage is run again with the quantized weights to produce the next stage's inputs
  (activations in ctx.precision; each chunk's X^T X in that precision, the sum over chunks and the
  solver in float64). Later layers therefore see the error of earlier ones, and memory holds the
  residual stream at one layer boundary plus one layer's activations for one chunk of tokens. The
  embeddings (embeddings = "int8" or "int4") are RTN-quantized into a `qembedding`. Linears that
  read the same value (q/k/v, gate/up) share one Hessian. Within a layer all linears are quantized
  from the same forward pass (the reference code's default, not its "true sequential" option).
  Across processes (torch.distributed, passes/infra/reduce.py) each holds a share of the calibration
  batches; the X^T X sums and the token count are all-reduced before the solver, so every process
  quantizes from the whole set's Hessian. The solves themselves are shared out: rank j % world
  solves a stage's j-th linear and one sum hands its result to the others (quantizers.shared_solve), so with
  N processes each runs about 1/N of the solver's work and all hold the same weights.

Per linear the report gives the relative output error ||X W^T - X Wq^T|| / ||X W^T|| on the
calibration inputs (computed from X^T X), and for GPTQ also RTN's error on the same inputs, so the
two methods compare on equal terms. With fewer calibration tokens than a linear has inputs the
Hessian is singular: the dampening is raised to at least 0.1 and the report warns. Dead inputs
(a zero Hessian diagonal) are handled as GPTQ does (diagonal set to 1, weight column zeroed).

Which linears: `roles` (default every decoder linear: q/k/v/o projections and gate/up/down); the
lm_head follows `lm_head` ("keep", "int8" or "int4"; a tied lm_head gets its own packed copy and
the embedding keeps the float table). Mixed formats: `per_linear` maps roles ("mlp.down_proj"),
single linears ("layers.0.mlp.down_proj", the label wins) or "lm_head" among the selected ones to
their own [bits, group_size]; a name that matches no selected linear is refused. Group sizes:
0 = per output channel, or 16/32/64/128/256 (MatMulNBits' block sizes). A group that does not
divide in_features leaves a partial last group, as MatMulNBits does (SmolLM2's 576 inputs in
groups of 128: 4 groups and one of 64); a group
larger than some selected linear's in_features is refused, naming them, before anything changes,
unless `fit_groups` is set: such a linear (or embedding table) then gets one group per row, and
one whose in_features the group does not divide gets the largest group that does, halving down
to 16 (quantizers.fitted_group: SmolLM2's 576 inputs at 128 -> 64, no padded block; measured
there, W4 RTN after R1 R2 with the clip search, first 4,096 WikiText-2 test tokens: ppl 48.35 at
g128 with its padded fifth block, 37.87 at g64, 3% fewer bytes). The presets set it, so that one preset fits
a 64-wide toy model, SmolLM2 and a 2048-wide model each with the largest unpadded group.
Symmetric quantization stores no zero points (8 for int4, 128 for int8: MatMulNBits' default);
`float_zero_points` stores a float32 zero point per group instead of a 4-bit integer (the min-max
grid q * s + min of llama.cpp's Q4_1: a model published as Q4_1 with groups of 32, SmolLM2-135M,
comes back exactly at W4 g32; MatMulNBits then computes in float, slower than int8 compute).

With `tune_steps` > 0 the quantized scales are then tuned end to end: every quantized linear's
group scales at once, codes and zero points fixed, by distillation from a float teacher
(passes/numerics/tune_scales.py; `tune_samples` sequences of `tune_seq_len` calibration tokens
(0: as long as the calibration rows, so that one preset tunes a toy model's short rows too), one step
per sequence, `tune_lr`). `tune_teacher` "input" is the module as it was before this pass;
"original" is the module the pass list started from (ctx.reference), so that after pruning the
scales also learn back some of what the pruning lost. A whole-model training run: refused across
processes and in layer-by-layer mode.

`scale_dtype` = "float16" rounds scales to float16 before codes are chosen (and tuned scales when
stored): the codes of llama.cpp's Q4_0 / Q4_1 / Q8_0 blocks (backends/gguf).

Never exact: `exact = False`, the numeric check reports the logit error. A second run finds no
`linear` of the selected roles and reports modified=False.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import torch

from splice.ir import quant
from .numerics import quantizers
from splice.ir.core import Module, Node, emit
from .infra.base import PassBase, PassContext, PassError, PassResult
from .distill_patch import calibration_sequences
from .infra.registry import register_pass
from .numerics.stages import StageRunner, stage_hessians
from .numerics.tune_scales import teacher_targets, tune_scales

logger = logging.getLogger(__name__)

DECODER_LINEARS = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj",
                   "mlp.up_proj", "mlp.down_proj")
GROUP_SIZES = (0, 16, 32, 64, 128, 256)
LM_HEAD = {"keep": 0, "int8": 8, "int4": 4}  # also the embeddings' settings
SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
TEACHERS = ("input", "original")  # tune_teacher: the module before this pass, or before all
MIN_DAMP_FEW_TOKENS = 0.1    # dampening when there are fewer tokens than inputs


def label(node: Node) -> str:
    if node.layer is not None:
        return f"layers.{node.layer}.{node.role}"
    return node.role or node.output.name


@register_pass
@dataclasses.dataclass(frozen=True)
class QuantizeWeightsPass(PassBase):
    """Quantize the decoder's linear weights to int4/int8 (RTN or GPTQ) in MatMulNBits' layout.

    Settings: method "rtn" | "gptq"; bits 4 | 8; group_size 0 (per channel) | 16..256; symmetric;
    float_zero_points (4-bit min-max grid, a float32 zero point per group, as Q4_1); clip_search
    (MSE grid of clip ratios 1.0..0.7 per group); damp (GPTQ dampening, a fraction of mean diag
    H); act_order (GPTQ columns by decreasing diag H, static groups); block_size (GPTQ lazy-batch
    width); lm_head and embeddings "keep" | "int8" | "int4" (embeddings: RTN, a qembedding op; a
    tied int8 lm_head with the same groups shares its table); roles (linear roles to quantize);
    per_linear (role or label -> [bits, group_size]); output_error (RTN given calibration
    tokens: measure each linear's output error); hessian_samples (the first calibration rows
    GPTQ's Hessians and the output errors use; 0 = all); tune_steps, tune_lr, tune_samples,
    tune_seq_len, tune_teacher (end-to-end tuning of the scales, 0 steps = none); fit_groups (a
    linear or table narrower than group_size: one group per row, not a refusal); scale_dtype
    "float32" | "float16" (scales rounded to it before codes are chosen: llama.cpp's is float16).
    """

    name = "quantize_weights"
    exact = False

    method: str = "rtn"
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    float_zero_points: bool = False
    clip_search: bool = False
    damp: float = 0.01
    act_order: bool = False
    block_size: int = 128
    lm_head: str = "keep"
    embeddings: str = "keep"
    roles: tuple[str, ...] = DECODER_LINEARS
    per_linear: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict, hash=False)
    output_error: bool = True
    hessian_samples: int = 0
    tune_steps: int = 0
    tune_lr: float = 1e-3
    tune_samples: int = 128
    tune_seq_len: int = 512
    tune_teacher: str = "input"
    scale_dtype: str = "float32"
    fit_groups: bool = False

    def __post_init__(self) -> None:
        p = f"pass {self.name!r}:"
        if self.method not in ("rtn", "gptq"):
            raise PassError(f"{p} method {self.method!r} is not supported; accepted: 'rtn', 'gptq'")
        if self.bits not in quant.BITS:
            raise PassError(f"{p} int{self.bits} is not supported; bits must be 4 or 8")
        if self.group_size not in GROUP_SIZES:
            raise PassError(f"{p} group_size {self.group_size} is not supported; accepted: 0 (per "
                            "output channel), 16, 32, 64, 128, 256")
        if not 0.0 < self.damp < 1.0:
            raise PassError(f"{p} damp {self.damp} must lie in (0, 1) (a fraction of mean diag H)")
        if self.block_size < 1:
            raise PassError(f"{p} block_size {self.block_size} must be a positive integer")
        if self.float_zero_points and (self.symmetric or self.bits != 4):
            raise PassError(f"{p} float_zero_points needs asymmetric 4-bit weights (MatMulNBits "
                            "takes float zero points only for 4 bits); set symmetric=false, bits=4")
        for key in ("embeddings", "lm_head"):
            if getattr(self, key) not in LM_HEAD:
                raise PassError(f"{p} {key} {getattr(self, key)!r}; accepted: {', '.join(LM_HEAD)}")
        for key, least in (("hessian_samples", 0), ("tune_steps", 0), ("tune_samples", 2),
                           ("tune_seq_len", 0)):
            if getattr(self, key) < least:
                held = " (one sequence is held out)" if key == "tune_samples" else ""
                raise PassError(f"{p} {key} = {getattr(self, key)}; it must be >= {least}{held}")
        if not 0.0 < self.tune_lr < math.inf:
            raise PassError(f"{p} tune_lr {self.tune_lr} must be a finite number > 0")
        if self.tune_teacher not in TEACHERS:
            raise PassError(f"{p} tune_teacher {self.tune_teacher!r}; accepted: "
                            f"{', '.join(TEACHERS)}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise PassError(f"{p} scale_dtype {self.scale_dtype!r}; accepted: float32, float16")
        if "lm_head" in self.roles:
            raise PassError(f"{p} the lm_head is chosen by lm_head = 'int8' | 'int4', not roles")
        for key, (bits, group) in self.per_linear.items():
            if bits not in quant.BITS or group not in GROUP_SIZES:
                raise PassError(f"{p} per_linear {key!r} = [{bits}, {group}]; bits 4 or 8, "
                                "group_size 0, 16, 32, 64, 128 or 256")

    def wants_reference(self) -> bool:
        return self.tune_steps > 0 and self.tune_teacher == "original"

    _dtype = property(lambda self: SCALE_DTYPES[self.scale_dtype])

    def _float_zero(self, bits: int) -> bool:
        """Float zero points apply to the 4-bit weights; an int8 lm_head keeps integer ones."""
        return self.float_zero_points and bits == 4

    # -- what to quantize ------------------------------------------------------------------------
    def _targets(self, module: Module) -> tuple[list[tuple[Node, int, int]], dict[str, str]]:
        """(linear, bits, group) for each linear to quantize, and the skipped ones with why."""
        targets, skipped, bad, unmatched = [], {}, [], set(self.per_linear)
        for node in module.graph.nodes:
            if node.op != "linear":
                continue
            bits = LM_HEAD[self.lm_head] if node.role == "lm_head" else \
                self.bits if node.role in self.roles else 0
            if not bits:
                continue
            key = next((x for x in (label(node), node.role) if x in self.per_linear), None)
            bits, group = self.per_linear[key] if key else (bits, self.group_size)
            unmatched.discard(key)
            w = node.inputs[1]
            if not w.is_const or not module.weight(w).is_floating_point():
                skipped[label(node)] = "its weight is not a constant float tensor"
                continue
            n, k = w.shape
            group = group or k
            if self.fit_groups:
                group = quantizers.fitted_group(group, k)
            elif group > k:
                bad.append(f"{label(node)} (in_features {k})")
            targets.append((node, bits, group))
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise PassError(f"pass {self.name!r}: group_size {self.group_size} exceeds the "
                            f"in_features of {', '.join(bad[:3])}{more}; choose a smaller group, "
                            "group_size 0 (per channel), or leave those roles out")
        if unmatched and targets:  # (none: a second run, everything already quantized)
            raise PassError(f"pass {self.name!r}: per_linear {sorted(unmatched)} match no "
                            "selected linear; give roles (mlp.down_proj), labels "
                            "(layers.0.mlp.down_proj) or lm_head, of linears this pass quantizes")
        return targets, skipped

    def call(self, module: Module, ctx: PassContext) -> PassResult:
        t0 = time.perf_counter()
        targets, skipped = self._targets(module)
        report: dict[str, Any] = {"method": self.method, "bits": self.bits,
                                  "group_size": self.group_size, "quantized": [], "layers": {},
                                  "skipped": skipped, "warnings": []}
        tables = self._tables(module)
        if not targets and not tables:
            return PassResult(module, False, report)
        tuning = self._tuning(module, ctx) if self.tune_steps else None
        calib = ctx.calibration if targets and self.output_error else None
        if self.method == "gptq" and targets:
            calib = ctx.require_calibration(self.name)
        if calib is not None:
            if calib.dim() == 1:
                calib = calib[None]
            if self.hessian_samples:
                calib = calib[:self.hessian_samples]
            report["calibration_tokens"] = int(ctx.reduce(torch.tensor(calib.numel())))
            results = self._calibrated(module, targets, calib, ctx, report)
        else:
            results = {}
            for node, bits, group in targets:
                w = module.weight(node.inputs[1])
                qw = quantizers.rtn(w, bits, group, symmetric=self.symmetric, clip=self.clip_search,
                                    float_zero=self._float_zero(bits), scale_dtype=self._dtype)
                rel = qw.rel_error(w)
                results[id(node)] = qw
                report["layers"][label(node)] = {"weight_rel_error": rel}
        before = sum(module.weight(n.inputs[1]).numel() * module.weight(n.inputs[1]).element_size()
                     for n, _, _ in targets)
        after, made, old = self._rewrite(module, targets, results)
        if tables:
            old |= {n.inputs[1].const for n in tables}
            before_t, after_t = self._embeddings(module, tables, made, report)
            before, after = before + before_t, after + after_t
        for wname in sorted(old):
            if not module.graph.consts[wname].uses:
                module.graph.remove_const(wname)
                del module.weights[wname]
        if tuning is not None:
            report["tune"] = {"teacher": self.tune_teacher, **tune_scales(
                module, *tuning, steps=self.tune_steps, lr=self.tune_lr, seed=ctx.seed,
                pass_name=self.name, scale_dtype=self._dtype)}
        report["quantized"] = [label(n) for n, _, _ in targets] + [label(n) for n in tables]
        report["bytes"] = {"float": before, "quantized": after}
        for key in ("rel_error", "rtn_rel_error"):  # rtn_rel_error: GPTQ's linears
            errors = [v[key] for v in report["layers"].values() if key in v]
            if errors:
                report[f"mean_{key}"] = sum(errors) / len(errors)
        report["time_s"] = round(time.perf_counter() - t0, 3)
        module.config = module.config.replace(extra={**module.config.extra, "quantization": {
            **module.config.extra.get("quantization", {}),
            "weights": {"method": self.method, "bits": self.bits, "group_size": self.group_size,
                        "symmetric": self.symmetric, "lm_head": self.lm_head,
                        "embeddings": self.embeddings,
                        "per_linear": {k: list(v) for k, v in self.per_linear.items()}}}})
        logger.info("quantize_weights: %s int%d g%d on %d linears in %.1f s", self.method,
                    self.bits, self.group_size, len(targets), report["time_s"])
        return PassResult(module, True, report)

    def _tuning(self, module: Module, ctx: PassContext) -> tuple[torch.Tensor, ...]:
        """The tuning sequences and the teacher's targets on them (before quantizing)."""
        if ctx.reducer.world_size > 1:
            raise PassError(f"{self.name}: tune_steps trains on one process's tokens; across "
                            f"{ctx.reducer.world_size} processes set tune_steps = 0")
        teacher = module
        if self.tune_teacher == "original":
            teacher = ctx.reference
            if teacher is None:
                raise PassError(f"{self.name}: tune_teacher = 'original' needs the module the "
                                "pass list started from; run the pass through a PassManager (or "
                                "compile), or set PassContext.reference")
            if teacher.config.vocab_size != module.config.vocab_size:
                raise PassError(f"{self.name}: the original module has a vocabulary of "
                                f"{teacher.config.vocab_size} tokens, this one "
                                f"{module.config.vocab_size}; tune_teacher = 'original' needs "
                                "the same vocabulary")
        calib = ctx.require_calibration(self.name)
        ids = calibration_sequences(calib if calib.dim() == 2 else calib[None],
                                    self.tune_seq_len or calib.shape[-1], self.tune_samples,
                                    self.name)
        return (ids, *teacher_targets(teacher, ids))

    # -- calibrated quantization -------------------------------------------------------------------
    def _calibrated(self, module: Module, targets: list[tuple[Node, int, int]],
                    calib: torch.Tensor, ctx: PassContext, report: dict) -> dict[int, Any]:
        dtype = ctx.precision
        runner = StageRunner(module, calib, dtype)
        by_node = {id(n): (n, bits, group) for n, bits, group in targets}
        todo = {runner.stage_of[key] for key in by_node}
        results: dict[int, quantizers.QuantizedWeight] = {}
        tokens = report["calibration_tokens"]  # over all processes
        for s in range(max(todo) + 1):
            if s not in todo:
                runner.run(s)
                continue
            here = [by_node[id(n)] for n in runner.stages[s] if id(n) in by_node]
            xtx = stage_hessians(runner, s, set(by_node), ctx.reduce)
            override = {}
            for j, (node, bits, group) in enumerate(here):
                h = xtx[id(node.inputs[0])]
                world = ctx.reducer.world_size
                if world == 1 or self.method != "gptq":
                    qw, entry = self._quantize(module, node, bits, group, h, tokens, report)
                else:  # the solves shared out: rank j % world solves linear j, the rest receive
                    mine = j % world == ctx.reducer.rank
                    solved = self._quantize(module, node, bits, group, h, tokens, report) \
                        if mine else None
                    qw, entry = quantizers.shared_solve(solved, node.inputs[1].shape, bits, group,
                                                        self.symmetric, self._float_zero(bits),
                                                        ctx.reduce)
                    if not mine:  # the solver's warnings, in this rank's report too
                        self._damp_warnings(node, tokens, entry["damp"], report)
                results[id(node)] = qw
                report["layers"][label(node)] = entry
                override[id(node)] = qw.dequantize(dtype)
            if s < max(todo):
                runner.run(s, override=override)
            logger.info("quantize_weights: stage %d/%d done (%s)", s + 1, max(todo) + 1,
                        ", ".join(label(n) for n, _, _ in here))
        return results

    def _quantize(self, module: Module, node: Node, bits: int, group: int, xtx: torch.Tensor,
                  tokens: int, report: dict) -> tuple[quantizers.QuantizedWeight, dict[str, Any]]:
        w = module.weight(node.inputs[1]).to(torch.float64)
        k = w.shape[1]
        fz = self._float_zero(bits)

        def rounded() -> quantizers.QuantizedWeight:
            return quantizers.rtn(w, bits, group, symmetric=self.symmetric, clip=self.clip_search,
                                  float_zero=fz, scale_dtype=self._dtype)
        if self.method == "rtn":
            rtn = rounded()
            return rtn, {"rel_error": quantizers.relative_output_error(w, rtn.dequantize(), xtx)}
        damp = self._damp(k, tokens)
        qw, info = quantizers.gptq(w, 2.0 * xtx / tokens, bits, group, symmetric=self.symmetric,
                              clip=self.clip_search, damp=damp, act_order=self.act_order,
                              block_size=self.block_size, float_zero=fz,
                              scale_dtype=self._dtype)
        rtn = info.rtn if info.rtn is not None else rounded()  # the same result, searched once
        rtn_err = quantizers.relative_output_error(w, rtn.dequantize(), xtx)
        err = quantizers.relative_output_error(w, qw.dequantize(), xtx)
        self._damp_warnings(node, tokens, info.damp, report)
        entry = {"rel_error": err, "rtn_rel_error": rtn_err, "damp": info.damp,
                 "dead_inputs": info.dead_inputs}
        return qw, entry

    def _damp(self, k: int, tokens: int) -> float:
        """The dampening GPTQ starts from: raised when there are fewer tokens than inputs."""
        return max(self.damp, MIN_DAMP_FEW_TOKENS) if tokens < k else self.damp

    def _damp_warnings(self, node: Node, tokens: int, used: float, report: dict) -> None:
        """Warn of a Hessian damped more than asked: for too few tokens, or (`used` above the
        starting dampening) because it was not positive definite."""
        k = node.inputs[1].shape[1]
        damp = self._damp(k, tokens)
        if tokens < k:
            warning = (f"{label(node)}: {tokens} calibration tokens for {k} inputs: the Hessian is "
                       f"singular; dampening raised to {damp}; give more calibration data")
            if warning not in report["warnings"]:
                report["warnings"].append(warning)
        if used != damp:
            report["warnings"].append(f"{label(node)}: Hessian not positive definite; dampening "
                                      f"raised to {used}")

    # -- the rewrite -----------------------------------------------------------------------------
    def _rewrite(self, module: Module, targets: list[tuple[Node, int, int]],
                 results: dict[int, quantizers.QuantizedWeight]) -> tuple[int, dict, set[str]]:
        """Replace each target linear by a qlinear over its packed weights; returns their bytes,
        the packed constants by (float weight, bits, group) and the float weights replaced."""
        g = module.graph
        old_weights, size, made = set(), 0, {}
        for node, bits, group in targets:
            qw = results[id(node)]
            packed, scales, zp = qw.packed()
            base = label(node)
            ins = [node.inputs[0], module.add_weight(base + ".qweight", packed),
                   module.add_weight(base + ".scales", scales),
                   module.add_weight(base + ".qzeros", zp) if zp is not None else None,
                   node.inputs[2] if len(node.inputs) > 2 else None]
            made[(node.inputs[1].const, bits, group)] = ins[1:4]
            while ins[-1] is None:
                ins.pop()
            size += sum(t.numel() * t.element_size() for t in (packed, scales, zp) if t is not None)
            n, k = node.inputs[1].shape
            new = emit(g, "qlinear", ins, {"bits": bits, "group_size": group, "in_features": k,
                                           "out_features": n, "symmetric": self.symmetric},
                       name=node.output.name + ".q", layer=node.layer, role=node.role,
                       origin=self.name, before=node)
            old = node.output
            name = old.name
            old.replace_all_uses_with(new.output)
            g.outputs = [new.output if v is old else v for v in g.outputs]
            old_weights.add(node.inputs[1].const)
            g.remove(node)
            g.rename(new.output, name)
        return size, made, old_weights

    def _tables(self, module: Module) -> list[Node]:
        if self.embeddings == "keep":
            return []
        tables = [n for n in module.graph.find(op="embedding") if n.inputs[1].is_const
                  and module.weight(n.inputs[1]).is_floating_point()]
        for n in tables:
            if self.group_size > n.inputs[1].shape[1] and not self.fit_groups:
                raise PassError(f"pass {self.name!r}: group_size {self.group_size} exceeds the "
                                f"embedding width {n.inputs[1].shape[1]} of {label(n)}; choose "
                                "a smaller group or group_size 0 (per row)")
        return tables

    def _embeddings(self, module: Module, tables: list[Node], made: dict,
                    report: dict) -> tuple[int, int]:
        """Replace each embedding by a qembedding over an int8 or int4 (RTN) copy of its table,
        shared with a tied lm_head quantized the same way; returns (float bytes, quantized
        bytes)."""
        g = module.graph
        before = after = 0
        bits = LM_HEAD[self.embeddings]
        for node in tables:
            table = node.inputs[1]
            t = module.weight(table)
            v, d = t.shape
            group = self.group_size or d
            group = quantizers.fitted_group(group, d) if self.fit_groups else group
            shared = made.get((table.const, bits, group))
            if shared is not None and t.dtype == torch.float32:
                ins = shared
            else:
                qw = quantizers.rtn(t, bits, group, symmetric=self.symmetric,
                                    clip=self.clip_search, float_zero=self._float_zero(bits),
                                    scale_dtype=self._dtype)
                packed, scales, zp = qw.packed()
                base = label(node)
                ins = [module.add_weight(base + ".qweight", packed),
                       module.add_weight(base + ".scales", scales.to(t.dtype)),
                       module.add_weight(base + ".qzeros", zp) if zp is not None else None]
                after += sum(x.numel() * x.element_size() for x in (packed, scales, zp)
                             if x is not None)
            if any(u.op in ("linear", "matmul") for u in table.users()):
                report["warnings"].append(f"{label(node)}: the float table stays for its other "
                                          "readers (a tied lm_head kept in float)")
            if ins is not shared:  # a shared table was counted as the lm_head's weight
                before += t.numel() * t.element_size()
            ins = [node.inputs[0], *ins]
            while ins[-1] is None:
                ins.pop()
            new = emit(g, "qembedding", ins, {"bits": bits, "group_size": group, "embedding_dim": d,
                                              "num_embeddings": v, "symmetric": self.symmetric,
                                              "scale": node.attrs["scale"]},
                       name=node.output.name + ".q", layer=node.layer, role=node.role,
                       origin=self.name, before=node)
            old, name = node.output, node.output.name
            old.replace_all_uses_with(new.output)
            g.remove(node)
            g.rename(new.output, name)
            report["layers"][label(node)] = {"shared_with_lm_head": shared is not None
                                             and t.dtype == torch.float32}
        return before, after
