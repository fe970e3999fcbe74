"""llama.cpp's rounding in splice's reference interpreter: the logits a GGUF file should give.

llama.cpp's CPU matmul does not multiply a quantized weight with float activations: it first
quantizes each activation row to the weight type's "vec_dot" type and multiplies integers.
For Q4_0 and Q8_0 weights that is Q8_0: per block of 32 inputs, amax = max |x|, the codes
round(x * 127 / amax) (round half to even, as the AVX2 path) and the block scale
float16(amax / 127). The product of one block is then d_w * d_x * sum(q_w * q_x), exact but
for float32 accumulation. So x enters every quantized linear as x_hat with
|x - x_hat| <= d_x / 2 + 127 * |d_x - float16(d_x)| <= amax * (0.5 + 127 * 2^-11) / 127,
about 0.44% of the block's largest value; an F16 weight reads the activation as float16; F32
weights, attention, norms and the rest run in float32 on both sides.

`llama_logits` runs the interpreter with exactly that rounding at the input of each linear whose
GGUF tensor is quantized (Q4_1's Q8_1 also stores float16(d * sum q), which is not modelled: its
activations are rounded as Q8_0's). What remains between this and llama.cpp's logits is float32
accumulation order (and, rarely, a code that rounds the other way because of it): on one real
SmolLM2-135M layer, 5e-7 of the logits' range for F32, Q8_0 and Q4_0 linears.

One case is not reproduced: a Q4_0 token table read by a weightless norm (fold_norms). Its rows
are small integers times one scale per block, and so is the normalised row, so about one input in
ten of the first layer's linears lands exactly on a Q8_0 tie (x / amax = 1/2: code 63.5).
llama.cpp resolves those ties in a way this simulation does not (none of half-to-even, half away
from zero, half toward zero or a reciprocal one ulp off matches): 0.18% of the logits' range after
one layer, 4.5-8.9% after 4 to 30 (docs/gguf.md). With a norm weight in between, or a Q8_0 table,
the match is again 5e-7.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from splice.errors import InputError
from splice.ir.core import Module, Node
from splice.ir.interpreter import Interpreter, default_feeds
from splice.ir.opdef import get_op
from .llama import LAYER_ROLES

BLOCK = 32
Q8_ACTIVATIONS = ("Q4_0", "Q4_1", "Q8_0")


def q8_0(x: torch.Tensor) -> torch.Tensor:
    """x rounded as llama.cpp's quantize_row_q8_0 (AVX2) rounds it, dequantized (float32)."""
    if x.shape[-1] % BLOCK:
        raise InputError(f"q8_0: the last dimension ({x.shape[-1]}) is not a multiple of "
                         f"{BLOCK}")
    b = x.float().reshape(*x.shape[:-1], -1, BLOCK)
    amax = b.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    d = (amax / 127.0).half().float()
    return (torch.round(b * inv) * d).reshape(x.shape)


def tensor_name(node: Node, names: Sequence[str]) -> str | None:
    """The GGUF tensor holding a linear node's weight (`names`: the file's tensor names)."""
    if node.role == "lm_head":
        return "output.weight" if "output.weight" in names else "token_embd.weight"
    suffix = LAYER_ROLES.get(node.role, (None, None))[1]
    return None if suffix is None or node.layer is None else f"blk.{node.layer}.{suffix}.weight"


def file_types(path: str | Path) -> dict[str, str]:
    """{tensor name: GGML type name} of a GGUF file (the gguf package's reader)."""
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def llama_logits(module: Module, ids: Sequence[int], types: Mapping[str, str]) -> torch.Tensor:
    """The logits [seq, vocab] (float32) of `module` on one sequence with llama.cpp's activation
    rounding at each linear whose tensor in `types` ({GGUF name: type}) is quantized (Q8_0
    codes) or F16 (float16)."""
    names = list(types)
    rounding = {}
    for node in module.graph.nodes:
        if node.op in ("linear", "qlinear"):
            name = tensor_name(node, names)
            if name not in types:
                raise InputError(f"llama_logits: no GGUF tensor for linear %{node.output.name} "
                                 f"(role {node.role!r}, layer {node.layer})")
            kind = types[name]
            if kind in Q8_ACTIVATIONS:
                rounding[id(node)] = q8_0
            elif kind == "F16":
                rounding[id(node)] = lambda x: x.half().float()

    def compute(node: Node, args: list) -> tuple | None:
        fn = rounding.get(id(node))
        if fn is None:
            return None
        return get_op(node.op).reference(node.attrs, fn(args[0]), *args[1:])

    interp = Interpreter(module, torch.float32)
    feeds = default_feeds(module, torch.tensor([list(ids)]), None, torch.float32)
    return interp.run(feeds, compute=compute, outputs=["logits"])["logits"][0]
