"""Op definitions: each op declared once with its attributes, arity, shape rule and reference
implementation (torch, any float dtype).

The reference implementations are the semantics every backend must reproduce; the interpreter in
interpreter.py only wires them together. Shapes may hold symbolic dims ("batch", "seq", "past");
shape rules combine them as strings ("past+seq"). The quantized ops (qlinear, quantize,
qembedding) are declared in qops.py. Both declare into opdef.OPS (opdef.py holds the table and
the `op` decorator; shapes.py the shape helpers); the package's __init__ imports both.
"""

from __future__ import annotations

import math

import torch

from .core import IRError, Node, Shape
from .hadamard import check_hadamard_attrs, hadamard_transform
from .opdef import OPS, Attr, OpDef, get_op, op
from .shapes import broadcast_rule, check_last_dim, dim_add, operand, same_as_first

__all__ = ["OPS", "Attr", "OpDef", "default_attention_scale", "get_op", "op"]


# -- ops -------------------------------------------------------------------------------------------

def _embedding_shape(node: Node) -> list[tuple[str, Shape]]:
    ids, table = operand(node, 0), operand(node, 1)
    if ids.dtype not in ("i64", "i32"):
        raise IRError(f"embedding: ids %{ids.name} must be integer, got {ids.dtype}")
    if len(table.shape) != 2:
        raise IRError(f"embedding: table %{table.name} must be 2-D, got {list(table.shape)}")
    return [(table.dtype if table.dtype in ("f32", "f64", "f16", "bf16") else "f32",
             (*ids.shape, table.shape[1]))]


@op("embedding", ["ids", "table"], ["y"], {"scale": Attr(float, 1.0)}, shape=_embedding_shape,
    doc="table[ids] * scale (Gemma scales by sqrt(hidden)).")
def _embedding(a: dict, ids: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor]:
    y = table[ids]
    if a["scale"] != 1.0:
        y = y * torch.tensor(a["scale"], dtype=y.dtype)
    return (y,)


def _rms_norm_shape(node: Node) -> list[tuple[str, Shape]]:
    x, w = operand(node, 0), node.inputs[1] if len(node.inputs) > 1 else None
    group = node.attrs.get("group", 0)
    width = group or x.shape[-1]
    if w is not None and w.shape != (width,):
        raise IRError(f"rms_norm: weight %{w.name} has shape {list(w.shape)}, expected [{width}]")
    if group and isinstance(x.shape[-1], int) and x.shape[-1] % group:
        raise IRError(f"rms_norm: group {group} does not divide last dim {x.shape[-1]}")
    return [(x.dtype, x.shape)]


@op("rms_norm", ["x", "weight?"], ["y"],
    {"eps": Attr(float), "offset": Attr(float, 0.0), "group": Attr(int, 0)},
    shape=_rms_norm_shape,
    doc="x / sqrt(mean(x^2) + eps) * (offset + weight), over the last dim, or over each run of "
        "`group` channels (per-head q/k norms). Without a weight (folded away) it only normalises.")
def _rms_norm(a: dict, x: torch.Tensor, w: torch.Tensor | None = None) -> tuple[torch.Tensor]:
    shape = x.shape
    if a["group"]:
        x = x.reshape(*shape[:-1], shape[-1] // a["group"], a["group"])
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + a["eps"])
    if w is not None:
        y = y * (w + a["offset"]) if a["offset"] else y * w
    return (y.reshape(shape),)


def _linear_shape(node: Node) -> list[tuple[str, Shape]]:
    x, w = operand(node, 0), operand(node, 1)
    if len(w.shape) != 2:
        raise IRError(f"linear: weight %{w.name} must be [out, in], got {list(w.shape)}")
    check_last_dim(x, w.shape[1], f"linear (weight %{w.name})")
    b = node.inputs[2] if len(node.inputs) > 2 else None
    if b is not None and b.shape != (w.shape[0],):
        raise IRError(f"linear: bias %{b.name} has shape {list(b.shape)}, expected [{w.shape[0]}]")
    return [(x.dtype, (*x.shape[:-1], w.shape[0]))]


@op("linear", ["x", "weight", "bias?"], ["y"], shape=_linear_shape,
    doc="x @ weight.T + bias, weight stored [out, in] as in torch.nn.Linear.")
def _linear(a: dict, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None):
    return (torch.nn.functional.linear(x, w, b),)


def _matmul_shape(node: Node) -> list[tuple[str, Shape]]:
    x, w = operand(node, 0), operand(node, 1)
    if len(w.shape) != 2:
        raise IRError(f"matmul: right operand %{w.name} must be 2-D [in, out]")
    check_last_dim(x, w.shape[0], f"matmul (%{w.name})")
    return [(x.dtype, (*x.shape[:-1], w.shape[1]))]


@op("matmul", ["x", "w"], ["y"], shape=_matmul_shape, doc="x @ w with w stored [in, out].")
def _matmul(a: dict, x: torch.Tensor, w: torch.Tensor):
    return (x @ w,)


@op("add", ["a", "b"], ["y"], shape=broadcast_rule, doc="a + b (broadcasting).")
def _add(a: dict, x: torch.Tensor, y: torch.Tensor):
    return (x + y,)


@op("mul", ["a", "b"], ["y"], shape=broadcast_rule, doc="a * b (broadcasting).")
def _mul(a: dict, x: torch.Tensor, y: torch.Tensor):
    return (x * y,)


def _channel_scale_shape(node: Node) -> list[tuple[str, Shape]]:
    x, s = operand(node, 0), operand(node, 1)
    if s.shape != (x.shape[-1],):
        raise IRError(f"channel_scale: scale %{s.name} must be [{x.shape[-1]}], got {list(s.shape)}")
    return [(x.dtype, x.shape)]


@op("channel_scale", ["x", "scale"], ["y"], shape=_channel_scale_shape,
    doc="x * scale over the last dim.")
def _channel_scale(a: dict, x: torch.Tensor, s: torch.Tensor):
    return (x * s,)


@op("silu", ["x"], ["y"], shape=same_as_first, doc="x * sigmoid(x).")
def _silu(a: dict, x: torch.Tensor):
    return (torch.nn.functional.silu(x),)


@op("gelu", ["x"], ["y"], {"approximate": Attr(str, "none")}, shape=same_as_first,
    doc='GELU, exact ("none") or the tanh approximation ("tanh").')
def _gelu(a: dict, x: torch.Tensor):
    if a["approximate"] not in ("none", "tanh"):
        raise IRError(f"gelu: approximate must be 'none' or 'tanh', got {a['approximate']!r}")
    return (torch.nn.functional.gelu(x, approximate=a["approximate"]),)


@op("softcap", ["x"], ["y"], {"cap": Attr(float)}, shape=same_as_first,
    doc="cap * tanh(x / cap) (Gemma 2 logit soft-capping).")
def _softcap(a: dict, x: torch.Tensor):
    return (torch.tanh(x / a["cap"]) * a["cap"],)


def _rotary_shape(node: Node) -> list[tuple[str, Shape]]:
    x, pos, inv = operand(node, 0), operand(node, 1), operand(node, 2)
    hd, rd = node.attrs["head_dim"], node.attrs.get("rotary_dim", 0) or node.attrs["head_dim"]
    if isinstance(x.shape[-1], int) and x.shape[-1] % hd:
        raise IRError(f"rotary: head_dim {hd} does not divide {x.shape[-1]}")
    if inv.shape != (rd // 2,):
        raise IRError(f"rotary: inv_freq %{inv.name} must be [{rd // 2}], got {list(inv.shape)}")
    if pos.shape != x.shape[:-1]:
        raise IRError(f"rotary: positions %{pos.name} {list(pos.shape)} do not match "
                      f"{list(x.shape[:-1])}")
    return [(x.dtype, x.shape)]


@op("rotary", ["x", "positions", "inv_freq"], ["y"],
    {"head_dim": Attr(int), "rotary_dim": Attr(int, 0), "interleaved": Attr(bool, False),
     "scale": Attr(float, 1.0)},
    shape=_rotary_shape,
    doc="Rotary position embedding on x [.., heads*head_dim]: the first rotary_dim (0 = all) "
        "channels of each head rotated by angle position*inv_freq, in the rotate-half layout "
        "(or pairs 2i, 2i+1 when interleaved); cos and sin are multiplied by `scale`.")
def _rotary(a: dict, x: torch.Tensor, pos: torch.Tensor, inv: torch.Tensor):
    hd = a["head_dim"]
    rd = a["rotary_dim"] or hd
    shape = x.shape
    xh = x.reshape(*shape[:-1], shape[-1] // hd, hd)
    # angles in float64 whatever the compute dtype, as HF computes them in float32 before the cast
    ang = pos.to(torch.float64)[..., None] * inv.to(torch.float64)
    cos = (torch.cos(ang) * a["scale"]).to(x.dtype)[..., None, :]
    sin = (torch.sin(ang) * a["scale"]).to(x.dtype)[..., None, :]
    rot, rest = xh[..., :rd], xh[..., rd:]
    if a["interleaved"]:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., : rd // 2], rot[..., rd // 2:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return (torch.cat((out, rest), dim=-1).reshape(shape),)


def _attention_shape(node: Node) -> list[tuple[str, Shape]]:
    q, k, v, pk, pv = (operand(node, i) for i in range(5))
    a = node.attrs
    h, kv, hd = a["num_heads"], a["num_kv_heads"], a["head_dim"]
    if h % kv:
        raise IRError(f"attention: num_heads {h} is not a multiple of num_kv_heads {kv}")
    check_last_dim(q, h * hd, "attention q")
    check_last_dim(k, kv * hd, "attention k")
    check_last_dim(v, kv * hd, "attention v")
    for p in (pk, pv):
        if len(p.shape) != 4 or p.shape[1] != kv or p.shape[3] != hd:
            raise IRError(f"attention: past %{p.name} must be [batch, {kv}, past, {hd}], "
                          f"got {list(p.shape)}")
    b, s = q.shape[0], q.shape[1]
    total = dim_add(pk.shape[2], s)
    return [(q.dtype, (b, s, h * hd)), (q.dtype, (b, kv, total, hd)), (q.dtype, (b, kv, total, hd))]


@op("attention", ["q", "k", "v", "past_k", "past_v"], ["y", "present_k", "present_v"],
    {"num_heads": Attr(int), "num_kv_heads": Attr(int), "head_dim": Attr(int),
     "scale": Attr(float), "causal": Attr(bool, True), "softcap": Attr(float, 0.0),
     "sliding_window": Attr(int, 0)},
    shape=_attention_shape,
    doc="Grouped-query scaled dot-product attention over [past; new] keys. q/k/v are "
        "[batch, seq, heads*head_dim]; the cache is [batch, kv_heads, len, head_dim]. Query i "
        "sits at position past+i and sees keys j <= past+i (causal), and only keys with "
        "past+i-j < sliding_window when that is set. Scores are soft-capped when softcap > 0.")
def _attention(a: dict, q, k, v, past_k, past_v):
    h, kvh, hd = a["num_heads"], a["num_kv_heads"], a["head_dim"]
    b, s, _ = q.shape
    qh = q.reshape(b, s, h, hd).transpose(1, 2)
    kh = torch.cat((past_k.to(q.dtype), k.reshape(b, s, kvh, hd).transpose(1, 2)), dim=2)
    vh = torch.cat((past_v.to(q.dtype), v.reshape(b, s, kvh, hd).transpose(1, 2)), dim=2)
    past = past_k.shape[2]
    i = torch.arange(s)[:, None] + past
    j = torch.arange(past + s)[None, :]
    allowed = torch.ones(s, past + s, dtype=torch.bool)
    if a["causal"]:
        allowed &= j <= i
    if a["sliding_window"]:
        allowed &= (i - j) < a["sliding_window"]
    if not a["softcap"]:
        # the same arithmetic as below, in torch's fused kernel (several times faster on CPU)
        y = torch.nn.functional.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=allowed, scale=a["scale"], enable_gqa=True)
        return (y.transpose(1, 2).reshape(b, s, h * hd), kh, vh)
    rep = h // kvh
    scores = (qh @ kh.repeat_interleave(rep, dim=1).transpose(-1, -2)) * a["scale"]
    scores = torch.tanh(scores / a["softcap"]) * a["softcap"]
    p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    y = (p @ vh.repeat_interleave(rep, dim=1)).transpose(1, 2).reshape(b, s, h * hd)
    return (y, kh, vh)


def default_attention_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def _hadamard_shape(node: Node) -> list[tuple[str, Shape]]:
    x = operand(node, 0)
    if x.dtype not in ("f64", "f32", "f16", "bf16"):
        raise IRError(f"hadamard: %{x.name} must be floating point, got {x.dtype}")
    a = node.attrs
    check_hadamard_attrs(x.shape[-1] if x.shape else None, a["size"], a["block"], a["group"])
    return [(x.dtype, x.shape)]


@op("hadamard", ["x"], ["y"],
    {"size": Attr(int), "block": Attr(int, 0), "group": Attr(int, 0), "scale": Attr(float, 1.0)},
    shape=_hadamard_shape,
    doc="Online Hadamard transform y = (x @ H) * scale over the last dim (QuaRot's online "
        "rotation): H = hadamard_matrix(size), or I (x) hadamard_matrix(block) when block > 0; on "
        "the whole last dim (group = 0) or on each of its `group` runs of `size` channels (per "
        "head). H is orthonormal and deterministic, no random signs (passes fold those into "
        "weights). Every backend must reproduce exactly this matrix: splice.ir.hadamard's "
        "construction, H_n = H_b (x) H_(2^k) with [b, 2^k] = factorize(n) (base outer, Sylvester "
        "inner; e.g. 11008 = 172 (Williamson) x 64, 576 = 36 (Paley II) x 16, 4096 = Sylvester).")
def _hadamard(a: dict, x: torch.Tensor):
    return (hadamard_transform(x, a["size"], block=a["block"], group=a["group"], scale=a["scale"]),)
