"""Per-layer activation statistics on calibration text: where the outliers are, and which layers
matter.

What rotation, quantization and pruning decisions rest on, measured with the reference interpreter
(a hook sees every node's outputs; nothing is kept beyond running sums):

- the residual stream after each layer: max |x|, kurtosis (Pearson, 3 for a Gaussian; outlier
  channels push it far up, which is what Hadamard rotations bring back down, QuaRot/SpinQuant),
  and the number of outlier channels, those whose mean |x| over tokens exceeds 6 × the median
  channel's (the "massive activations" of Sun et al. 2024 and LLM.int8()'s outlier features);
- the input of every linear: max/median of the per-channel mean |x| (how badly per-tensor
  activation quantization would clip) and kurtosis;
- the block influence of each layer, 1 − cos(x_in, x_out) averaged over tokens (ShortGPT, Men et
  al. 2024): a layer that barely turns the residual stream is a pruning candidate.

Layer boundaries are found in the graph, not from names: a layer's input is the value its nodes
read from outside the layer (the residual stream), its output the last value it hands on to nodes
outside it, both of the model's hidden width. Moments are accumulated in float64.
"""

from __future__ import annotations

import html
import math
from typing import Any

import torch

from splice.errors import InputError
from splice.ir.core import Module, Value
from splice.ir.interpreter import Interpreter, default_feeds

OUTLIER_FACTOR = 6.0


class _Moments:
    """Running sums for max |x|, kurtosis and per-channel mean |x| of one value."""

    def __init__(self) -> None:
        self.n = 0
        self.rows = 0
        self.s = [0.0, 0.0, 0.0, 0.0]
        self.max_abs = 0.0
        self.channel_abs: torch.Tensor | None = None

    def add(self, t: torch.Tensor) -> None:
        x = t.detach().reshape(-1, t.shape[-1]).to(torch.float64)
        self.n += x.numel()
        self.rows += x.shape[0]
        p = x.clone()
        for k in range(4):
            self.s[k] += float(p.sum())
            if k < 3:
                p.mul_(x)
        a = x.abs()
        self.max_abs = max(self.max_abs, float(a.max()) if a.numel() else 0.0)
        col = a.sum(0)
        self.channel_abs = col if self.channel_abs is None else self.channel_abs + col

    def result(self) -> dict[str, Any]:
        m1, m2, m3, m4 = (s / self.n for s in self.s)
        var = m2 - m1 * m1
        mu4 = m4 - 4 * m1 * m3 + 6 * m1 * m1 * m2 - 3 * m1 ** 4
        kurt = mu4 / (var * var) if var > 0 else float("nan")
        ch = self.channel_abs / self.rows
        med = float(ch.median())
        return {"max_abs": self.max_abs, "kurtosis": kurt,
                "max_median_ratio": float(ch.max()) / med if med > 0 else float("inf"),
                "outlier_channels": int((ch > OUTLIER_FACTOR * med).sum()),
                "channels": int(ch.numel())}


def layer_boundaries(module: Module) -> dict[int, tuple[Value, Value]]:
    """For each layer, (the residual stream it reads, the one it hands on)."""
    g = module.graph
    hidden = module.config.hidden_size
    out: dict[int, tuple[Value, Value]] = {}
    for layer in g.layers():
        nodes = [n for n in g.nodes if n.layer == layer]
        ins = [v for n in nodes for v in n.inputs if v is not None and not v.is_const
               and v.producer is not None and v.producer.layer != layer
               and v.shape[-1:] == (hidden,)]
        outs = [v for n in nodes for v in n.outputs if v.shape[-1:] == (hidden,)
                and any(u.layer != layer for u in v.users())]
        if ins and outs:
            out[layer] = (ins[0], outs[-1])
    return out


def activation_stats(module: Module, batches: torch.Tensor, *,
                     dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Statistics of `module` over token `batches` [n, seq] (one interpreter run per row)."""
    if not isinstance(batches, torch.Tensor) or batches.dim() != 2 or batches.numel() == 0:
        raise InputError("activation statistics need token batches [n, seq]")
    bounds = layer_boundaries(module)
    if not bounds:
        raise InputError("this graph has no decoder layers to take statistics of (no node has a "
                         "layer index)")
    resid = {out.name: layer for layer, (_, out) in bounds.items()}
    layer_in = {inp.name: layer for layer, (inp, _) in bounds.items()}
    linears: dict[str, dict[str, Any]] = {}
    for n in module.graph.nodes:
        if n.op in ("linear", "qlinear") and n.inputs[0] is not None:
            v = n.inputs[0]
            e = linears.setdefault(v.name, {"layer": n.layer, "roles": [], "value": v.name})
            e["roles"].append(n.role or n.output.name)
    moments = {name: _Moments() for name in set(resid) | set(linears)}
    cos_sum = {layer: 0.0 for layer in bounds}
    cos_n = {layer: 0 for layer in bounds}
    held: dict[int, torch.Tensor] = {}
    # a layer input that is a graph input or produced outside any node (never seen by the hook)
    # cannot be held; such layers get no block influence

    def hook(node, outs):
        for v, t in zip(node.outputs, outs):
            name = v.name
            if name in layer_in:
                held[layer_in[name]] = t
            if name in moments:
                moments[name].add(t)
            if name in resid:
                layer = resid[name]
                x = held.pop(layer, None)
                if x is not None:
                    cos = torch.nn.functional.cosine_similarity(
                        x.to(torch.float64), t.to(torch.float64), dim=-1)
                    cos_sum[layer] += float(cos.sum())
                    cos_n[layer] += cos.numel()
        return None

    interp = Interpreter(module, dtype)
    for row in batches:
        interp.run(default_feeds(module, row[None], None, dtype), hook=hook)
        held.clear()
    layers = []
    for layer, (_, out) in sorted(bounds.items()):
        r = moments[out.name].result()
        layers.append({"layer": layer, "value": out.name, "residual_max_abs": r["max_abs"],
                       "residual_kurtosis": r["kurtosis"],
                       "outlier_channels": r["outlier_channels"], "channels": r["channels"],
                       "block_influence": 1.0 - cos_sum[layer] / cos_n[layer]
                       if cos_n[layer] else None})
    lin = []
    for name, e in linears.items():
        r = moments[name].result()
        lin.append({"layer": e["layer"], "roles": e["roles"], "value": name,
                    "max_abs": r["max_abs"], "max_median_ratio": r["max_median_ratio"],
                    "kurtosis": r["kurtosis"], "outlier_channels": r["outlier_channels"]})
    return {"tokens": int(batches.numel()), "batches": list(batches.shape), "layers": layers,
            "linears": lin, "outlier_factor": OUTLIER_FACTOR}


def _g(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}g}"
    return str(v)


def format_stats(st: dict[str, Any]) -> str:
    """The statistics as two plain-text tables (what `splice inspect --calib` prints)."""
    lines = [f"activation statistics over {st['tokens']} tokens {st['batches']}",
             f"{'layer':>5} {'resid max|x|':>13} {'kurtosis':>10} {'outlier ch':>10} "
             f"{'block infl.':>11}"]
    for r in st["layers"]:
        lines.append(f"{r['layer']:>5} {_g(r['residual_max_abs']):>13} "
                     f"{_g(r['residual_kurtosis']):>10} "
                     f"{r['outlier_channels']:>5}/{r['channels']:<4} "
                     f"{_g(r['block_influence']):>11}")
    lines += ["", f"{'layer':>5} {'linear input of':<36} {'max/median':>10} {'kurtosis':>10} "
              f"{'max|x|':>9}"]
    for r in st["linears"]:
        layer = "-" if r["layer"] is None else r["layer"]
        roles = ", ".join(r["roles"])
        roles = roles if len(roles) <= 36 else roles[:33] + "..."
        lines.append(f"{layer:>5} {roles:<36} {_g(r['max_median_ratio']):>10} "
                     f"{_g(r['kurtosis']):>10} {_g(r['max_abs']):>9}")
    lines.append(f"(outlier channel: mean |x| over tokens > {st['outlier_factor']:g} × the median "
                 "channel's; block influence: 1 − cos(layer input, layer output))")
    return "\n".join(lines)


def stats_html(st: dict[str, Any]) -> str:
    """The statistics as two HTML tables for the debug report."""
    esc = html.escape
    rows = "".join(
        f"<tr><td class=num>{r['layer']}</td><td class=num>{_g(r['residual_max_abs'])}</td>"
        f"<td class=num>{_g(r['residual_kurtosis'])}</td><td class=num>{r['outlier_channels']}/"
        f"{r['channels']}</td><td class=num>{_g(r['block_influence'])}</td></tr>"
        for r in st["layers"])
    lin = "".join(
        f"<tr><td class=num>{'–' if r['layer'] is None else r['layer']}</td>"
        f"<td>{esc(', '.join(r['roles']))}</td><td class=num>{_g(r['max_median_ratio'])}</td>"
        f"<td class=num>{_g(r['kurtosis'])}</td><td class=num>{_g(r['max_abs'])}</td></tr>"
        for r in st["linears"])
    return (f"<p class=muted>{st['tokens']} calibration tokens {st['batches']}; outlier channel: "
            f"mean |x| &gt; {st['outlier_factor']:g} × median; block influence 1 − cos(x_in, "
            "x_out)</p><table><tr><th>layer</th><th>residual max |x|</th><th>kurtosis</th>"
            f"<th>outlier channels</th><th>block influence</th></tr>{rows}</table>"
            "<details><summary>inputs of every linear</summary><table><tr><th>layer</th>"
            "<th>linear(s)</th><th>max/median</th><th>kurtosis</th><th>max |x|</th></tr>"
            f"{lin}</table></details>")
