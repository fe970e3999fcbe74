"""Where the HTP's numbers differ, and by how much: one token sequence through three engines.

- reference: splice's interpreter on the IR module (float32; the IR's own quantized nodes,
  `qlinear` and `quantize`, with their integer semantics). It knows nothing of the NPU graph's
  extra activation quantization, so its distance to the others is the price of full QDQ.
- cpu: ONNX Runtime's CPU provider on the artefact's QDQ source graphs, the same graphs the HTP
  compiled, driven chunk by chunk exactly as the HTP runtime drives them. Its distance to the HTP
  is the HTP's own arithmetic (fixed-point requantization, its Softmax and norm kernels).
- htp: the artefact's EPContext graphs on the HTP backend, CPU fallback disabled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from splice.ir.core import Module
from splice.ir.interpreter import run_logits
from splice.runtime.npu_runtime import NpuArtefact, StaticDecoder, session_runner


def cpu_decoder(art: NpuArtefact, threads: int = 2) -> StaticDecoder:
    """The artefact's QDQ source graphs on ONNX Runtime's CPU provider, optimisations off (so a
    CPU fusion cannot hide what the graph says)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    runs = {}
    for seq, g in art.manifest["npu"]["graphs"].items():
        sess = ort.InferenceSession(str(Path(art.path) / g["source"]), so,
                                    providers=["CPUExecutionProvider"])
        runs[int(seq)] = session_runner(sess, art.decoder.outputs)
    return StaticDecoder(art.manifest["io"], runs, art.decoder.embed)


def stepwise(decoder: StaticDecoder, ids: list[int], prompt: int) -> np.ndarray:
    """Logits [len(ids), vocab]: the first `prompt` ids as prefill chunks, then one at a time
    through the decode graph (both graphs are exercised)."""
    cache = decoder.empty()
    out = [decoder.forward(ids[:prompt], cache)]
    out += [decoder.step([t], cache) for t in ids[prompt:]]
    return np.concatenate(out, axis=0)


def _diff(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    d = np.abs(a - b)
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()),
            "rel_rms": float(np.sqrt((d ** 2).mean() / max((b ** 2).mean(), 1e-30))),
            "argmax_agree": float((a.argmax(-1) == b.argmax(-1)).mean())}


def compare(module: Module, art: NpuArtefact, ids: list[int], prompt: int | None = None
            ) -> dict[str, Any]:
    """Logit differences between the reference interpreter, ONNX Runtime CPU on the QDQ graphs and
    the HTP, over `ids` (the first `prompt` as prefill, the rest decoded one by one)."""
    prompt = len(ids) // 2 if prompt is None else prompt
    ref = run_logits(module, torch.tensor([ids], dtype=torch.int64))["logits"]
    ref = ref[0].detach().to(torch.float32).numpy()
    cpu = stepwise(cpu_decoder(art), ids, prompt)
    htp = stepwise(art.decoder, ids, prompt)
    return {"tokens": len(ids), "prompt": prompt,
            "htp_vs_cpu_qdq": _diff(htp, cpu), "htp_vs_reference": _diff(htp, ref),
            "cpu_qdq_vs_reference": _diff(cpu, ref)}


def greedy(decoder: StaticDecoder, prompt: list[int], steps: int) -> list[int]:
    """Greedy ids after `prompt` on one decoder (the HTP's or the CPU's)."""
    cache = decoder.empty()
    logits = decoder.forward(prompt, cache)[-1]
    out = []
    for _ in range(steps):
        tok = int(np.argmax(logits))
        out.append(tok)
        if cache.length >= decoder.context:
            break
        logits = decoder.step([tok], cache)[-1]
    return out


def greedy_reference(module: Module, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        logits = run_logits(module, torch.tensor([ids], dtype=torch.int64))["logits"]
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def localize(art: NpuArtefact, ids: list[int], *, top: int = 8) -> list[dict[str, Any]]:
    """Where the HTP departs from ONNX Runtime CPU inside the prefill graph: the graph is rebuilt
    with every quantized activation (each QDQ pair's dequantized value) as an extra output, run
    once on both over `ids` (one chunk from an empty cache), and each tensor's relative RMS
    difference is returned in graph order, with its IR op, role and layer. The `top` tensors where
    the difference grows most over the largest difference before them are flagged."""
    import onnx

    from splice.runtime.npu_runtime import htp_session

    seq = max(int(s) for s in art.manifest["npu"]["graphs"])
    g = art.manifest["npu"]["graphs"][str(seq)]
    model = onnx.load(str(Path(art.path) / g["source"]))
    producer = {o: n for n in model.graph.node for o in n.output}
    names, meta = [], {}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in producer and \
                producer[n.input[0]].op_type == "QuantizeLinear":
            src = producer.get(producer[n.input[0]].input[0])
            names.append(n.output[0])
            meta[n.output[0]] = {p.key: p.value for p in src.metadata_props} if src else {}
    have = {o.name for o in model.graph.output}
    for x in names:
        if x not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT,
                                                                         None))
    data = model.SerializeToString()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    cpu = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    htp = htp_session(data, htp_arch=art.manifest["npu"]["htp_arch"])
    feeds = art.decoder.feeds(ids[:seq], art.decoder.empty(), seq)
    a, b = htp.run(names, feeds), cpu.run(names, feeds)
    rows, worst = [], 0.0
    for name, x, y in zip(names, a, b):
        rel = float(np.sqrt(((x - y) ** 2).mean() / max((y ** 2).mean(), 1e-30)))
        m = meta.get(name, {})
        rows.append({"tensor": name, "rel_rms": rel, "jump": rel - worst,
                     "ir_op": m.get("splice.op", ""), "role": m.get("splice.role", ""),
                     "layer": m.get("splice.layer", "")})
        worst = max(worst, rel)
    for r in sorted(rows, key=lambda r: -r["jump"])[:top]:
        r["flag"] = True
    return rows
