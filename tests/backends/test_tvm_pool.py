"""splice's thread pool for TVM CPU libraries (backends/tvm/pool.c): every task of a parallel loop
runs exactly once with the loop's task count, whatever thread runs it; artefacts install it and
give the same logits on 1 and 2 threads."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from collections import Counter

import numpy as np
import pytest

tvm = pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install 'splice[tvm]')")

from splice.backends.tvm import export  # noqa: E402
from splice.backends.tvm.build import POOL_SOURCE  # noqa: E402
from splice.runtime import load  # noqa: E402
from tests.tiny import tiny_module  # noqa: E402


class Env(ctypes.Structure):
    _fields_ = [("sync_handle", ctypes.c_void_p), ("num_task", ctypes.c_int32)]


LAMBDA = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.POINTER(Env), ctypes.c_void_p)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("no gcc on PATH (the TVM backend links its CPU libraries with it too)")
    so = tmp_path_factory.mktemp("pool") / "pool.so"
    subprocess.run(["gcc", "-O2", "-fPIC", "-shared", "-pthread", str(POOL_SOURCE), "-o",
                    str(so)], check=True)
    lib = ctypes.CDLL(str(so))
    lib.splice_pool_launch.argtypes = [LAMBDA, ctypes.c_void_p, ctypes.c_int]
    return lib


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_every_task_runs_once_with_the_loops_task_count(pool, threads):
    assert pool.splice_pool_threads(threads) == 0
    seen: list[tuple[int, int, int]] = []

    for launch in range(300):
        n = launch % 9  # 0: one task per thread

        def task(t, env, _cdata, launch=launch):
            seen.append((launch, t, env.contents.num_task))
            return 0
        assert pool.splice_pool_launch(LAMBDA(task), None, n) == 0
    runs = Counter((launch, t) for launch, t, _ in seen)
    for launch in range(300):
        n = launch % 9 or threads
        assert [runs[(launch, t)] for t in range(n)] == [1] * n
        assert {k for (lz, _t, k) in seen if lz == launch} == {n}
    assert len(seen) == sum(launch % 9 or threads for launch in range(300))


def test_a_failing_task_fails_the_launch_and_bad_thread_counts_are_refused(pool):
    assert pool.splice_pool_threads(2) == 0
    fail = LAMBDA(lambda t, env, c: 1 if t == 1 else 0)
    assert pool.splice_pool_launch(fail, None, 4) == -1
    assert pool.splice_pool_launch(LAMBDA(lambda t, env, c: 0), None, 4) == 0
    assert pool.splice_pool_threads(0) == -1 and pool.splice_pool_threads(65) == -1


def test_an_artefact_runs_its_loops_on_the_pool_alike_on_1_and_2_threads(tmp_path, monkeypatch):
    from splice.runtime import tvm_runtime

    installed = []
    original = tvm_runtime._install_pool
    monkeypatch.setattr(tvm_runtime, "_install_pool",
                        lambda *a: installed.append(a[2]) or original(*a))
    path = export(tiny_module(seed=7), tmp_path / "art")
    assert __import__("json").loads((path / "manifest.json").read_text())["tvm"]["pool"] == \
        "splice"
    ids = np.random.default_rng(0).integers(0, 256, 12)
    out = []
    for threads in (1, 2):
        art = load(path, threads=threads)
        logits, cache = art.logits(ids)
        step, _ = art.logits(ids[:1], cache)
        out.append((logits, step))
    assert installed == [1, min(2, os.cpu_count() or 1)]
    np.testing.assert_array_equal(out[0][0], out[1][0])
    np.testing.assert_array_equal(out[0][1], out[1][1])
