"""Which recipes the gguf backend can write, decided from the recipe alone, before any work.

llama.cpp runs its own graph for an architecture; a GGUF file only carries weights and
metadata. So every pass must leave that graph as it was and change weights only:
- fold_norms: exact, norms become unit (written as ones);
- rotate with R1 and R2 only: both fuse into the weights; R3 and R4 are online Hadamards (a
  `hadamard` node in the graph), which llama.cpp's graph does not have;
- select_layers / estimate_patch / prune_layers / fuse_patch with strategy "fold" (the patch folded
  into the down_proj of the last kept layer; ReplaceMe) / distill_patch: fewer layers of the same
  kind. A patch kept in the graph (fuse_patch "dense", "fwht", "auto", or none) or an MLP patch
  (estimate_patch kind "mlp", a block llama.cpp does not have) is refused;
- quantize_weights on llama.cpp's block grids: groups of 32, float16 scales, 4-bit symmetric
  (Q4_0), 4-bit with float zero points (Q4_1) or 8-bit symmetric (Q8_0); lm_head and embeddings too.
Activation quantization, KV-cache quantization and Gemma's post-norm absorption are refused.
The graph itself is checked again when it is written (backends/gguf/llama.py), so a pass that is
not known here cannot slip an op through.
"""

from __future__ import annotations

from collections.abc import Sequence

from splice.errors import InputError

GROUP = 32
SCALE_DTYPE = "float16"
KEEP_GRAPH = ("fold_norms", "rotate", "select_layers", "estimate_patch", "prune_layers",
              "fuse_patch", "distill_patch", "quantize_weights")
NOT_IN_FORMAT = {
    "quantize_activations": "quantizes activations on splice's grids; llama.cpp quantizes "
                            "activations itself (8 bits for its Q4_0/Q8_0 dot products)",
    "quantize_kv_cache": "quantizes the KV cache in the graph; llama.cpp chooses its cache type "
                         "at run time (the runtime's kv_type)",
    "absorb_post_norm": "rewrites Gemma's sandwich norms; the gguf backend writes llama.cpp's "
                        "llama graph",
}


def _refuse(name: str, what: str, fits: str) -> InputError:
    return InputError(f"the gguf backend cannot write pass {name!r}: {what}; {fits}")


def check_recipe(passes: Sequence) -> None:
    """Raise an InputError naming the first pass (and setting) whose result llama.cpp's graph
    cannot hold, and what would fit. `passes` are pass instances (Recipe.build())."""
    for i, p in enumerate(passes):
        name = p.name
        if name in NOT_IN_FORMAT:
            raise _refuse(name, NOT_IN_FORMAT[name], "leave it out of the recipe")
        if name not in KEEP_GRAPH:
            raise _refuse(name, "it is not known to keep llama.cpp's graph",
                          f"passes that fit: {', '.join(KEEP_GRAPH)}")
        if name == "rotate":
            online = [k for k in ("r3", "r4") if getattr(p, k)]
            if online:
                raise _refuse(name, f"{' and '.join(f'{k} = true' for k in online)} puts online "
                              "Hadamard transforms into the graph, which llama.cpp's lacks",
                              "set r3 = false and r4 = false (R1 and R2 fuse into the weights)")
        elif name == "estimate_patch" and p.kind == "mlp":
            raise _refuse(name, "kind = 'mlp' adds a gated MLP block to the stream, which "
                          "llama.cpp's graph lacks", "use kind 'linearpatch', 'lstsq' or 'auto' "
                          "with fuse_patch strategy = 'fold'")
        elif name == "estimate_patch" and not any(
                q.name == "fuse_patch" and q.strategy == "fold" for q in passes[i + 1:]):
            raise _refuse(name, "its patch would stay in the graph as a matmul, which "
                          "llama.cpp's graph lacks", "add fuse_patch with strategy = 'fold' "
                          "after prune_layers (the patch folded into the last kept layer)")
        elif name == "fuse_patch" and p.strategy != "fold":
            raise _refuse(name, f"strategy = {p.strategy!r} keeps the patch in the graph",
                          "set strategy = 'fold' (the patch folded into the down_proj of the "
                          "last kept layer)")
        elif name == "quantize_weights":
            _check_quantize(p)


def _check_quantize(p) -> None:
    name = p.name
    if p.group_size != GROUP:
        raise _refuse(name, f"group_size = {p.group_size}; llama.cpp's Q4_0, Q4_1 and Q8_0 "
                      f"hold groups of {GROUP}", f"set group_size = {GROUP}")
    widths = {p.bits} | ({8} if p.embeddings == "int8" or p.lm_head == "int8" else set()) | \
        ({4} if p.lm_head == "int4" else set())
    if 8 in widths and not p.symmetric:
        raise _refuse(name, "8-bit weights with zero points have no llama.cpp type",
                      "set symmetric = true (Q8_0)")
    if p.bits == 4 and not p.symmetric and not p.float_zero_points:
        raise _refuse(name, "4-bit weights with integer zero points have no exact llama.cpp "
                      "type", "set symmetric = true (Q4_0) or float_zero_points = true (Q4_1)")
    if getattr(p, "embeddings", "keep") == "int4" and not (p.symmetric or p.float_zero_points):
        raise _refuse(name, "4-bit embeddings with integer zero points have no llama.cpp type",
                      "set symmetric = true (Q4_0)")
    if getattr(p, "scale_dtype", "float32") != SCALE_DTYPE:
        raise _refuse(name, f"scale_dtype = {getattr(p, 'scale_dtype', 'float32')!r}; llama.cpp "
                      "stores block scales as float16, and rounding them after the codes were "
                      "chosen changes what the quantizer optimised",
                      f"set scale_dtype = {SCALE_DTYPE!r}")
