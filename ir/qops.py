"""The quantized ops (`qlinear`, `quantize`, `qembedding`): shape rules and torch references.

Their storage format and arithmetic live in quant.py; this module only declares the ops, into
opdef.OPS, when the package's __init__ imports it.
"""

from __future__ import annotations

import torch

from .core import IRError, Node, Shape
from .opdef import Attr, op
from .quant import ACT_MODES, check_format, dequantize, fake_quantize, zero_points_shape
from .shapes import check_last_dim, operand


def _qlinear_shape(node: Node) -> list[tuple[str, Shape]]:
    a = node.attrs
    x, w, s = operand(node, 0), operand(node, 1), operand(node, 2)
    zp = node.inputs[3] if len(node.inputs) > 3 else None
    b = node.inputs[4] if len(node.inputs) > 4 else None
    k, n, bits, group = a["in_features"], a["out_features"], a["bits"], a["group_size"]
    blocks = check_format(bits, group, k, n)
    check_last_dim(x, k, "qlinear")
    expected = (n, blocks, group * bits // 8)
    if w.dtype != "u8" or w.shape != expected:
        raise IRError(f"qlinear: packed weight %{w.name} is {w.dtype}{list(w.shape)}, expected "
                      f"u8{list(expected)} (MatMulNBits layout [N, n_blocks, blob])")
    if s.shape != (n, blocks) or s.dtype not in ("f32", "f64", "f16", "bf16"):
        raise IRError(f"qlinear: scales %{s.name} are {s.dtype}{list(s.shape)}, expected "
                      f"f32[{n}, {blocks}]")
    if a["symmetric"] and zp is not None:
        raise IRError(f"qlinear: symmetric quantization has implicit zero points "
                      f"({1 << (bits - 1)}), but %{zp.name} is given")
    if not a["symmetric"]:
        zshape = zero_points_shape(n, blocks, bits)
        packed = zp is not None and zp.dtype == "u8" and zp.shape == zshape
        floats = zp is not None and bits == 4 and zp.dtype == "f32" and zp.shape == (n, blocks)
        if not (packed or floats):
            got = "none" if zp is None else f"{zp.dtype}{list(zp.shape)}"
            raise IRError(f"qlinear: asymmetric quantization needs zero points u8{list(zshape)} "
                          f"(or f32[{n}, {blocks}] for 4-bit), got {got}")
    if b is not None and b.shape != (n,):
        raise IRError(f"qlinear: bias %{b.name} has shape {list(b.shape)}, expected [{n}]")
    return [(x.dtype, (*x.shape[:-1], n))]


@op("qlinear", ["x", "weight", "scales", "zero_points?", "bias?"], ["y"],
    {"bits": Attr(int), "group_size": Attr(int), "in_features": Attr(int),
     "out_features": Attr(int), "symmetric": Attr(bool)},
    shape=_qlinear_shape,
    doc="x @ W.T + bias with W block-quantized in ONNX Runtime's MatMulNBits layout (see "
        "splice.ir.quant): W[n, k] = (q[n, k] - z[n, g]) * scale[n, g], g = k // group_size; "
        "weight u8 [out, blocks, group_size*bits/8] with blocks = ceil(in/group_size) (4-bit: "
        "low nibble first; a partial last block is padded), scales [out, blocks], zero points u8 "
        "[out, ceil(blocks*bits/8)] packed the same way (4-bit: or f32 [out, blocks], a float "
        "zero point per block), or absent when symmetric (z = 8 for int4, 128 for int8).")
def _qlinear(a: dict, x: torch.Tensor, w: torch.Tensor, s: torch.Tensor,
             zp: torch.Tensor | None = None, b: torch.Tensor | None = None):
    weight = dequantize(w, s, zp, a["bits"], a["group_size"], x.dtype, a["in_features"])
    return (torch.nn.functional.linear(x, weight, b),)


def _quantize_shape(node: Node) -> list[tuple[str, Shape]]:
    a = node.attrs
    x = operand(node, 0)
    s = node.inputs[1] if len(node.inputs) > 1 else None
    z = node.inputs[2] if len(node.inputs) > 2 else None
    if a["mode"] not in ACT_MODES:
        raise IRError(f"quantize: mode {a['mode']!r}; accepted: {', '.join(ACT_MODES)}")
    if a["bits"] not in (4, 8):
        raise IRError(f"quantize: int{a['bits']} is not supported; bits must be 4 or 8")
    if not 0.0 < a["clip_ratio"] <= 1.0:
        raise IRError(f"quantize: clip_ratio {a['clip_ratio']} must lie in (0, 1]")
    width = x.shape[-1]
    if a["mode"] == "dynamic_per_token":
        if s is not None or z is not None:
            raise IRError("quantize: dynamic_per_token computes its scales; give no scale input")
        if a["group"] and isinstance(width, int) and width % a["group"]:
            raise IRError(f"quantize: group {a['group']} does not divide last dim {width}")
        return [(x.dtype, x.shape)]
    if a["group"]:
        raise IRError("quantize: group applies to dynamic_per_token only")
    want = () if a["mode"] == "static_per_tensor" else (width,)
    if s is None or s.shape != want:
        got = "none" if s is None else str(list(s.shape))
        raise IRError(f"quantize: {a['mode']} needs a scale of shape {list(want)}, got {got}")
    if a["symmetric"] and z is not None:
        raise IRError("quantize: symmetric quantization takes no zero point")
    if not a["symmetric"] and (z is None or z.shape != want or z.dtype != "u8"):
        raise IRError(f"quantize: asymmetric {a['mode']} needs a u8 zero point of shape {list(want)}")
    return [(x.dtype, x.shape)]


@op("quantize", ["x", "scale?", "zero_point?"], ["y"],
    {"mode": Attr(str), "bits": Attr(int, 8), "symmetric": Attr(bool, True),
     "group": Attr(int, 0), "clip_ratio": Attr(float, 1.0)},
    shape=_quantize_shape,
    doc="Fake quantization (quantize then dequantize) over the last dim, so the next op sees "
        "exactly the values an integer kernel would: mode dynamic_per_token (scales from each "
        "token's range, or each run of `group` channels: per head), static_per_tensor or "
        "static_per_channel (calibrated scale and, when asymmetric, u8 zero point). "
        "splice.ir.quant.fake_quantize is the exact formula and order of operations.")
def _quantize(a: dict, x: torch.Tensor, s: torch.Tensor | None = None,
              z: torch.Tensor | None = None):
    return (fake_quantize(x, mode=a["mode"], bits=a["bits"], symmetric=a["symmetric"],
                          group=a["group"], clip_ratio=a["clip_ratio"], scale=s, zero_point=z),)


def _qembedding_shape(node: Node) -> list[tuple[str, Shape]]:
    a = node.attrs
    ids, w, s = operand(node, 0), operand(node, 1), operand(node, 2)
    zp = node.inputs[3] if len(node.inputs) > 3 else None
    if ids.dtype not in ("i64", "i32"):
        raise IRError(f"qembedding: ids %{ids.name} must be integer, got {ids.dtype}")
    v, d, bits, group = a["num_embeddings"], a["embedding_dim"], a["bits"], a["group_size"]
    blocks = check_format(bits, group, d, v)
    if w.dtype != "u8" or w.shape != (v, blocks, group * bits // 8):
        raise IRError(f"qembedding: packed table %{w.name} is {w.dtype}{list(w.shape)}, expected "
                      f"u8{[v, blocks, group * bits // 8]}")
    if s.shape != (v, blocks):
        raise IRError(f"qembedding: scales %{s.name} are {list(s.shape)}, expected [{v}, {blocks}]")
    zshape = zero_points_shape(v, blocks, bits)
    if a["symmetric"] != (zp is None) or (zp is not None and (zp.dtype, zp.shape) != ("u8", zshape)):
        raise IRError(f"qembedding: {'symmetric' if a['symmetric'] else 'asymmetric'} needs "
                      f"{'no zero points' if a['symmetric'] else f'u8{list(zshape)} zero points'}")
    return [(s.dtype if s.dtype in ("f32", "f64", "f16", "bf16") else "f32", (*ids.shape, d))]


@op("qembedding", ["ids", "weight", "scales", "zero_points?"], ["y"],
    {"bits": Attr(int), "group_size": Attr(int), "embedding_dim": Attr(int),
     "num_embeddings": Attr(int), "symmetric": Attr(bool), "scale": Attr(float, 1.0)},
    shape=_qembedding_shape,
    doc="embedding over a block-quantized table: the rows ids of the table stored as qlinear "
        "stores a weight (rows = num_embeddings, in = embedding_dim), dequantized, times scale. "
        "A tied lm_head's qlinear can share the same packed constants.")
def _qembedding(a: dict, ids: torch.Tensor, w: torch.Tensor, s: torch.Tensor,
                zp: torch.Tensor | None = None):
    flat = ids.reshape(-1)
    rows = dequantize(w[flat], s[flat], None if zp is None else zp[flat], a["bits"],
                      a["group_size"], s.dtype, a["embedding_dim"])
    y = rows.reshape(*ids.shape, a["embedding_dim"])
    if a["scale"] != 1.0:
        y = y * torch.tensor(a["scale"], dtype=y.dtype)
    return (y,)
