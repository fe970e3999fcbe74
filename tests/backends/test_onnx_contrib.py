"""ONNX lowering with ONNX Runtime's contrib ops (backends/onnx/contrib.py) and the standard-ops-only
mode: logits and KV cache equal the reference interpreter's for a prefill and 32 decode steps on
every tiny variant, with ONNX Runtime's optimisations off and on (STYLE 14); the fused ops are
really there; what GroupQueryAttention cannot express falls back per node; the export records the
mode."""

from __future__ import annotations

import json
import logging
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from splice.backends.onnx import export, lower, save
from splice.backends.onnx.contrib import rule_table
from splice.backends.onnx.quant import MS_DOMAIN
from splice.errors import InputError
from splice.ir import verify
from splice.passes.infra.base import PassContext
from splice.passes.fold_norms import FoldNormsPass
from splice.passes.quantize_weights import QuantizeWeightsPass

from tests.backends.test_onnx import DECODE, LEVELS, PROMPT, TOL, compare, reference_trajectory, \
    session
from tests.tiny import VARIANTS, add_extra_ops, tiny_module


def quantized(module, **settings):
    return QuantizeWeightsPass(**{"method": "rtn", "bits": 4, "group_size": 16, **settings})(
        module, PassContext()).module


def build(name: str):
    if name == "extra_ops":
        return add_extra_ops(tiny_module(seed=4, intermediate_size=256))
    if name == "w4_g16_lmhead4":
        return quantized(tiny_module(seed=3, tie_embeddings=True), lm_head="int4")
    if name == "folded_norms":  # every norm weightless, its scale in the next linears
        return FoldNormsPass()(tiny_module(seed=3)).module
    return tiny_module(seed=3, **VARIANTS[name])


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    """(variant, ops) -> (module, model path, op counts, reference trajectory)."""
    cache, refs = {}, {}

    def get(name: str, ops: str):
        if (name, ops) not in cache:
            module = build(name)
            verify(module)
            # accuracy_level 0: float32 compute in MatMulNBits, so the comparison is exact
            model = lower(module, rules=rule_table(ops, accuracy_level=0))
            counts = Counter((n.domain, n.op_type) for n in model.graph)
            path = save(model, tmp_path_factory.mktemp(f"{name}_{ops}"))
            if name not in refs:
                ids = torch.randint(0, module.config.vocab_size, (1, PROMPT),
                                    generator=torch.Generator().manual_seed(5))
                refs[name] = reference_trajectory(module, ids, DECODE)
            cache[name, ops] = (module, path, counts, refs[name])
        return cache[name, ops]
    return get


ALL = [*VARIANTS, "extra_ops", "w4_g16_lmhead4", "folded_norms"]


@pytest.mark.parametrize("level", sorted(LEVELS))
@pytest.mark.parametrize("variant", ALL)
def test_contrib_prefill_and_32_decode_steps_match_interpreter(lowered, variant, level):
    module, path, _, traj = lowered(variant, "contrib")
    worst = compare(session(path, level), module, traj)
    assert worst <= TOL, f"{variant} contrib opt {level}: max abs difference {worst:.3g}"


@pytest.mark.parametrize("variant", ["gemma2", "w4_g16_lmhead4"])
def test_standard_mode_matches_interpreter_with_onnx_ops_only(lowered, variant):
    module, path, counts, traj = lowered(variant, "standard")
    assert {d for d, _ in counts} == {""}, counts
    onnx.checker.check_model(str(path), full_check=True)
    for level in LEVELS:
        assert compare(session(path, level), module, traj) <= TOL


def test_contrib_ops_replace_attention_rotary_and_residual_norms(lowered):
    module, path, counts, _ = lowered("llama_gqa", "contrib")
    layers = module.config.num_layers
    assert counts[MS_DOMAIN, "GroupQueryAttention"] == layers
    # both rotaries of each layer are applied inside GQA; the dead Identities they left are gone
    assert counts[MS_DOMAIN, "RotaryEmbedding"] == 0 and counts["", "Identity"] == 0
    gqa = [n for n in onnx.load(str(path)).graph.node if n.op_type == "GroupQueryAttention"]
    assert all({a.name: a.i for a in n.attribute}["do_rotary"] == 1 for n in gqa)
    assert all(n.input[9] == "position_ids" for n in gqa)
    # every residual add but the last layer's MLP one feeds a norm: 2 per layer, the final norm
    # takes the last; layer 0's attention norm reads the embedding and stays standard
    assert counts[MS_DOMAIN, "SkipSimplifiedLayerNormalization"] == 2 * layers
    assert counts["", "Softmax"] == 0 and counts["", "Where"] == 0  # no explicit mask left
    assert counts["", "ReduceMean"] == 1
    onnx.checker.check_model(str(path))  # contrib domains are skipped, the rest is checked


def test_a_weightless_standalone_norm_becomes_one_node_at_run_time(lowered, tmp_path):
    """Layer 0's attention norm reads the embedding (no add to fuse with); weightless after
    fold_norms, it is lowered with a Mul by ones, which ONNX Runtime's optimiser needs to fuse
    the five standard nodes into SimplifiedLayerNormalization."""
    _, path, counts, _ = lowered("folded_norms", "contrib")
    assert counts["", "ReduceMean"] == 1
    opts = ort.SessionOptions()
    opts.graph_optimization_level = LEVELS["on"]
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    ops = Counter(n.op_type for n in optimized.graph.node)
    assert ops["SimplifiedLayerNormalization"] == 1 and ops["ReduceMean"] == 0


def test_partial_rotary_stays_a_separate_op(lowered):
    module, _, counts, _ = lowered("partial_interleaved", "contrib")
    assert counts[MS_DOMAIN, "RotaryEmbedding"] == 2 * module.config.num_layers


def test_projections_sharing_an_input_are_packed_and_gqa_reads_qkv_packed(lowered):
    module, path, counts, _ = lowered("w4_g16_lmhead4", "contrib")
    layers = module.config.num_layers
    # per layer: q/k/v packed, o, gate/up packed, down; plus the lm_head
    assert counts[MS_DOMAIN, "MatMulNBits"] == 4 * layers + 1
    proto = onnx.load(str(path), load_external_data=False)
    gqa = [n for n in proto.graph.node if n.op_type == "GroupQueryAttention"]
    assert all(n.input[1] == "" and n.input[2] == "" for n in gqa)  # packed q/k/v
    assert counts["", "Split"] == layers  # gate/up only: GQA splits q/k/v itself
    cfg = module.config
    widths = sorted({a.name: a.i for a in n.attribute}["N"] for n in proto.graph.node
                    if n.op_type == "MatMulNBits")
    n_qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    assert n_qkv in widths and 2 * cfg.intermediate_size in widths


def test_quantized_linears_become_matmulnbits_only_in_contrib_mode(lowered):
    _, _, contrib, _ = lowered("w4_g16_lmhead4", "contrib")
    _, _, standard, _ = lowered("w4_g16_lmhead4", "standard")
    assert contrib[MS_DOMAIN, "MatMulNBits"] > 0
    assert standard[MS_DOMAIN, "MatMulNBits"] == 0 and standard["", "BitShift"] > 0


def test_non_causal_attention_falls_back_to_the_standard_rule_and_says_why(caplog, tmp_path):
    module = tiny_module(seed=3)
    first = module.graph.find(op="attention")[0]
    first.attrs["causal"] = False
    verify(module)
    with caplog.at_level(logging.INFO, logger="splice.backends.onnx.contrib"):
        model = lower(module, rules=rule_table("contrib"))
    assert "GroupQueryAttention is always causal" in caplog.text and "layer 0" in caplog.text
    counts = Counter(n.op_type for n in model.graph)
    assert counts["GroupQueryAttention"] == module.config.num_layers - 1
    ids = torch.randint(0, module.config.vocab_size, (1, 7),
                        generator=torch.Generator().manual_seed(2))
    traj = reference_trajectory(module, ids, 3)
    assert compare(session(save(model, tmp_path), "off"), module, traj) <= TOL


def test_head_dim_gqa_cannot_run_falls_back_and_the_cache_is_not_shared(caplog, tmp_path):
    module = tiny_module(seed=3, num_heads=8, num_kv_heads=4, head_dim=8)
    with caplog.at_level(logging.INFO, logger="splice.backends.onnx.contrib"):
        path = export(module, tmp_path / "a")
    assert "head_dim 8 is not a multiple of 16" in caplog.text
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["io"]["share_buffer"] is False and "attention_mask" not in manifest["io"]
    proto = onnx.load(str(path / "model.onnx"), load_external_data=False)
    assert not any(n.op_type == "GroupQueryAttention" for n in proto.graph.node)
    ids = torch.randint(0, module.config.vocab_size, (1, 7),
                        generator=torch.Generator().manual_seed(2))
    assert compare(session(path / "model.onnx", "on"), module,
                   reference_trajectory(module, ids, 3)) <= TOL


def test_accuracy_level_4_is_close_to_float_compute(lowered, tmp_path):
    """int8 activations in MatMulNBits: a small, measured error, not an exact match."""
    module, path0, _, traj = lowered("w4_g16_lmhead4", "contrib")
    path4 = save(lower(module, rules=rule_table("contrib", accuracy_level=4)), tmp_path)
    ids = traj[0][0]
    from tests.backends.test_onnx import ort_step

    l0, _ = ort_step(session(path0, "on"), module, ids, None)
    l4, _ = ort_step(session(path4, "on"), module, ids, None)
    rel = np.sqrt(((l4 - l0) ** 2).mean() / (l0 ** 2).mean())
    assert 0 < rel < 0.05


def test_export_records_the_mode_and_refuses_unknown_ones(tmp_path):
    module = tiny_module(seed=1)
    for ops in ("contrib", "standard"):
        manifest = json.loads((export(module, tmp_path / ops, ops=ops) / "manifest.json")
                              .read_text())
        assert manifest["onnx"]["ops"] == ops
        assert (manifest["onnx"]["accuracy_level"] is None) == (ops == "standard")
    default = export(module, tmp_path / "default")
    assert json.loads((default / "manifest.json").read_text())["onnx"]["ops"] == "contrib"
    genai = json.loads((default / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 2
    assert genai["model"]["decoder"]["session_options"].get(
        "session.intra_op.allow_spinning") is None
    calm = export(module, tmp_path / "calm", spinning=False)
    assert json.loads((calm / "manifest.json").read_text())["session"]["allow_spinning"] is False
    genai = json.loads((calm / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["session_options"]["session.intra_op.allow_spinning"] == "0"
    from splice.runtime import load

    art = load(calm)
    assert art.session.get_session_options().get_session_config_entry(
        "session.intra_op.allow_spinning") == "0"
    with pytest.raises(InputError, match="spinning='no'"):
        load(calm, spinning="no")
    with pytest.raises(InputError, match=r"ops='fast'; accepted: contrib, standard"):
        export(module, tmp_path / "bad", ops="fast")
    with pytest.raises(InputError, match="accuracy_level 7"):
        export(module, tmp_path / "bad", accuracy_level=7)
    assert not (tmp_path / "bad").exists()
