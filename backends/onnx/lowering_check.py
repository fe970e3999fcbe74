"""Check a lowering value by value: which IR value does ONNX Runtime first get wrong, and which
node (op, role, layer, origin) made it.

The ONNX lowering names the ONNX value computing each IR value after it (LoweringContext.bind:
every IR node output becomes an ONNX value of the same name, through an Identity when a rule
returns a value that already has a name). So exposing every intermediate needs no new option in
the lowering: the lowered graph's outputs are extended with those values, by name, and a lost or
renamed one is reported, not skipped. The model runs in ONNX Runtime with graph optimisations
off (a runtime fusion must not hide or cause the difference), the reference interpreter runs the
same feeds with every value captured (float64 by default: the truth, not another float32 path),
and the values are compared in the graph's topological order. The first one whose largest
difference exceeds atol + rtol · max |reference| is the first wrong lowering; everything after
it may only be fallout.

The tolerance is per tensor, relative to the tensor's largest magnitude, not element by element:
float32 rounding in a matmul scales with the size of the terms summed, not with the (possibly
tiny) result, so an elementwise test flags correct lowerings wherever massive activations sit
beside small values (SmolLM2's layer-29 down_proj: 6e-4 off on values of 5800, 1e-7 relative).
A wrong rule moves a value by a sizeable fraction of its scale (silu lowered as sigmoid: 0.7).
Measured float32 lowering error on SmolLM2-135M at 64 tokens: at most 2.7e-6 of a tensor's scale,
so the default rtol of 1e-4 leaves a margin of ~40; loosen it for long contexts.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from splice.errors import InputError
from splice.ir.core import Module, Node
from splice.ir.interpreter import Interpreter, default_feeds

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ValueCheck:
    """How one IR value compares: the node that made it and the largest differences."""

    name: str
    op: str
    role: str
    layer: int | None
    origin: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    ok: bool

    def describe(self) -> str:
        layer = "no layer" if self.layer is None else f"layer {self.layer}"
        return (f"%{self.name} = {self.op} (role {self.role or '-'}, {layer}, made by "
                f"{self.origin or '?'}): max |Δ| {self.max_abs:.3g}, {self.max_rel:.3g} of its max "
                "|value|")


@dataclasses.dataclass
class LoweringCheckResult:
    """The comparison of every IR value: `first` is the first that diverges (None when all
    agree); `values` lists every compared value in topological order."""

    ok: bool
    first: ValueCheck | None
    values: list[ValueCheck]
    atol: float
    rtol: float
    feeds: dict[str, list[int]]

    def summary(self) -> str:
        if self.ok:
            return (f"lowering check: all {len(self.values)} IR values agree with the reference "
                    f"(atol {self.atol:g}, rtol {self.rtol:g})")
        return f"lowering check: first divergence at {self.first.describe()}"

    def to_json(self) -> dict[str, Any]:
        def one(v: ValueCheck) -> dict[str, Any]:
            return {**dataclasses.asdict(v), "shape": list(v.shape), "describe": v.describe()}

        return {"ok": self.ok, "first": one(self.first) if self.first else None,
                "values": [one(v) for v in self.values], "checked": len(self.values),
                "atol": self.atol, "rtol": self.rtol, "feeds": self.feeds,
                "summary": self.summary()}


def _expose_all(model: Any, module: Module) -> None:
    """Append every IR node output's ONNX value (same name) to the ONNX graph's outputs."""
    graph = model.graph
    by_name = {}
    for node in graph:
        for out in node.outputs:
            if out.name:
                by_name[out.name] = out
    present = {v.name for v in graph.outputs}
    missing = []
    for node in module.graph.nodes:
        for v in node.outputs:
            if v.name in present:
                continue
            ov = by_name.get(v.name)
            if ov is None:
                missing.append(v.name)
                continue
            graph.outputs.append(ov)
            present.add(v.name)
    if missing:
        raise InputError(f"the lowered graph has no value named after IR value(s) "
                         f"{', '.join('%' + m for m in missing[:5])}: a rule or the lowering lost "
                         "the IR's names, so they cannot be compared")


def _session(model: Any, threads: int):
    import onnxruntime as ort

    from splice.backends.onnx.lower import save

    tmp = tempfile.TemporaryDirectory(prefix="splice-lowering-check-")
    path = save(model, tmp.name, check=False)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess, tmp


def _compare(name: str, node: Node, got: np.ndarray, ref: torch.Tensor, atol: float,
             rtol: float) -> ValueCheck:
    r = ref.detach().cpu()
    meta = dict(name=name, op=node.op, role=node.role, layer=node.layer, origin=node.origin,
                shape=tuple(r.shape))
    if tuple(got.shape) != tuple(r.shape):
        return ValueCheck(**meta, max_abs=float("inf"), max_rel=float("inf"), ok=False)
    if not r.is_floating_point():
        same = bool(np.array_equal(got, r.numpy()))
        return ValueCheck(**meta, max_abs=0.0 if same else float("inf"),
                          max_rel=0.0 if same else float("inf"), ok=same)
    ref64 = r.to(torch.float64).numpy()
    got64 = got.astype(np.float64)
    if got64.size == 0:
        return ValueCheck(**meta, max_abs=0.0, max_rel=0.0, ok=True)
    both_nan = np.isnan(got64) & np.isnan(ref64)
    same_inf = np.isinf(ref64) & (got64 == ref64)
    diff = np.where(both_nan | same_inf, 0.0, np.abs(got64 - ref64))
    diff = np.nan_to_num(diff, nan=np.inf)
    scale = float(np.where(np.isfinite(ref64), np.abs(ref64), 0.0).max())
    max_abs = float(diff.max())
    ok = max_abs <= atol + rtol * scale
    max_rel = max_abs / max(scale, 1e-30)
    return ValueCheck(**meta, max_abs=max_abs, max_rel=max_rel, ok=ok)


def check_lowering(module: Module, ids: Any, *, rules: Mapping[str, Any] | None = None,
                   atol: float = 1e-6, rtol: float = 1e-4,
                   reference_dtype: torch.dtype = torch.float64,
                   threads: int = 1) -> LoweringCheckResult:
    """Lower `module` (with `rules`, default the standard table) to ONNX with every IR value
    exposed, run ONNX Runtime (optimisations off) and the reference interpreter on the token ids
    `ids` ([batch, seq] or [seq], empty KV cache) and compare every value in topological order:
    a value passes when max |Δ| ≤ atol + rtol · max |reference| (see the module docstring).
    """
    from splice.backends.onnx.lower import lower

    for key, tol in (("atol", atol), ("rtol", rtol)):
        if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol >= 0:
            raise InputError(f"check_lowering: {key} must be a number >= 0, got {tol!r}")
    ids = torch.as_tensor(ids, dtype=torch.int64)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.numel() == 0:
        raise InputError(f"check_lowering: ids must be token ids [batch, seq], got shape "
                         f"{list(ids.shape)}")
    if int(ids.max()) >= module.config.vocab_size or int(ids.min()) < 0:
        raise InputError(f"check_lowering: token ids must lie in 0..{module.config.vocab_size - 1}")
    model = lower(module, rules=rules)
    _expose_all(model, module)
    sess, tmp = _session(model, threads)
    try:
        feeds32 = default_feeds(module, ids, None, torch.float32)
        ort_feeds = {k: v.numpy() for k, v in feeds32.items()}
        names = [o.name for o in sess.get_outputs()]
        got = dict(zip(names, sess.run(names, ort_feeds)))
    finally:
        tmp.cleanup()
    ref = Interpreter(module, reference_dtype).run(
        default_feeds(module, ids, None, reference_dtype), capture=True)
    values: list[ValueCheck] = []
    first = None
    for node in module.graph.nodes:
        for v in node.outputs:
            check = _compare(v.name, node, got[v.name], ref[v.name], atol, rtol)
            values.append(check)
            if first is None and not check.ok:
                first = check
    result = LoweringCheckResult(first is None, first, values, float(atol), float(rtol),
                                 {k: list(v.shape) for k, v in ort_feeds.items()})
    log.info("%s", result.summary())
    return result
