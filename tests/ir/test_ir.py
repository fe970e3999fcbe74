"""IR: the verifier catches each broken invariant, the text form round-trips, the interpreter's
cache path equals the full pass, serialisation and the networkx view keep the graph."""

from __future__ import annotations

import pytest
import torch

from splice.frontend.decoder import DecoderSpec, build_decoder
from splice.ir import (Graph, IRError, ParseError, VerifyError, emit, load_module, parse_graph,
                       past_from_present, print_graph, run_logits, save_module, verify)
from splice.ir.core import Node, Value
from splice.ir.nx import to_networkx


def tiny(seed: int = 0, **over) -> "Module":  # noqa: F821
    torch.manual_seed(seed)
    kw = dict(architecture="llama", vocab_size=50, hidden_size=16, intermediate_size=24,
              num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4, rms_eps=1e-5,
              max_position=64, tie_embeddings=True)
    kw.update(over)
    spec = DecoderSpec(**kw)
    d, f, hd = spec.hidden_size, spec.intermediate_size, spec.head_dim
    w = {"embed.weight": torch.randn(spec.vocab_size, d), "final_norm.weight": 1 + 0.1 * torch.randn(d),
         "rope.inv_freq": 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))}
    if not spec.tie_embeddings:
        w["lm_head.weight"] = torch.randn(spec.vocab_size, d)
    for i in range(spec.num_layers):
        p = f"layers.{i}."
        shapes = {"attn_norm": (d,), "mlp_norm": (d,), "attn.q_proj": (spec.num_heads * hd, d),
                  "attn.k_proj": (spec.num_kv_heads * hd, d), "attn.v_proj": (spec.num_kv_heads * hd, d),
                  "attn.o_proj": (d, spec.num_heads * hd), "mlp.gate_proj": (f, d),
                  "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}
        if spec.qk_norm:
            shapes |= {"attn.q_norm": (hd,), "attn.k_norm": (hd,)}
        for name, shape in shapes.items():
            w[p + name + ".weight"] = (1 + 0.1 * torch.randn(shape)) if len(shape) == 1 \
                else 0.3 * torch.randn(shape)
    return build_decoder(spec, w, origin="test")


def test_round_trip_text_is_identical():
    m = tiny(qk_norm=True, final_softcap=30.0)
    text = print_graph(m.graph)
    g = parse_graph(text)
    assert print_graph(g) == text
    verify(m)


def test_clone_is_deep_and_equal():
    m = tiny()
    c = m.clone()
    assert print_graph(c.graph) == print_graph(m.graph)
    c.weights["embed.weight"].zero_()
    assert m.weights["embed.weight"].abs().sum() > 0


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_kv_cache_matches_full_sequence(dtype, tol):
    m = tiny(seed=1, sliding_window=3, qk_norm=True)
    ids = torch.randint(0, 50, (2, 9))
    full = run_logits(m, ids, dtype)["logits"]
    out = run_logits(m, ids[:, :4], dtype)
    pieces = [out["logits"]]
    for t in range(4, 9):
        out = run_logits(m, ids[:, t:t + 1], dtype, past=past_from_present(out))
        pieces.append(out["logits"])
    assert (torch.cat(pieces, 1) - full).abs().max().item() < tol


def test_intermediate_capture():
    from splice.ir import Interpreter, default_feeds

    m = tiny()
    ids = torch.randint(0, 50, (1, 5))
    out = Interpreter(m, torch.float64).run(default_feeds(m, ids, None, torch.float64),
                                            capture=["h.0"])
    assert out["h.0"].shape == (1, 5, 16)


def test_save_load(tmp_path):
    m = tiny(tie_embeddings=False)
    save_module(m, tmp_path / "m")
    m2 = load_module(tmp_path / "m")
    verify(m2)
    ids = torch.randint(0, 50, (1, 6))
    assert torch.equal(run_logits(m, ids)["logits"], run_logits(m2, ids)["logits"])
    assert m2.config == m.config


def test_networkx_view():
    m = tiny()
    g = to_networkx(m.graph)
    import networkx as nx

    assert nx.is_directed_acyclic_graph(g)
    assert g.number_of_nodes() == len(m.graph.nodes) + len(m.graph.inputs)


# -- the verifier catches each broken invariant --------------------------------------------------

def test_verify_catches_wrong_order():
    m = tiny()
    g = m.graph
    g.nodes[1], g.nodes[2] = g.nodes[2], g.nodes[1]
    with pytest.raises(VerifyError, match="before it is defined"):
        verify(m)


def test_verify_catches_stale_use_list():
    m = tiny()
    n = m.graph.find(op="add")[0]
    n.inputs[1] = m.graph.inputs[0]  # bypasses replace_input
    with pytest.raises(VerifyError, match="use-list"):
        verify(m)


def test_verify_catches_bad_shape():
    m = tiny()
    n = m.graph.find(op="linear")[0]
    n.output.shape = (n.output.shape[0], n.output.shape[1], 999)
    with pytest.raises(VerifyError, match="shape rule"):
        verify(m)


def test_verify_catches_wrong_dtype():
    m = tiny()
    n = m.graph.find(op="silu")[0]
    n.output.dtype = "f16"
    with pytest.raises(VerifyError, match="shape rule"):
        verify(m)


def test_verify_catches_missing_weight_and_mismatch():
    m = tiny()
    m.weights["final_norm.weight"] = torch.ones(3)
    with pytest.raises(VerifyError, match="final_norm.weight"):
        verify(m)
    m = tiny()
    del m.weights["final_norm.weight"]
    with pytest.raises(VerifyError, match="no weight"):
        verify(m)


def test_verify_catches_second_producer_and_duplicate_names():
    m = tiny()
    g = m.graph
    a, b = g.find(op="silu")[:2]
    b.outputs[0].name = a.outputs[0].name
    with pytest.raises(VerifyError, match="named"):
        verify(m)
    with pytest.raises(IRError, match="already has a producer"):
        Node("silu", [g.inputs[0]], [a.output])


def test_verify_catches_bad_attribute_and_unknown_op():
    m = tiny()
    m.graph.find(op="rms_norm")[0].attrs["eps"] = "small"
    with pytest.raises(VerifyError, match="eps"):
        verify(m)
    m = tiny()
    m.graph.find(op="silu")[0].op = "swish"
    with pytest.raises(IRError, match="unknown op 'swish'"):
        verify(m)


def test_verify_catches_undefined_output_and_dead_node_use():
    m = tiny()
    g = m.graph
    g.outputs.append(Value("ghost", "f32", (1,)))
    with pytest.raises(VerifyError, match="ghost"):
        verify(m)


def test_remove_refuses_used_node_and_replace_keeps_uses():
    m = tiny()
    g = m.graph
    silu = g.find(op="silu")[0]
    with pytest.raises(IRError, match="still used"):
        g.remove(silu)
    gate = silu.inputs[0]
    silu.output.replace_all_uses_with(gate)   # mul now reads gate directly
    g.remove(silu)
    verify(m)


def test_emit_checks_arity_and_attrs():
    g = Graph()
    x = g.add_input("x", "f32", ("batch", 8))
    with pytest.raises(IRError, match="takes"):
        emit(g, "add", [x])
    with pytest.raises(IRError, match="unknown attributes"):
        emit(g, "silu", [x], {"alpha": 1.0})
    with pytest.raises(IRError, match="missing attribute"):
        emit(g, "softcap", [x])
    w = g.const("w", "f32", (4, 9))
    with pytest.raises(IRError, match="last dim"):
        emit(g, "linear", [x, w])


@pytest.mark.parametrize("text,msg", [
    ("", "line 1"),
    ("graph() {\n  return\n", "expected '}'"),
    ("graph(%x: f32[2]) {\n  %y: f32[2] = silu(%z) {} {}\n  return %y\n}", "undefined value %z"),
    ("graph(%x: f32[2]) {\n  %y: f32[2] = silu(%x) {bad} {}\n  return %y\n}", "bad attribute"),
    ("graph(%x: f32[2]) {\n  %y: f32[2] = frob(%x) {} {}\n  return %y\n}", "unknown op"),
    ("graph(%x: f32[2]) {\n  %y: f32[2] = silu(%x) {} {}\n}", "missing 'return'"),
    ("graph(%x: f32[2]) {\n  %x: f32[2] = silu(%x) {} {}\n  return %x\n}", "duplicate"),
])
def test_parser_errors_are_clear(text, msg):
    with pytest.raises(IRError, match=msg):
        parse_graph(text)
