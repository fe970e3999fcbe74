"""ONNX lowering: ONNX Runtime's logits and KV cache equal the reference interpreter's, for a
prefill and 32 cached decode steps, on tiny random models covering every attribute the rules handle,
with ONNX Runtime's graph optimisations off (so a fusion cannot hide a lowering bug) and on."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from splice.backends.onnx import RULES, LoweringError, lower, save
from splice.ir import (
    Graph,
    Interpreter,
    ModelConfig,
    Module,
    emit,
    verify,
)

from tests.backends.trajectory import reference_trajectory, worst_difference
from tests.tiny import VARIANTS, add_extra_ops, tiny_module

TOL = 1e-4
PROMPT = 12
DECODE = 32
LEVELS = {"off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
          "on": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def session(path, level: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = LEVELS[level]
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_step(sess, module, ids: np.ndarray, past: dict[str, np.ndarray] | None):
    b, s = ids.shape
    feeds = {"input_ids": ids.astype(np.int64)}
    past_len = 0 if past is None else next(iter(past.values())).shape[2]
    feeds["position_ids"] = np.broadcast_to(np.arange(past_len, past_len + s), (b, s)).copy()
    for v in module.graph.inputs:
        if v.name.startswith("past."):
            feeds[v.name] = past[v.name] if past is not None else \
                np.zeros((b, v.shape[1], 0, v.shape[3]), np.float32)
    if "attention_mask" in {i.name for i in sess.get_inputs()}:  # contrib mode's GQA lengths
        feeds["attention_mask"] = np.ones((b, past_len + s), np.int64)
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(None, feeds)))
    return out["logits"], {"past." + k[8:]: v for k, v in out.items() if k.startswith("present.")}


def compare(sess, module, traj) -> float:
    """Run the trajectory's inputs through ONNX Runtime, feeding its own cache back; returns
    the largest difference from the reference over logits and present KV."""
    past = None

    def step(ids):
        nonlocal past
        logits, past = ort_step(sess, module, ids, past)
        return logits, past
    return worst_difference(traj, step)


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    """variant -> (module, model path, reference trajectory); built once for both opt levels."""
    cache = {}

    def get(name: str):
        if name not in cache:
            module = tiny_module(seed=3, **VARIANTS[name]) if name in VARIANTS else \
                add_extra_ops(tiny_module(seed=4, intermediate_size=256))
            verify(module)
            path = save(lower(module), tmp_path_factory.mktemp(name))
            ids = torch.randint(0, module.config.vocab_size, (1, PROMPT),
                                generator=torch.Generator().manual_seed(5))
            cache[name] = (module, path, reference_trajectory(module, ids, DECODE))
        return cache[name]
    return get


@pytest.mark.parametrize("level", sorted(LEVELS))
@pytest.mark.parametrize("variant", [*VARIANTS, "extra_ops"])
def test_prefill_and_32_decode_steps_match_interpreter(lowered, variant, level):
    module, path, traj = lowered(variant)
    worst = compare(session(path, level), module, traj)
    assert worst <= TOL, f"{variant} opt {level}: max abs difference {worst:.3g}"


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_batch_of_two_with_cache(lowered, level):
    module, path, _ = lowered("gemma2")
    ids = torch.randint(0, module.config.vocab_size, (2, 9),
                        generator=torch.Generator().manual_seed(6))
    traj = reference_trajectory(module, ids, 4)
    assert compare(session(path, level), module, traj) <= TOL


def test_decode_query_sees_the_whole_cache(lowered):
    """A decode step at position P attends to all P+1 keys: changing the oldest cached value
    changes the output (a mask that hid it would not)."""
    module, path, traj = lowered("llama_gqa")
    sess = session(path, "off")
    _, past = ort_step(sess, module, traj[0][0], None)
    tok = traj[1][0]
    base, _ = ort_step(sess, module, tok, past)
    changed = {k: v.copy() for k, v in past.items()}
    changed["past.0.value"][:, :, 0] += 1.0
    moved, _ = ort_step(sess, module, tok, changed)
    assert np.abs(moved - base).max() > 1e-3


def test_checker_passes_and_weights_are_external(lowered):
    module, path, _ = lowered("gemma2")
    onnx.checker.check_model(str(path), full_check=True)
    data = path.with_name("model.onnx.data")
    assert data.stat().st_size > path.stat().st_size
    proto = onnx.load(str(path), load_external_data=False)
    assert [i.name for i in proto.graph.input] == [v.name for v in module.graph.inputs]
    assert [o.name for o in proto.graph.output] == [v.name for v in module.graph.outputs]
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[2].type.tensor_type.shape.dim]
    assert dims == ["batch", 4, "past", 16] or dims == ["batch", 2, "past", 16]
    assert {o.domain or "" for o in proto.opset_import} == {""}


def test_tied_table_is_stored_once(lowered):
    module, path, _ = lowered("qwen3_qknorm_tied")
    proto = onnx.load(str(path), load_external_data=False)
    v, h = module.config.vocab_size, module.config.hidden_size
    big = [t.name for t in proto.graph.initializer if sorted(t.dims) == sorted([v, h])]
    assert big == ["embed.weight.T"]


def test_op_without_rule_names_the_op_and_node():
    module = tiny_module()
    table = {k: fn for k, fn in RULES.items() if k != "rotary"}
    with pytest.raises(LoweringError, match=r"\['rotary'\].*role 'attn.q_rotary', layer 0"):
        lower(module, rules=table)


def test_every_ir_op_has_a_rule():
    from splice.ir import OPS

    assert set(OPS) <= set(RULES), sorted(set(OPS) - set(RULES))


@pytest.mark.parametrize("width,attrs,factors", [
    (1536, {"size": 1536}, [12, 128]),               # SmolLM2's MLP: 12 (Paley I) x 128
    (11008, {"size": 11008, "scale": 0.5}, [64, 172]),  # LLaMA-2's MLP: 172 (Williamson) x 64
    (576, {"size": 576, "block": 64}, [64]),         # block-diagonal
    (4 * 36, {"size": 36, "group": 4}, [36]),        # per head, a Paley II base
])
def test_hadamard_matches_reference(width, attrs, factors):
    g = Graph()
    x = g.add_input("x", "f32", ("batch", "seq", width))
    g.outputs = [emit(g, "hadamard", [x], attrs, name="y", role="rot").output]
    config = ModelConfig("test", 1, width, 0, 1, 1, 1, 1, 1)
    module = Module(g, {}, config)
    verify(module)
    feed = torch.randn(2, 3, width, generator=torch.Generator().manual_seed(0))
    ref = Interpreter(module).run({"x": feed})["y"].numpy()
    model = lower(module)
    proto = ir.to_proto(model).SerializeToString()
    for level in LEVELS.values():
        opts = ort.SessionOptions()
        opts.graph_optimization_level = level
        got = ort.InferenceSession(proto, opts, providers=["CPUExecutionProvider"]).run(
            None, {"x": feed.numpy()})[0]
        assert np.abs(got - ref).max() <= 1e-5
    sizes = sorted(v.const_value.shape[0] for n in model.graph if n.op_type == "MatMul"
                   for v in n.inputs if v.const_value is not None)
    assert sizes == factors  # the matrices the size rule's strategy multiplies by
