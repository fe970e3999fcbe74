"""Reference interpreter: runs a Module's graph with the ops' torch reference implementations.

It computes in the dtype asked for (float64 for the numeric checks, float32 to match the source
model), starts from an empty KV cache or a given one, and can hand back any intermediate value,
which is what calibration and the lowering checks read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .core import IRError, Module, Value
from .opdef import get_op


def default_feeds(module: Module, input_ids: torch.Tensor, past: dict[str, torch.Tensor] | None,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Graph inputs for a batch of ids: positions continue after the cache, an empty cache when
    `past` is None."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    b, s = input_ids.shape
    feeds: dict[str, torch.Tensor] = {}
    past_len = 0
    if past:
        past_len = next(iter(past.values())).shape[2]
    for v in module.graph.inputs:
        if v.name == "input_ids":
            feeds[v.name] = input_ids.to(torch.int64)
        elif v.name == "position_ids":
            feeds[v.name] = (torch.arange(s, dtype=torch.int64) + past_len).expand(b, s)
        elif v.name.startswith("past."):
            if past is not None and v.name in past:
                feeds[v.name] = past[v.name].to(dtype)
            else:
                shape = [b if d == "batch" else 0 if d == "past" else d for d in v.shape]
                if not all(isinstance(d, int) for d in shape):
                    raise IRError(f"cannot make an empty cache for %{v.name} {list(v.shape)}")
                feeds[v.name] = torch.zeros(shape, dtype=dtype)
        else:
            raise IRError(f"no default feed for graph input %{v.name}")
    return feeds


class Interpreter:
    """Run a module. `capture` names values to keep (or is True for all); `hook(node, outs)` may
    observe or replace a node's outputs (calibration statistics, fault injection); `compute(node,
    args)` may compute a node in place of its reference (None: the reference), and `grad` keeps
    autograd on (training through the graph)."""

    def __init__(self, module: Module, dtype: torch.dtype = torch.float32):
        self.module = module
        self.dtype = dtype
        self._weights: dict[str, torch.Tensor] = {}

    def weight(self, v: Value) -> torch.Tensor:
        """The constant's tensor in the run's dtype, kept for later runs; except a weight still
        on disk (a lazy module, frontend/lazy.py), which is read at each node that uses it and
        dropped after, so a run over a model larger than memory holds one weight at a time."""
        t = self._weights.get(v.name)
        if t is None:
            t = self.module.weight(v)
            if t.is_floating_point():
                t = t.to(self.dtype)
            on_disk = getattr(self.module.weights, "ref", None)
            if not (callable(on_disk) and on_disk(v.const) is not None):
                self._weights[v.name] = t
        return t

    def run(self, feeds: dict[str, torch.Tensor], *, capture: Iterable[str] | bool = (),
            hook: Callable | None = None, outputs: Iterable[str] | None = None,
            compute: Callable | None = None, grad: bool = False) -> dict[str, torch.Tensor]:
        """The graph outputs (only those named in `outputs`, when given) and the captured
        values. Every other value is dropped after its last use, so a calibration run that
        needs only the logits, or only captured values, does not keep each layer's present
        KV cache to the end."""
        g = self.module.graph
        env: dict[int, torch.Tensor] = {}
        for v in g.inputs:
            if v.name not in feeds:
                raise IRError(f"missing feed for graph input %{v.name}")
            t = feeds[v.name]
            env[id(v)] = t.to(self.dtype) if t.is_floating_point() else t
        keep_all = capture is True
        keep = set() if keep_all or capture is False else set(capture)
        captured: dict[str, torch.Tensor] = {}
        # free each value after its last use so a 30-layer float64 run stays small
        last_use: dict[int, int] = {}
        for pos, node in enumerate(g.nodes):
            for v in node.inputs:
                if v is not None:
                    last_use[id(v)] = pos
        names = None if outputs is None else set(outputs)
        wanted = {id(v) for v in g.outputs if names is None or v.name in names}
        with torch.set_grad_enabled(grad):
            for pos, node in enumerate(g.nodes):
                args = []
                for v in node.inputs:
                    if v is None:
                        args.append(None)
                    elif v.is_const:
                        args.append(self.weight(v))
                    else:
                        args.append(env[id(v)])
                outs = compute(node, args) if compute is not None else None
                if outs is None:
                    outs = get_op(node.op).reference(node.attrs, *args)
                if hook is not None:
                    replaced = hook(node, outs)
                    if replaced is not None:
                        outs = tuple(replaced)
                for v, t in zip(node.outputs, outs):
                    if id(v) in last_use or id(v) in wanted:
                        env[id(v)] = t
                    if keep_all or v.name in keep:
                        captured[v.name] = t
                for v in node.inputs:
                    if v is not None and not v.is_const and last_use.get(id(v)) == pos \
                            and id(v) not in wanted:
                        env.pop(id(v), None)
        result = {v.name: env[id(v)] for v in g.outputs if id(v) in wanted}
        result.update(captured)
        return result


def run_logits(module: Module, input_ids: torch.Tensor, dtype: torch.dtype = torch.float32,
               past: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Logits and present KV for `input_ids` [batch, seq] after an optional cache."""
    interp = Interpreter(module, dtype)
    return interp.run(default_feeds(module, input_ids, past, dtype))


def past_from_present(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"past." + k[len("present."):]: v for k, v in outputs.items() if k.startswith("present.")}
