"""The TVM runtime's decode replay (runtime/tvm_replay.py): decode steps run from C give the
Relax VM's logits bit for bit, on the recorded store and on the stores the plan takes over (a
fork, a new generation); recordings that disagree, or a library without the replay, keep the
VM."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install 'splice[tvm]')")

from splice.runtime.tvm_replay import DecodeReplay, _plan  # noqa: E402

from tests.tiny import tiny_module  # noqa: E402


@pytest.mark.parametrize("activations", ["float", "int8"])
def test_replayed_decode_steps_are_the_vms_bit_for_bit(tmp_path, activations):
    from splice.backends.tvm import export
    from splice.passes.infra.base import PassContext
    from splice.passes.quantize_weights import QuantizeWeightsPass
    from splice.runtime import load

    module = QuantizeWeightsPass(bits=4, group_size=32).call(tiny_module(seed=8),
                                                             PassContext()).module
    path = export(module, tmp_path / "art", activations=activations)
    fast, slow = load(path, threads=2), load(path, threads=2)
    slow._replay.off = True
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(2)).numpy()
    (a, ca), (b, cb) = fast.logits(ids), slow.logits(ids)
    fork = None
    for step in range(30):
        tok = np.asarray([[int(b[0, -1].argmax())]])
        (a, ca), (b, cb) = fast.logits(tok, ca), slow.logits(tok, cb)
        np.testing.assert_array_equal(a, b)
        if step == 12:
            fork = (ca, cb)
    plan = fast._replay._plan
    assert plan is not None and not fast._replay.off
    store = plan.store
    for _ in range(5):  # an earlier cache: a store of its own, which the plan takes over
        tok = np.asarray([[int(b[0, -1].argmax())]])
        (a, fa), (b, fb) = fast.logits(tok, fork[0]), slow.logits(tok, fork[1])
        np.testing.assert_array_equal(a, b)
        fork = (fa, fb)
    assert fast._replay._plan is plan and plan.store is not store
    other = ids[:, ::-1][:, :5].copy()  # a new generation, on other tokens than the old store's
    (a, ca), (b, cb) = fast.logits(other), slow.logits(other)
    for _ in range(5):
        tok = np.asarray([[int(b[0, -1].argmax())]])
        (a, ca), (b, cb) = fast.logits(tok, ca), slow.logits(tok, cb)
        np.testing.assert_array_equal(a, b)
    assert fast._replay._plan is plan and plan.store is ca.store and not fast._replay.off


def _so(*kernels):
    return types.SimpleNamespace(**{f"__tvm_ffi_{k}": object() for k in kernels},
                                 splice_replay=object())


def test_recordings_that_disagree_beyond_the_length_keep_the_vm(monkeypatch):
    import splice.runtime.tvm_replay as R

    step = [("vm.builtin.alloc_tensor", ()), ("norm", (1, 2.0)), ("attend", (7, 3))]
    nxt = [("vm.builtin.alloc_tensor", ()), ("norm", (1, 2.0)), ("attend", (8, 3))]
    so = _so("norm", "attend")
    calls = []
    monkeypatch.setattr(R, "_Plan", lambda so, store, kb, lb, result, slots:
                        calls.append(slots) or "plan")
    assert _plan(so, None, (7, step), (8, nxt), None) == "plan"
    assert calls == [[(1, 0, 8)]]  # attend's first argument follows the length
    other = [("vm.builtin.copy_tensor", ()), *nxt[1:]]  # a builtin that moves data
    assert _plan(so, None, (7, step), (8, other), None) is None
    jump = [nxt[0], nxt[1], ("attend", (9, 3))]  # moved by 2 in a 1-position step
    assert _plan(so, None, (7, step), (8, jump), None) is None
    const = [nxt[0], ("norm", (1, 2.5)), nxt[2]]  # a float that changes
    assert _plan(so, None, (7, step), (8, const), None) is None
    assert _plan(_so("norm"), None, (7, step), (8, nxt), None) is None  # no entry point
    swapped = [nxt[0], nxt[2], nxt[1]]
    assert _plan(so, None, (7, step), (8, swapped), None) is None


def test_a_library_without_the_replay_runs_every_step_on_the_vm():
    ran = []
    for native in (None, types.SimpleNamespace()):
        replay = DecodeReplay(vm=None, native=native)
        assert replay.off
        assert replay.step(object(), 3, lambda: ran.append(1) or "vm") == "vm"
    assert ran == [1, 1]


def test_a_plan_keeps_the_tensors_its_calls_use_but_not_the_recorded_store(tmp_path):
    """The plan holds the intermediates its calls use, not the recorded store's cache tensors:
    once another store took the plan over, the old cache is freed with its last KVCache."""
    from splice.backends.tvm import export
    from splice.runtime import load

    art = load(export(tiny_module(seed=9), tmp_path / "art"), threads=1)
    _, cache = art.logits(np.arange(1, 6)[None])
    for tok in (7, 8, 9):
        _, cache = art.logits(np.asarray([[tok]]), cache)
    plan = art._replay._plan
    assert plan is not None and plan.store is cache.store
    old = {t.__chandle__() for t in cache.store.tensors}
    kept = {a.__chandle__() for a in plan._keep}
    assert kept and not kept & old
    _, fresh = art.logits(np.arange(20, 24)[None])  # the next generation: a new store
    _, fresh = art.logits(np.asarray([[3]]), fresh)
    assert art._replay._plan is plan and plan.store is fresh.store
