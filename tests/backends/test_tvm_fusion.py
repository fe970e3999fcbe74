"""TVM backend, int8 activations: the kernels that the lowering fuses into the products' own
(rules._quantized_input, rules._qdot): the norm before q/k/v and gate/up and the gated MLP's
act(gate) * up computed inside the activation quantization, the skip connection's add written
in place by the product. The fused step must give the interpreter's tokens and logits to the
int8 bound, on a plain decoder and on a sandwich-norm one (gelu, norm offset, post-norms), and a
residual that a later op still reads must not be overwritten."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install 'splice[tvm]')")

from splice.ir import past_from_present, run_logits  # noqa: E402
from splice.ir.core import emit  # noqa: E402
from splice.ir.verify import verify_graph  # noqa: E402

from tests.tiny import tiny_module  # noqa: E402


def _w4(module):
    from splice.passes.infra.base import PassContext
    from splice.passes.quantize_weights import QuantizeWeightsPass

    return QuantizeWeightsPass(bits=4, group_size=32).call(module, PassContext()).module


def _decode_kernels(art, cache) -> collections.Counter:
    """How many times each kind of kernel runs in one decode step."""
    from splice.runtime.tvm_replay import record_calls

    art._replay.off = True  # the VM's step, whose calls the hook sees
    calls, _ = record_calls(art.vm, lambda: art.logits(np.asarray([[7]]), cache))
    return collections.Counter(symbol.rstrip("0123456789") for symbol, _, _ in calls
                               if not symbol.startswith("vm.builtin"))


def _against_interpreter(module, art, steps: int = 8) -> float:
    """Prefill and `steps` decode steps of the interpreter's greedy tokens: the worst error of
    the last position's logits relative to their range (random tiny models have near ties, so
    the tokens are the interpreter's, not compared)."""
    ids = torch.randint(0, module.config.vocab_size, (1, 10),
                        generator=torch.Generator().manual_seed(1))
    ref = run_logits(module, ids)
    logits, cache = art.logits(ids.numpy())
    worst = 0.0
    for _ in range(steps + 1):
        r = ref["logits"].numpy()
        worst = max(worst, float(np.abs(logits[:, -1:] - r[:, -1:]).max() / np.abs(r).max()))
        tok = ref["logits"][:, -1:].argmax(-1)
        ref = run_logits(module, tok, past=past_from_present(ref))
        logits, cache = art.logits(tok.numpy(), cache)
    return worst


@pytest.mark.parametrize("variant", [{}, dict(norm_offset=1.0, post_norms=True,
                                              activation="gelu_tanh", tie_embeddings=True)])
def test_norms_gates_and_residual_adds_run_inside_the_products_kernels(tmp_path, variant):
    from splice.backends.tvm import export
    from splice.runtime import load

    module = _w4(tiny_module(seed=4, **variant))
    art = load(export(module, tmp_path / "art", activations="int8"))
    assert _against_interpreter(module, art) < 0.02
    _, cache = art.logits(np.asarray([[1, 2, 3]]))
    kinds = _decode_kernels(art, cache)
    layers = module.config.num_layers
    assert kinds["qact"] == 4 * layers  # attention in, o_proj in, MLP in, down in (float lm_head)
    assert "qepilogue" not in kinds
    if not variant:  # the final norm alone stays (it feeds the float lm_head); no silu or mul
        assert kinds["rms_norm"] == 1
        assert kinds["elementwise"] == 1 + 2 * layers  # the rope table, rope on q and k
    else:  # the post-norms stay (their outputs meet the residual, not a product)
        assert kinds["rms_norm"] == 2 * layers + 1


def test_a_residual_read_after_the_product_is_not_written_in_place(tmp_path):
    """A stream that an op after the product still reads (a parallel-residual block's shape)
    keeps its value: the product's add gets a tensor of its own."""
    from splice.backends.tvm import export
    from splice.runtime import load

    module = _w4(tiny_module(seed=6))
    graph = module.graph
    o = graph.find(role="attn.o_proj", layer=0)[0]
    add = o.output.uses[0][0]
    stream = add.inputs[1 - o.output.uses[0][1]]
    last = graph.find(role="mlp.down_proj", layer=0)[0].output.uses[0][0]  # layer 0's MLP add
    extra = emit(graph, "add", [last.output, stream], role="extra.add", layer=0,
                 origin="tests", after=last)
    for user, i in [u for u in last.output.uses if u[0] is not extra]:
        user.replace_input(i, extra.output)
    verify_graph(graph)
    art = load(export(module, tmp_path / "art", activations="int8"))
    assert _against_interpreter(module, art) < 0.02
