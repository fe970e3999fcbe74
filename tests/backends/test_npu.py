"""NPU backend: static-shape lowering equals the reference, the QDQ form is what the HTP takes, the
pre-flight names the nodes it will not take and the pass that made them, and (where the
onnxruntime-qnn plugin loads) the artefact runs on the HTP backend with CPU fallback disabled,
close to ONNX Runtime CPU on the same QDQ graph, and reloads its EPContext in a fresh process.

The HTP here is the simulator the onnxruntime-qnn wheel ships for x86-64; tests that need it skip
with the reason the plugin gave when it cannot load."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from benchmarks.npu_compare import compare, cpu_decoder, greedy
from splice.backends.npu import PreflightError, StaticShapes, check, export, lower_static
from splice.backends.npu.export import host_table
from splice.backends.npu.qdq import calibrate, quantize_graph
from splice.errors import InputError
from splice.ir import run_logits
from splice.passes.infra.base import PassContext
from splice.passes.quantize_activations import QuantizeActivationsPass
from splice.passes.quantize_weights import QuantizeWeightsPass
from splice.runtime import load
from splice.errors import ArtefactError
from splice.runtime.npu_runtime import (HostTable, NpuUnavailable, StaticDecoder, _check_io,
                                        qnn_devices, session_runner)

from tests.paths import STORIES, TINYSTORIES, needs_stories
from tests.tiny import VARIANTS, VOCAB, tiny_module

CHUNK, CONTEXT = 8, 48


def _plugin() -> str | None:
    try:
        qnn_devices()
    except NpuUnavailable as e:
        return str(e)
    return None


needs_htp = pytest.mark.skipif(_plugin() is not None, reason=f"the QNN plugin cannot load: "
                               f"{_plugin()}")


def _calib(seed: int = 0, rows: int = 4, n: int = CONTEXT) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (rows, n))


def _float_graphs(module, chunk=CHUNK, context=CONTEXT):
    return {s: ir.serde.serialize_model(lower_static(module, StaticShapes(s, context)))
            for s in (chunk, 1)}


def _io(module, context=CONTEXT, chunk=CHUNK):
    from splice.backends.npu.export import _io
    return _io(_float_graphs(module, chunk, context)[chunk], chunk, context, -64.0)


def _exact_table(module) -> HostTable:
    """The module's embedding table in float32 as a host table (scale 1 per row): the graphs
    then see exactly the reference's rows."""
    node = next(n for n in module.graph.nodes if n.op == "embedding")
    w = module.weight(node.inputs[1]).detach().float().numpy()
    return HostTable(w, np.ones(len(w), np.float32))


# -- lowering (no plugin needed) -------------------------------------------------------------

@pytest.mark.parametrize("variant", ["llama_gqa", "gemma2", "partial_interleaved",
                                     "qwen3_qknorm_tied"])
def test_static_float_graphs_match_interpreter(variant):
    """Chunked prefill (a padded last chunk) then cached decode through the static float graphs
    on ORT CPU, optimisations off, equals the reference on the whole sequence."""
    module = tiny_module(seed=1, **VARIANTS[variant])
    graphs = _float_graphs(module)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    dec = StaticDecoder(_io(module), {}, _exact_table(module))
    dec.runs = {s: session_runner(ort.InferenceSession(g.SerializeToString(), so,
                                                       providers=["CPUExecutionProvider"]),
                                  dec.outputs) for s, g in graphs.items()}
    ids = np.random.default_rng(2).integers(0, 256, 30).tolist()
    cache = dec.empty()
    got = np.concatenate([dec.forward(ids[:19], cache)] + [dec.step([t], cache)
                                                          for t in ids[19:]])
    ref = run_logits(module, torch.tensor([ids]))["logits"][0].numpy()
    assert np.abs(got - ref).max() < 1e-4
    assert cache.length == 30


def test_static_graphs_have_fixed_shapes_and_no_int64_inputs():
    model = _float_graphs(tiny_module())[CHUNK]
    ins = {i.name: i for i in model.graph.input}
    # the host gathers the embedding rows: no ids, no table in the graph
    assert "input_ids" not in ins and ins["position_ids"].type.tensor_type.elem_type == \
        TensorProto.INT32
    assert [d.dim_value for d in ins["input_embeds"].type.tensor_type.shape.dim] == [1, CHUNK, 64]
    assert not any(list(t.dims) == [VOCAB, 64] for t in model.graph.initializer)
    assert [d.dim_value for d in ins["past.0.key"].type.tensor_type.shape.dim] == [1, 2, CONTEXT,
                                                                                 16]
    assert [d.dim_value for d in ins["attention_mask"].type.tensor_type.shape.dim] == [
        1, 1, CHUNK, CONTEXT + CHUNK]
    outs = {o.name for o in model.graph.output}
    assert {"logits", "new.0.key", "new.1.value"} <= outs
    assert not {"Range", "Shape", "Cast"} & {n.op_type for n in model.graph.node}


def test_host_table_layouts_and_per_row_int8_bound():
    """The host table's rows are the float table's to half a step of their row's scale, read the
    same from [rows, width] codes and from their transpose (a tied lm_head's [width, rows])."""
    module = tiny_module(seed=4)
    w = _exact_table(module).codes
    table = host_table(module)
    assert table.codes.dtype == np.int8 and table.scales.shape == (len(w),)
    ids = np.array([0, 5, 5, 257, 3])
    assert np.all(np.abs(table(ids) - w[ids]) <= table.scales[ids, None] / 2 * (1 + 1e-6))
    columns = HostTable(np.ascontiguousarray(table.codes.T), table.scales, "columns")
    assert np.array_equal(columns(ids), table(ids))
    with pytest.raises(ValueError, match="accepted: rows, columns"):
        HostTable(table.codes, table.scales, "diagonal")
    io = _io(module)
    with pytest.raises(ValueError, match="input_embeds"):
        StaticDecoder(io, {})


def test_qdq_graph_quantizes_every_compute_input():
    module = tiny_module()
    graphs = _float_graphs(module)
    io = _io(module)
    ranges = calibrate(graphs, io, _calib().tolist(), embed=host_table(module))
    tied = {x[kv]: x[f"new_{kv}"] for x in io["layers"] for kv in ("key", "value")}
    q = quantize_graph(graphs[CHUNK], ranges, tied_inputs=tied)
    producer = {o: n for n in q.graph.node for o in n.output}
    inits = {t.name: t for t in q.graph.initializer}
    for n in q.graph.node:
        if n.op_type in ("MatMul", "Add", "Mul", "Softmax", "SimplifiedLayerNormalization"):
            for x in n.input:
                assert x in inits and inits[x].data_type != TensorProto.FLOAT or \
                    producer[x].op_type == "DequantizeLinear", (n.name, x)
    weights = [t for t in q.graph.initializer if t.name.endswith("/w8")]
    # 2 layers x 7 linears, the lm_head and the rotary pairing matrix
    assert len(weights) == 16 and all(t.data_type == TensorProto.INT8 for t in weights)
    # keys and values (MatMul's computed second operands) and the cache are signed int16; this
    # step's keys are requantized onto the cache's grid before the Concat
    zero = {t.name: t for t in q.graph.initializer if t.name.endswith("/zero")}
    assert zero["past.0.key/zero"].data_type == TensorProto.INT16
    assert zero["attn_norm.0/zero"].data_type == TensorProto.UINT16
    concat = next(n for n in q.graph.node if n.op_type == "Concat")
    assert concat.input[0] == "past.0.key/dq" and concat.input[1].endswith("/rq/dq")
    report = check(q)
    assert report.ok and not report.issues


def test_preflight_names_unsupported_nodes_and_their_pass(tmp_path):
    """Dynamic per-token activation quantization (made by quantize_activations) is arithmetic in
    the graph: the export fails before compiling, naming the nodes, their layer and the pass, and
    leaves the JSON report beside the artefact it did not write."""
    module = QuantizeActivationsPass(mode="dynamic_per_token").call(tiny_module(),
                                                                   PassContext()).module
    out = tmp_path / "art"
    with pytest.raises(PreflightError) as e:
        export(module, out, calibration=_calib(), chunk=CHUNK, context=CONTEXT)
    assert "quantize_activations" in str(e.value) and "layer 0" in str(e.value)
    issues = [i for r in e.value.reports for i in r.errors]
    assert issues and all(i.origin == "quantize_activations" for i in issues)
    assert {i.role for i in issues} >= {"attn.q_proj.act_quant"}
    assert not out.exists()
    saved = json.loads((tmp_path / "art.preflight.json").read_text())
    assert saved["reports"][0]["errors"] == len(e.value.reports[0].errors)
    assert "Round" in e.value.report_text


def test_preflight_rules_on_hand_built_graph():
    """One graph, one node per rule: op (Erf), rank 6, dynamic dim, per-channel activation
    scale, asymmetric per-channel weight."""
    f = TensorProto.FLOAT
    nodes = [helper.make_node("Erf", ["x"], ["e"], name="erf"),
             helper.make_node("Reshape", ["e", "shp"], ["r"], name="rank6"),
             helper.make_node("Relu", ["d"], ["dy"], name="dynamic"),
             helper.make_node("QuantizeLinear", ["x", "cs", "cz"], ["xq"], name="perchan",
                              axis=-1),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="asym", axis=1)]
    inits = [numpy_helper.from_array(np.array([1, 1, 1, 2, 2, 2], np.int64), "shp"),
             numpy_helper.from_array(np.full(8, 0.1, np.float32), "cs"),
             numpy_helper.from_array(np.zeros(8, np.uint8), "cz"),
             numpy_helper.from_array(np.ones((8, 4), np.int8), "w"),
             numpy_helper.from_array(np.full(4, 0.1, np.float32), "ws"),
             numpy_helper.from_array(np.full(4, 3, np.int8), "wz")]
    for n in nodes:
        n.metadata_props.add(key="splice.origin", value=f"pass_{n.name}")
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, [1, 8]),
                                       helper.make_tensor_value_info("d", f, ["n", 8])],
                          [helper.make_tensor_value_info(o, t, None) for o, t in (
                              ("r", f), ("dy", f), ("xq", TensorProto.UINT8), ("wd", f))], inits)
    report = check(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]))
    kinds = {i.node: (i.kind, i.origin) for i in report.errors}
    assert kinds["erf"] == ("op", "pass_erf")
    assert kinds["rank6"] == ("rank", "pass_rank6")
    assert kinds["dynamic"] == ("shape", "pass_dynamic")
    assert kinds["perchan"] == ("scale", "pass_perchan")
    assert kinds["asym"] == ("scale", "pass_asym")
    assert json.loads(json.dumps(report.to_json()))["errors"] == len(report.errors)


def test_export_refuses_missing_calibration_and_bad_settings(tmp_path):
    with pytest.raises(InputError, match="calibration"):
        export(tiny_module(), tmp_path / "a", chunk=CHUNK, context=CONTEXT)
    with pytest.raises(InputError, match="chunk"):
        export(tiny_module(), tmp_path / "a", calibration=_calib(), chunk=0)
    with pytest.raises(InputError, match="htp_arch"):
        export(tiny_module(), tmp_path / "a", calibration=_calib(), htp_arch="99")


# -- on the HTP ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_art(tmp_path_factory):
    if _plugin() is not None:
        pytest.skip(f"the QNN plugin cannot load: {_plugin()}")
    module = QuantizeWeightsPass(method="rtn", bits=8, group_size=0, symmetric=True).call(
        tiny_module(seed=5), PassContext()).module
    path = export(module, tmp_path_factory.mktemp("npu") / "art", calibration=_calib(),
                  chunk=CHUNK, context=CONTEXT)
    return module, path


@needs_htp
def test_artefact_is_one_partition_per_graph_and_records_figures(tiny_art):
    _, path = tiny_art
    npu = json.loads((path / "manifest.json").read_text())["npu"]
    assert set(npu["graphs"]) == {str(CHUNK), "1"}
    for fig in npu["figures"].values():
        assert fig["partitions"] == 1
        acts = fig["activation_types"]
        assert set(acts) == {"uint16", "int16"}  # int16: keys, values and the cache
        assert sum(acts.values()) == fig["qdq_ops"]["QuantizeLinear"]
        assert fig["weight_bytes"]["int8"] > 0 and fig["context_binary_bytes"] > 0
    for g in npu["graphs"].values():
        ctx = onnx.load(str(path / g["context"]), load_external_data=False)
        assert [n.op_type for n in ctx.graph.node] == ["EPContext"]


@needs_htp
@pytest.mark.parametrize("case", ["gemma2", "partial_interleaved", "qwen3_qknorm_tied",
                                  "w4_g32"])
def test_preflight_clean_graphs_compile_to_one_partition(case, tmp_path):
    """The pre-flight's verdict confirmed on the HTP: every attribute variant (sliding windows,
    softcaps, interleaved partial rotary, q/k norms, tied tables) and blocked int4 weights pass
    it, and each then compiles into one HTP partition with CPU fallback disabled (export checks
    the EPContext model and fails otherwise)."""
    if case == "w4_g32":
        module = QuantizeWeightsPass(method="rtn", bits=4, group_size=32, symmetric=True).call(
            tiny_module(seed=2), PassContext()).module
    else:
        module = tiny_module(seed=2, **VARIANTS[case])
    path = export(module, tmp_path / "a", calibration=_calib(), chunk=CHUNK, context=CONTEXT)
    figures = json.loads((path / "manifest.json").read_text())["npu"]["figures"]
    assert [f["partitions"] for f in figures.values()] == [1, 1]
    if case == "w4_g32":
        assert figures["decode"]["weight_bytes"]["int4"] > 0


@needs_htp
def test_htp_close_to_cpu_on_the_same_qdq_graph_and_to_reference(tiny_art):
    module, path = tiny_art
    art = load(path)
    ids = np.random.default_rng(7).integers(0, 256, 30).tolist()
    c = compare(module, art, ids, prompt=20)
    assert c["htp_vs_cpu_qdq"]["rel_rms"] < 0.01
    assert c["htp_vs_cpu_qdq"]["argmax_agree"] >= 0.9
    assert c["cpu_qdq_vs_reference"]["rel_rms"] < 0.05
    assert c["htp_vs_reference"]["argmax_agree"] >= 0.9


@needs_htp
@pytest.mark.parametrize("case", ["qwen3_qknorm_tied", "llama_gqa"])
def test_tied_table_is_the_lm_heads_codes_and_each_weight_is_stored_once(case, tmp_path):
    """The host gathers embedding rows from int8 codes: a tied table from the lm_head's own codes
    (layout columns: no second copy), an untied one from rows of its own; the prefill and decode
    graphs point at one weights.bin that holds each of their weights once."""
    module = QuantizeWeightsPass(method="rtn", bits=8, group_size=0, symmetric=True).call(
        tiny_module(seed=3, **VARIANTS[case]), PassContext()).module
    path = export(module, tmp_path / "a", calibration=_calib(), chunk=CHUNK, context=CONTEXT)
    emb = json.loads((path / "manifest.json").read_text())["io"]["embedding"]
    tied = case.endswith("tied")
    assert emb["layout"] == ("columns" if tied else "rows")
    refs: dict[str, set] = {}
    for name in (f"prefill{CHUNK}", "decode"):
        m = onnx.load(str(path / f"{name}.onnx"), load_external_data=False)
        for t in m.graph.initializer:
            if t.data_location == TensorProto.EXTERNAL:
                ext = {e.key: e.value for e in t.external_data}
                assert ext["location"] == "weights.bin"
                refs.setdefault(t.name, set()).add((int(ext["offset"]), int(ext["length"])))
    # the weights are one copy for both graphs (a constant of the sequence length's shape,
    # const.*, differs between them and is stored for each)
    weights = [v for k, v in refs.items() if not k.startswith("const.")]
    assert len(weights) > 10 and all(len(v) == 1 for v in weights)
    spans = sorted(set().union(*refs.values()))
    assert all(a[0] + a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # no overlaps
    own = 0 if tied else emb["rows"] * emb["width"] + 4 * emb["rows"]
    size = (path / "weights.bin").stat().st_size
    assert size <= sum(n for _, n in spans) + own + 4096 * (len(spans) + 2)  # padding only
    assert (emb["codes_offset"] in {o for o, _ in spans}) == tied
    table = HostTable.open(path, emb)
    w = _exact_table(module).codes
    assert np.all(np.abs(table(np.arange(len(w))) - w) <= table.scales[:, None] / 2 * (1 + 1e-6))


@needs_htp
def test_hand_edited_embedding_section_is_refused(tiny_art):
    path = tiny_art[1]
    manifest = json.loads((path / "manifest.json").read_text())
    _check_io(path, manifest)
    size = (path / "weights.bin").stat().st_size
    for edit, match in (({"layout": "diagonal"}, "layout"), ({"codes_offset": -1}, "non-negative"),
                        ({"rows": True}, "integers"), ({"scales_offset": size}, "past the end"),
                        ({"file": "other.bin"}, "other.bin")):
        bad = json.loads(json.dumps(manifest))
        bad["io"]["embedding"].update(edit)
        with pytest.raises(ArtefactError, match=match):
            _check_io(path, bad)


@needs_htp
def test_prompt_longer_than_context_is_a_clear_error(tiny_art):
    art = load(tiny_art[1])
    with pytest.raises(InputError, match=f"49 tokens long; the model's context is {CONTEXT}"):
        art.generate(list(range(CONTEXT + 1)), max_new_tokens=1)
    with pytest.raises(InputError, match="exceed the NPU graph's context"):
        art.logits(np.arange(CONTEXT + 1) % 256)
    text = art.generate("hi", max_new_tokens=4)
    assert isinstance(text, str) and art.last_stats["new_tokens"] >= 1


@needs_htp
def test_epcontext_loads_in_a_fresh_process_without_the_source_model(tiny_art, tmp_path):
    """Only the EPContext models and their binaries, copied where no source graph exists, run in
    a new process and give the artefact's logits: nothing was compiled from the source."""
    _, path = tiny_art
    npu = json.loads((path / "manifest.json").read_text())["npu"]
    for g in npu["graphs"].values():
        shutil.copy(path / g["context"], tmp_path)
        for f in path.glob(g["context"].replace(".ctx.onnx", ".ctx_qnn.bin")):
            shutil.copy(f, tmp_path)
    shutil.copy(path / "weights.bin", tmp_path)  # the host's embedding table
    assert not list(tmp_path.glob(f"prefill{CHUNK}.onnx"))
    io = json.loads((path / "manifest.json").read_text())["io"]
    ids = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    script = f"""
import json, sys, numpy as np
from pathlib import Path
from splice.runtime.npu_runtime import HostTable, StaticDecoder, htp_session, session_runner
io = json.loads({json.dumps(json.dumps(io))})
dec = StaticDecoder(io, {{}}, HostTable.open(Path({str(tmp_path)!r}), io["embedding"]))
dec.runs = {{s: session_runner(htp_session({str(tmp_path)!r} + f"/{{n}}.ctx.onnx"), dec.outputs)
            for s, n in (({CHUNK}, "prefill{CHUNK}"), (1, "decode"))}}
cache = dec.empty()
out = np.concatenate([dec.forward({ids[:7]}, cache)] + [dec.step([t], cache) for t in {ids[7:]}])
np.save(sys.argv[1], out)
"""
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out.npy")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    fresh = np.load(tmp_path / "out.npy")
    art = load(path)
    cache = art.decoder.empty()
    here = np.concatenate([art.decoder.forward(ids[:7], cache)] +
                          [art.decoder.step([t], cache) for t in ids[7:]])
    assert np.array_equal(fresh, here)


@needs_htp
def test_compile_api_and_w8a8_recipe_run_on_the_htp(tmp_path):
    """splice.compile(target="npu") picks the NPU backend; npu_w8a8's static int8 activation nodes
    keep their grids (as uint8) and the whole graph is 8-bit."""
    import splice

    art = splice.compile(tiny_module(seed=6), "npu_w8a8", target="npu", out=tmp_path / "a",
                         calibration=torch.from_numpy(_calib(seed=1, rows=8, n=256 % 64 + 40)))
    npu = art.manifest["npu"]
    assert npu["act_bits"] == 8
    assert all(set(f["activation_types"]) == {"uint8"} for f in npu["figures"].values())
    assert art.logits([1, 2, 3])[0].shape == (1, 3, 258)


@needs_htp
@needs_stories
@pytest.mark.slow
def test_stories260k_end_to_end_on_the_htp(tmp_path):
    """stories260K W8 per-channel + 16-bit activations: compiled through the CLI, greedy text on
    the HTP equals ONNX Runtime CPU's on the same QDQ graphs and reads as English; the logits stay
    within 1% RMS of the CPU's and of the reference interpreter's."""
    from splice.cli import main
    from splice.frontend import load_model

    out = tmp_path / "stories"
    assert main(["compile", str(STORIES), "--recipe", "npu_w8a16", "--target", "npu",
                 "--calib", str(TINYSTORIES), "--out", str(out)]) == 0
    art = load(out)
    prompt = art.prompt_ids("Once upon a time")
    htp = greedy(art.decoder, prompt, 24)
    cpu = greedy(cpu_decoder(art), prompt, 24)
    assert htp == cpu
    text = art.tokenizer.decode(htp)
    assert sum(w in text for w in ("the", "a", "was", "to", "and", "She", "He")) >= 2
    module = load_model(STORIES)
    from splice.api import run_passes
    from splice.recipe import Recipe

    w8, _ = run_passes(module, Recipe.named("npu_w8a16"))
    c = compare(w8, art, prompt + htp, prompt=len(prompt))
    assert c["htp_vs_cpu_qdq"]["rel_rms"] < 0.01 and c["htp_vs_cpu_qdq"]["argmax_agree"] == 1.0
    assert c["htp_vs_reference"]["rel_rms"] < 0.02


@needs_htp
@needs_stories
def test_cli_fails_with_the_preflight_report(tmp_path, capsys):
    from splice.cli import main

    recipe = tmp_path / "dyn.toml"
    recipe.write_text('name = "dyn"\n[[passes]]\nname = "quantize_activations"\n'
                      'mode = "dynamic_per_token"\n')
    rc = main(["compile", str(STORIES), "--recipe", str(recipe), "--target", "npu",
               "--calib", str(TINYSTORIES), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "pre-flight prefill64" in err and "made by 'quantize_activations'" in err
    assert not (tmp_path / "out").exists()
