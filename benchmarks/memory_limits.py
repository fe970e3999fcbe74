"""What bounds a decode step: the machine's read bandwidth, the bytes of weights a step reads, how
fast ONNX Runtime's kernels multiply by those weights with nothing else in the graph, and an
artefact's size on disk (the ONNX speed benchmark's limits)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np


def read_bandwidth(gb: float = 1.0, repeats: int = 5, threads: int = 2) -> dict[str, float]:
    """Read bandwidth in bytes/s, two ways, best of `repeats` each: numpy summing a `gb` GB
    float64 array (one and two threads; numpy releases the GIL in the reduction), and ONNX Runtime
    multiplying a [1, 4096] vector by a `gb` GB float32 matrix fed as an input, so that nothing is
    prepacked (what a decode step's matmuls do, with the same kernels and threads). The GEMV
    reads faster than numpy's sum here; "best" is the larger, the one the limits use."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    a = np.ones(int(gb * 1e9) // 8)
    halves = np.array_split(a, threads)
    k = 4096
    w = np.ones((k, int(gb * 1e9) // (4 * k)), np.float32)
    x = np.ones((1, k), np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "gemv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape)),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, list(w.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, w.shape[1]])])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(),
        so, providers=["CPUExecutionProvider"])
    sess.run(None, {"x": x, "w": w})
    best = {"numpy_sum": 0.0, "ort_gemv": 0.0}
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        best["numpy_sum"] = max(best["numpy_sum"], a.nbytes / (time.perf_counter() - t))
        out = [0.0] * len(halves)

        def part(i: int) -> None:
            out[i] = halves[i].sum()
        threads = [threading.Thread(target=part, args=(i,)) for i in range(len(halves))]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        best["numpy_sum"] = max(best["numpy_sum"], a.nbytes / (time.perf_counter() - t))
        t = time.perf_counter()
        sess.run(None, {"x": x, "w": w})
        best["ort_gemv"] = max(best["ort_gemv"], w.nbytes / (time.perf_counter() - t))
    best["best"] = max(best.values())
    return best


def weight_bytes_per_step(model_path: Path) -> int:
    """Bytes of initializers one decode step reads: all of them, less tables that are only
    gathered from (an embedding reads one row per token)."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    users: dict[str, list[tuple[str, int]]] = {}
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            users.setdefault(name, []).append((node.op_type, i))
    total = 0
    for t in proto.graph.initializer:
        uses = users.get(t.name, [])
        if uses and all(op in ("Gather", "GatherBlockQuantized") and i == 0 for op, i in uses):
            continue
        if t.data_location == onnx.TensorProto.EXTERNAL:
            total += int({e.key: e.value for e in t.external_data}.get("length", 0))
        else:
            total += len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes
    return total


def weight_matmul_seconds(model_path: Path, threads: int = 2, runs: int = 20,
                          repeats: int = 5) -> float:
    """Seconds one decode step's weight products take alone: every MatMulNBits and every MatMul
    by an initializer of the model, fed a random [1, K] row each and nothing else in the graph
    (no attention, norms or activations; the same kernels, weights, prepacking and threads).
    What ONNX Runtime's kernels allow a step on this machine, where `read_bandwidth` gives what
    the memory allows: a step can be no faster than either. Best of `repeats` means of `runs`."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    proto = onnx.load(str(model_path))
    inits = {t.name: t for t in proto.graph.initializer}
    nodes, outputs, used, widths = [], [], {}, set()
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            k = next(a.i for a in node.attribute if a.name == "K")
        elif node.op_type == "MatMul" and node.input[1] in inits:
            k = int(inits[node.input[1]].dims[0])
        else:
            continue
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[0], copy.output[0] = f"x{k}", f"y{len(nodes)}"
        del copy.output[1:]
        nodes.append(copy)
        outputs.append(helper.make_tensor_value_info(copy.output[0], TensorProto.FLOAT, None))
        used.update((name, inits[name]) for name in copy.input[1:] if name in inits)
        widths.add(k)
    if not nodes:
        raise ValueError(f"{model_path}: no MatMulNBits or MatMul by a weight")
    graph = helper.make_graph(
        nodes, "weight_products",
        [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, k]) for k in widths],
        outputs, list(used.values()))
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=list(proto.opset_import))
                                .SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {f"x{k}": rng.standard_normal((1, k), dtype=np.float32) for k in widths}
    return time_call(sess, feeds, runs, repeats)


def time_call(sess, feeds: dict[str, np.ndarray], calls: int, rounds: int) -> float:
    """Fastest mean seconds a `sess.run` over `rounds` batches of `calls`, after a warm-up."""
    for _ in range(max(3, calls // 4)):
        sess.run(None, feeds)
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            sess.run(None, feeds)
        best = min(best, (time.perf_counter() - t) / calls)
    return best


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6
