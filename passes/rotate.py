"""Rotate the residual stream, the attention values and the MLP's down-projection input with
(randomised) Hadamard matrices: QuaRot's rotations (Ashkboos et al., "QuaRot: Outlier-Free 4-Bit
Inference in Rotated LLMs", 2024), in SpinQuant's naming R1..R4 (Liu et al., "SpinQuant", 2024).

An orthogonal Q leaves x @ W.T unchanged when x becomes x Q and W becomes W Q, so a rotation can be
folded into weights; a Hadamard Q spreads an outlier channel over all channels, which is what makes
the following quantization work. Conventions: weights are [out, in] and y = x W^T + b, so a linear
that reads a rotated x takes W' = W Q (input side) and one whose output must come out rotated takes
W' = Q^T W, b' = b Q (output side).

- R1, the residual stream, Q1 = random_hadamard(hidden, seed) = diag(s) H: the embedding table's
  rows become E Q1; every linear reading the stream (q/k/v, gate/up, lm_head) takes Q1 on its input
  side and every linear writing it (o_proj, down_proj) on its output side. The stream's readers must
  be weightless RMS norms, which commute with Q1 (rms(x Q) = rms(x)): run fold_norms first. A tied
  lm_head reads the same E Q1 as the embedding, so it stays tied. A dense linear patch on the
  stream (x @ P after prune_layers + fuse_patch "dense") becomes Q1^T P Q1. A signed LinearPatch
  (estimate_patch basis "r1": P = Q diag(s) Q^T as channel_scale(sigma) -> hadamard ->
  channel_scale(s) -> hadamard -> channel_scale(sigma)) whose Q is exactly Q1 (same order, a full
  Hadamard, stored sigma equal to random_signs(hidden, seed)) becomes Q1^T P Q1 = diag(s): the
  chain is replaced by one channel_scale(s) (role "patch", origin "rotate"). Always exact in
  exact arithmetic, and it adds no rounding of its own whatever the dtype (s is reused as stored,
  nothing is fitted or multiplied out); a float64 test checks the logits to 1e-12. It is recorded
  in the report and in config.extra["rotation"]["r1"]["patches_to_channel_scale"]. Any other factored patch (the plain-H form, or signs of another
  seed) is refused, naming fuse_patch. Sandwich post-norms
  (Gemma 2/3) sit between o_proj/down_proj and the stream: rmsnorm(o Q) = rmsnorm(o) Q, but a
  per-channel gamma does not commute with Q. A post-norm of uniform scale passes (its linear
  takes Q on its output side); one with a per-channel gamma is, with post_norms = "online" (the
  default), rotated after it: y Q1 = (y * s) H, so the norm's gamma becomes (offset + w) * s
  (offset 0) and an online `hadamard` node (role "<norm role>.hadamard") follows it, while its
  linear stays unrotated on its output side. Exact, and R1 then covers the whole network (every
  reader of the stream, lm_head included, takes Q1) at the cost of one Hadamard of the hidden
  size per post-norm and token; absorb_post_norm first removes the norms it can absorb, and with
  them their online transforms. post_norms = "refuse" raises instead.
- R2, attention values, per head: Q2 = random_hadamard(head_dim, seed + 1) on each kv head's rows
  of v_proj (output side) and on each query head's columns of o_proj (input side). The KV cache
  then holds rotated values, which is the point (KV-cache quantization), and the logits do not move.
- R3 (off by default), queries and keys after RoPE: an online `hadamard` node per head on q and k
  before attention (q H . (k H)^T = q k^T); no weight changes, the cache holds rotated keys.
- R4, the down-projection input: an online `hadamard` node of the intermediate size before
  down_proj (role "mlp.down_proj.hadamard"), and W' = W H, so (x H)(W H)^T = x W^T. H carries no
  random signs: it is what the op computes at run time. When the size has no Hadamard
  construction, allow_block=True uses the block-diagonal I (x) H_b with b = largest_block(size),
  which spreads outliers only within blocks of b channels (the report says so); otherwise the pass
  raises, listing the supported orders.

Exactness: exact in exact arithmetic (orthogonal matrices folded into weights, transforms inserted
in inverse pairs). Every product is computed in float64 as small Kronecker-factor matmuls (no
n x n matrix is formed; `apply_hadamard` in rotation.py), a chunk of rows at a time, and cast back
to the weight's dtype once, so float32 weights only see rounding.

Idempotence: what was applied is recorded in config.extra["rotation"] (sizes, factors, seeds,
blocks), and a rotation found there (or, for R3/R4, whose hadamard nodes are present) is not
applied again: a second run reports modified=False.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch

from splice.ir.core import IRError, Module, Node, Value, emit
from splice.ir.hadamard import factorize, largest_block, supported_bases
from .infra.base import PassBase, PassContext, PassError, PassResult
from .estimate_patch import Patch
from .fuse_patch import r1_basis_patches, to_channel_scale
from .infra.registry import register_pass
from .numerics.rotation import _Rotation, random_signs

logger = logging.getLogger(__name__)

STREAM_NORMS = ("attn_norm", "mlp_norm", "final_norm")
R4_ROLE = "mlp.down_proj.hadamard"
R3_ROLES = ("attn.q_hadamard", "attn.k_hadamard")
POST_NORMS = ("online", "refuse")
BLOCK_NOTE = ("a block-diagonal Hadamard spreads outliers only within each block of {b} "
              "channels, less than a full one of order {n}")


def _label(node: Node) -> str:
    if node.layer is not None:
        return f"layers.{node.layer}.{node.role or node.op}"
    return node.role or node.output.name


def _hadamard_plan(n: int, allow_block: bool, what: str) -> int:
    """The block size for a Hadamard of order n: 0 for a full one, else largest_block(n)."""
    if factorize(n) is not None:
        return 0
    hint = (f"supported orders are powers of two and b * 2^k for the base orders "
            f"b in {supported_bases()} (orders 2 mod 4 and odd orders above 2 have none)")
    if not allow_block:
        raise PassError(f"rotate: {what} is {n}, which has no Hadamard matrix; {hint}. Set "
                        "allow_block=True for a block-diagonal Hadamard, or turn this rotation off")
    try:
        return largest_block(n)
    except IRError:
        raise PassError(f"rotate: {what} is {n}, and not even a block-diagonal Hadamard exists "
                        f"(no Hadamard order above 1 divides it); {hint}") from None


# -- the residual stream (R1) --------------------------------------------------------------------

@dataclasses.dataclass
class _Stream:
    embeddings: list[Node]
    readers: list[Node]   # linears taking Q on their input side
    writers: list[Node]   # linears taking Q on their output side
    through: list[Node]   # stream-to-stream matmuls (a dense linear patch): both sides
    collapse: list[Patch]  # signed LinearPatches in R1's basis: become channel_scale(s)
    online: list[Node] = dataclasses.field(default_factory=list)  # post-norms rotated after them


def _gamma_uniform(module: Module, norm: Node) -> bool:
    w = norm.inputs[1] if len(norm.inputs) > 1 else None
    if w is None:
        return True
    gamma = module.weight(w).to(torch.float64) + float(norm.attrs["offset"])
    return bool(torch.all(gamma == gamma[0]))


def _writer(module: Module, value: Value, add: Node, online: bool = False) -> Node:
    """The linear whose output (through an optional uniform-scale post-norm) `add` writes into
    the stream; with `online`, a post-norm with a per-channel scale is returned itself (it is
    rotated after, online)."""
    consumer, p = add, value.producer
    if p is not None and p.op == "rms_norm" and not p.attrs["group"]:
        nw = p.inputs[1] if len(p.inputs) > 1 else None
        if online and not _gamma_uniform(module, p) and (nw is None or nw.is_const):
            if value.users() != [add] or len(value.uses) != 1:
                raise PassError(f"rotate (r1): the output of {_label(p)} feeds more than the "
                                f"residual add {_label(add)}")
            return p
        if not _gamma_uniform(module, p):
            raise PassError(
                f"rotate (r1): {_label(p)} is a post-norm with a per-channel scale between "
                f"{_label(p.inputs[0].producer) if p.inputs[0].producer else 'its input'} and the "
                "residual stream; a rotated stream does not commute with it. Set post_norms = "
                "\"online\" (a Hadamard after each such norm), put absorb_post_norm before rotate "
                "to remove the post-norms, or set r1=False (r2, r3 and r4 still apply)")
        if value.users() != [add]:
            raise PassError(f"rotate (r1): the output of {_label(p)} feeds more than the residual "
                            f"add {_label(add)}")
        consumer, value, p = p, p.inputs[0], p.inputs[0].producer
    if p is None or p.op != "linear" or not p.inputs[1].is_const:
        what = "a graph input or constant" if p is None else f"{p.op} {_label(p)}"
        raise PassError(f"rotate (r1): the residual add {_label(add)} adds %{value.name}, made "
                        f"by {what}; R1 needs the stream written by linears with constant weights "
                        "(o_proj, down_proj), optionally through an rms_norm of uniform scale")
    if value.users() != [consumer]:
        raise PassError(f"rotate (r1): the output of {_label(p)} is used by more than "
                        f"{_label(consumer)}, so it cannot come out rotated")
    return p


def residual_stream(module: Module, collapsible: dict[int, Patch] | None = None,
                    refused: dict[int, str] | None = None, online: bool = False) -> _Stream:
    """Trace the stream from the embedding through the residual adds, classifying every node that
    touches it; anything R1 cannot rotate raises a PassError naming the node. `collapsible` maps
    the first node of each signed patch in R1's basis to it (the stream goes on from its output);
    `refused` gives, by first node, why another patch cannot pass (added to the error)."""
    collapsible, refused = collapsible or {}, refused or {}
    g = module.graph
    embeds = g.find(op="embedding")
    if len(embeds) != 1:
        raise PassError(f"rotate (r1): the residual stream starts at one embedding node; this "
                        f"graph has {len(embeds)}")
    s = _Stream(embeddings=embeds, readers=[], writers=[], through=[], collapse=[])
    stream = {id(embeds[0].output)}
    reached: set[int] = set()
    for node in g.nodes:
        ins = [i for i, v in enumerate(node.inputs) if v is not None and id(v) in stream]
        if not ins:
            continue
        reached.add(id(node))
        if node.op == "add":
            if len(ins) == 1:
                w = _writer(module, node.inputs[1 - ins[0]], node, online)
                (s.online if w.op == "rms_norm" else s.writers).append(w)
            stream.add(id(node.output))
        elif node.op == "rms_norm" and ins == [0]:
            if len(node.inputs) > 1 and node.inputs[1] is not None:
                raise PassError(f"rotate (r1): {_label(node)} reads the residual stream and still "
                                "carries a weight (gamma), which does not commute with a rotation; "
                                "put fold_norms before rotate (where fold_norms left it in place, "
                                "as on Gemma 3, add rotate_inputs between them, or set r1 = false)")
            if node.attrs["group"]:
                raise PassError(f"rotate (r1): {_label(node)} normalises groups of "
                                f"{node.attrs['group']} channels of the residual stream, which a "
                                "rotation does not commute with; R1 accepts whole-vector rms_norm")
            for user, index in node.output.uses:
                if user.op != "linear" or index != 0:
                    raise PassError(f"rotate (r1): the normalised stream {_label(node)} feeds "
                                    f"{user.op} {_label(user)}; R1 accepts only linears reading it")
                reached.add(id(user))
                s.readers.append(user)
        elif node.op == "linear" and ins == [0]:
            s.readers.append(node)
        elif node.op == "matmul" and ins == [0] and node.inputs[1].is_const \
                and node.inputs[1].shape[0] == node.inputs[1].shape[1]:
            s.through.append(node)  # a dense LinearPatch x @ P: the stream continues rotated
            stream.add(id(node.output))
        elif id(node) in collapsible and ins == [0]:
            s.collapse.append(collapsible[id(node)])  # its inner nodes read no stream value
            stream.add(id(collapsible[id(node)].y))
        elif node.role == "patch":
            why = f" ({refused[id(node)]})" if id(node) in refused else ""
            raise PassError(f"rotate (r1): the linear patch {_label(node)} ({node.op}) is in its "
                            "factored form, which a rotated stream cannot pass through; put "
                            "fuse_patch with strategy = \"dense\" (or \"fold\") before rotate"
                            + why)
        else:
            raise PassError(f"rotate (r1): {node.op} {_label(node)} reads the residual stream; R1 "
                            "handles a stream updated by add and read by weightless rms_norm, "
                            "linear and square constant matmuls (dense linear patches)")
    if any(id(v) in stream for v in g.outputs):
        raise PassError("rotate (r1): the residual stream itself is a graph output; it would "
                        "come out rotated")
    missed = [_label(n) for n in g.nodes if id(n) not in reached
              and ((n.op == "rms_norm" and n.role in STREAM_NORMS) or n.role == "lm_head")]
    if missed:
        raise PassError(f"rotate (r1): could not trace the residual stream to {', '.join(missed)}; "
                        "it must run embedding -> add ... -> final_norm -> lm_head")
    return s


# -- the pass ------------------------------------------------------------------------------------

Transform = Callable[[torch.Tensor], torch.Tensor]


class _WeightPlan:
    """Transforms per weight, checked to cover every use of that weight exactly once per kind."""

    def __init__(self, module: Module):
        self.module = module
        self.steps: dict[str, list[tuple[str, Transform]]] = {}
        self.uses: dict[str, dict[tuple[int, int], str]] = {}

    def add(self, node: Node, index: int, kind: str, fn: Transform) -> None:
        v = node.inputs[index]
        if v is None or not v.is_const:
            raise PassError(f"rotate: {_label(node)} input {index} must be a constant weight")
        if not self.module.weight(v).is_floating_point():
            raise PassError(f"rotate: {_label(node)} weight %{v.name} is not floating point")
        steps = self.steps.setdefault(v.const, [])
        rot = kind.split(".")[0]
        same = [k for k, _ in steps if k.split(".")[0] == rot]
        if same and same[0] != kind:
            raise PassError(f"rotate ({rot}): weight %{v.name} is shared by nodes that need "
                            f"different rotations ({same[0]} and {kind})")
        if not same:
            steps.append((kind, fn))
        self.uses.setdefault(v.const, {})[(id(node), index)] = kind

    def apply(self) -> list[str]:
        g = self.module.graph
        for name in self.steps:
            v = g.consts[name]
            planned = self.uses[name]
            loose = [_label(n) for n, i in v.uses if (id(n), i) not in planned]
            if loose:
                raise PassError(f"rotate: weight %{name} is also read by {', '.join(loose)}, "
                                "which this rotation does not cover")
        for name, steps in self.steps.items():
            t = self.module.weights[name]
            x = t.to(torch.float64)
            for _, fn in steps:
                x = fn(x)
            self.module.set_weight(g.consts[name], x.to(t.dtype).contiguous())
        return sorted(self.steps)


@register_pass
@dataclasses.dataclass(frozen=True)
class RotatePass(PassBase):
    """Fold Hadamard rotations into the weights (R1 residual stream, R2 attention values) and
    insert online Hadamard transforms (R4 before down_proj, R3 on q and k), QuaRot-style.

    Settings: r1, r2, r4 (on) and r3 (off) choose the rotations; `seed` draws R1's signs (R2 uses
    seed + 1); `allow_block` permits a block-diagonal Hadamard where a size has no construction;
    `post_norms` "online" rotates the stream after each post-norm with a per-channel scale (an
    online Hadamard), "refuse" makes R1 refuse them.
    """

    name = "rotate"
    exact = True

    r1: bool = True
    r2: bool = True
    r4: bool = True
    r3: bool = False
    seed: int = 0
    allow_block: bool = False
    post_norms: str = "online"

    def __post_init__(self) -> None:
        if self.post_norms not in POST_NORMS:
            raise PassError(f"pass 'rotate': post_norms {self.post_norms!r}; accepted: "
                            f"{', '.join(POST_NORMS)}")

    def call(self, module: Module, ctx: PassContext) -> PassResult:
        g = module.graph
        done = dict(module.config.extra.get("rotation", {}))
        if any(n.op == "hadamard" and n.role == R4_ROLE for n in g.nodes):
            done.setdefault("r4", {"found": "hadamard nodes before down_proj"})
        if any(n.op == "hadamard" and n.role in R3_ROLES for n in g.nodes):
            done.setdefault("r3", {"found": "hadamard nodes on q and k"})
        every = ("r1", "r2", "r3", "r4")
        wanted = [r for r in every if getattr(self, r)]
        todo = [r for r in wanted if r not in done]
        report: dict[str, Any] = {"applied": [], "already_applied": [r for r in wanted if r in done],
                                  "off": [r for r in every if r not in wanted], "notes": []}
        if not todo:
            return PassResult(module, False, report)
        plan = _WeightPlan(module)
        records: dict[str, dict[str, Any]] = {}
        inserts: list[Callable[[], None]] = []
        if "r1" in todo:
            records["r1"] = self._plan_r1(module, plan, inserts, report)
        if "r2" in todo:
            records["r2"] = self._plan_r2(module, plan, report)
        if "r3" in todo:
            records["r3"] = self._plan_r3(module, inserts, report)
        if "r4" in todo:
            records["r4"] = self._plan_r4(module, plan, inserts, report)
        report["weights_rotated"] = len(plan.apply())
        for insert in inserts:
            insert()
        applied = [r for r in ("r1", "r2", "r3", "r4") if r in records]
        report["applied"] = applied
        report.update(records)
        rotation = {**module.config.extra.get("rotation", {}), **records}
        module.config = module.config.replace(extra={**module.config.extra, "rotation": rotation})
        logger.info("rotate: applied %s", ", ".join(applied))
        return PassResult(module, bool(applied), report)

    # -- R1 --------------------------------------------------------------------------------------
    def _plan_r1(self, module: Module, plan: _WeightPlan, inserts: list,
                 report: dict) -> dict[str, Any]:
        g = module.graph
        embeds = g.find(op="embedding")
        n = int(embeds[0].inputs[1].shape[-1]) if len(embeds) == 1 else 0
        block = _hadamard_plan(n, self.allow_block, "the hidden size (r1)") if n else 0
        signs = random_signs(n, self.seed)
        collapsible, refused = r1_basis_patches(module, n, block, signs, self.seed)
        s = residual_stream(module, collapsible, refused, online=self.post_norms == "online")
        q = _Rotation(n, block, signs)
        self._note_block(report, "r1", n, block)
        plan.add(s.embeddings[0], 1, "r1.in", q.input_side)
        for node in s.readers:
            plan.add(node, 1, "r1.in", q.input_side)
        for node in s.writers:
            plan.add(node, 1, "r1.out", q.output_side)
        for node in s.through:  # x @ P with P [in, out]: P' = Q^T P Q
            plan.add(node, 1, "r1.both", lambda p: q.output_side(q.input_side(p)))
        for node in s.writers:
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                plan.add(node, 2, "r1.bias", q.output_side)
        for p in s.collapse:
            inserts.append(lambda p=p: to_channel_scale(module, p, self.name))
        for norm in s.online:  # gamma' = (offset + w) * s, then x @ H online: (y * s) H = y Q1
            plan.add(norm, 1, "r1.post_norm",
                     lambda w, off=float(norm.attrs["offset"]): (w + off) * signs)
            inserts.append(lambda norm=norm: self._rotate_after(module, norm, n, block))
        collapsed = [p.y.name for p in s.collapse]
        if collapsed:
            logger.info("rotate: r1 turns signed patch(es) %s into channel scales",
                        ", ".join(collapsed))
        if s.online:
            logger.info("rotate: r1 rotates the stream online after %d post-norm(s)",
                        len(s.online))
        return {**q.record(), "seed": self.seed, "readers": len(s.readers),
                "writers": len(s.writers),
                **({"online_post_norms": [_label(m) for m in s.online]} if s.online else {}),
                **({"patches_to_channel_scale": collapsed} if collapsed else {})}

    def _rotate_after(self, module: Module, norm: Node, n: int, block: int) -> None:
        """A hadamard node after the post-norm `norm`, whose gamma already carries R1's signs."""
        norm.attrs["offset"] = 0.0
        hn = emit(module.graph, "hadamard", [norm.output], {"size": n, "block": block},
                  layer=norm.layer, role=f"{norm.role}.hadamard", origin=self.name, after=norm)
        for user, index in list(norm.output.uses):
            if user is not hn:
                user.replace_input(index, hn.output)

    # -- R2 --------------------------------------------------------------------------------------
    def _plan_r2(self, module: Module, plan: _WeightPlan, report: dict) -> dict[str, Any]:
        attns = module.graph.find(op="attention")
        if not attns:
            raise PassError("rotate (r2): the graph has no attention node; set r2=False")
        record: dict[str, Any] = {}
        for attn in attns:
            a = attn.attrs
            hd, h, kv = a["head_dim"], a["num_heads"], a["num_kv_heads"]
            v = attn.inputs[2]
            vp = v.producer
            if vp is None or vp.op != "linear" or v.users() != [attn] or len(v.uses) != 1:
                raise PassError(f"rotate (r2): {_label(attn)}'s values must come straight from a "
                                "linear (v_proj) used only there; set r2=False for this graph")
            y = attn.outputs[0]
            users = y.users()
            if len(users) != 1 or users[0].op != "linear" or y.uses[0][1] != 0 or len(y.uses) != 1:
                raise PassError(f"rotate (r2): {_label(attn)}'s output must feed one linear "
                                "(o_proj) and nothing else; set r2=False for this graph")
            op = users[0]
            block = _hadamard_plan(hd, self.allow_block, "the head dim (r2)")
            signs = random_signs(hd, self.seed + 1)
            qv = _Rotation(hd, block, signs, group=kv)
            qo = _Rotation(hd, block, signs, group=h)
            plan.add(vp, 1, "r2.out", qv.output_side)
            if len(vp.inputs) > 2 and vp.inputs[2] is not None:
                plan.add(vp, 2, "r2.bias", qv.output_side)
            plan.add(op, 1, "r2.in", qo.input_side)
            self._note_block(report, "r2", hd, block)
            record = {**_Rotation(hd, block, None).record(), "heads": h, "kv_heads": kv,
                      "seed": self.seed + 1, "layers": len(attns)}
        return record

    # -- R3 --------------------------------------------------------------------------------------
    def _plan_r3(self, module: Module, inserts: list, report: dict) -> dict[str, Any]:
        g = module.graph
        attns = g.find(op="attention")
        if not attns:
            raise PassError("rotate (r3): the graph has no attention node; set r3=False")
        record: dict[str, Any] = {}
        for attn in attns:
            a = attn.attrs
            hd = a["head_dim"]
            block = _hadamard_plan(hd, self.allow_block, "the head dim (r3)")
            self._note_block(report, "r3", hd, block)
            for index, heads, role in ((0, a["num_heads"], R3_ROLES[0]),
                                       (1, a["num_kv_heads"], R3_ROLES[1])):
                attrs = {"size": hd, "block": block, "group": heads}

                def insert(attn=attn, index=index, attrs=attrs, role=role) -> None:
                    x = attn.inputs[index]
                    hn = emit(g, "hadamard", [x], attrs, layer=attn.layer, role=role,
                              origin=self.name, before=attn)
                    attn.replace_input(index, hn.output)
                inserts.append(insert)
            record = {**_Rotation(hd, block, None).record(), "layers": len(attns)}
        return record

    # -- R4 --------------------------------------------------------------------------------------
    def _plan_r4(self, module: Module, plan: _WeightPlan, inserts: list,
                 report: dict) -> dict[str, Any]:
        g = module.graph
        downs = g.find(op="linear", role="mlp.down_proj")
        if not downs:
            raise PassError("rotate (r4): the graph has no linear with role 'mlp.down_proj'; "
                            "set r4=False")
        sizes: dict[int, dict[str, Any]] = {}
        for down in downs:
            n = down.inputs[1].shape[1] if down.inputs[1] is not None else None
            if not isinstance(n, int):
                raise PassError(f"rotate (r4): {_label(down)} has no constant weight")
            block = _hadamard_plan(n, self.allow_block, f"the intermediate size of "
                                   f"{_label(down)} (r4)")
            self._note_block(report, "r4", n, block)
            rot = _Rotation(n, block, None)
            plan.add(down, 1, "r4.in", rot.input_side)
            sizes[n] = rot.record()

            def insert(down=down, attrs={"size": n, "block": block}) -> None:
                hn = emit(g, "hadamard", [down.inputs[0]], attrs, layer=down.layer, role=R4_ROLE,
                          origin=self.name, before=down)
                down.replace_input(0, hn.output)
            inserts.append(insert)
        record = next(iter(sizes.values())) if len(sizes) == 1 else {"sizes": list(sizes.values())}
        return {**record, "layers": len(downs)}

    @staticmethod
    def _note_block(report: dict, rot: str, n: int, block: int) -> None:
        if block:
            note = f"{rot}: order {n} has no Hadamard matrix; " + BLOCK_NOTE.format(b=block, n=n)
            if note not in report["notes"]:
                report["notes"].append(note)
                logger.warning("rotate: %s", note)
