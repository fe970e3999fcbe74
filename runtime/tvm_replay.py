"""Decode steps without the Relax VM: a recorded step's kernel calls replayed from C.

A decode step of SmolLM2-135M runs ~490 kernels; the Relax VM around them (~3,700 instructions:
tensor allocations, tuple reads, releases, views, shape checks) costs ~0.45 ms of a 2-3 ms step
on the 2-core x86 the benchmarks run on, the same at 1 and at 2 threads. Between two decode steps
on one cache store only the past length changes: the same kernels run on the same tensors (the
parameters, the store's cache, the step's token and position tensors, the VM's planned
intermediates) and the past length is their one changing scalar argument.

So a step is recorded through the VM's instrument hook (a real step: its logits are the step's),
and so is the next one; when the two agree up to the past length (the same kernels, the same
argument kinds, shapes and dtypes, integers equal or one more, as the length is), the second
step's arguments are kept alive and later steps run its calls from C (the library's
`splice_replay`, backends/tvm/replay.c: one loop over the kernels' entry points with argument
arrays made once), with the new past length written into the integers that follow it. A store
with the same cache shapes (the next generation's) takes the plan over: its cache tensors'
handles replace the old store's in the arguments (unless an argument views a cache tensor
otherwise); a store of another capacity is recorded afresh (~10 ms a recorded step).
Only builtins that move no data may sit between the kernels (VM_BUILTINS); anything else, a
library without `splice_replay` (compiled before it existed), or recordings that disagree keep
the VM, and a kernel's error drops the replay and runs the step on the VM.

Exact: the same kernels on the same bytes in the same order, so bit for bit the VM's step.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any, Callable

log = logging.getLogger(__name__)

# builtins that only allocate, view, pick, release or check: skipping them changes no data
VM_BUILTINS = frozenset(f"vm.builtin.{b}" for b in (
    "alloc_shape_heap", "alloc_storage", "alloc_tensor", "check_shape_info", "check_tensor_info",
    "check_tuple_info", "make_prim_value", "make_shape", "make_tuple", "match_shape",
    "null_value", "reshape", "tuple_getitem"))
KERNEL_PREFIX = "__tvm_ffi_"  # a library function's C entry point (TVMFFISafeCallType)
# TVMFFIAny type indices (tvm/ffi/c_api.h)
FFI_INT, FFI_FLOAT, FFI_TENSOR = 1, 3, 70


class _Any(ctypes.Structure):
    """TVMFFIAny: a type index, 4 bytes of padding, an 8-byte value."""
    _fields_ = [("type_index", ctypes.c_int32), ("padding", ctypes.c_uint32),
                ("value", ctypes.c_int64)]


class _Call(ctypes.Structure):
    """replay.c's splice_call."""
    _fields_ = [("fn", ctypes.c_void_p), ("args", ctypes.POINTER(_Any)),
                ("num_args", ctypes.c_int64)]


def record_calls(vm: Any, run: Callable[[], Any]) -> tuple[list, Any]:
    """Run `run` (one VM call) with every call instruction recorded: [(symbol, function, args)],
    and the call's result (benchmarks.tvm_limits times the recorded kernels alone)."""
    calls: list = []

    def hook(func, symbol, before, ret, *args):
        if before:
            calls.append((str(symbol), func, args))
        return 0  # VMInstrumentReturnKind.kNoOp
    vm.set_instrument(hook)
    try:
        result = run()
    finally:
        vm.set_instrument(None)
    return calls, result


def _same_kind(x: Any, y: Any) -> bool:
    """Whether two steps' arguments are of one replayable kind: an integer or float each, or
    two tensors (tvm_ffi's) of one shape and dtype."""
    tx = type(x)
    if tx is not type(y):
        return False
    if tx is int or tx is float:
        return True
    import tvm_ffi

    return isinstance(x, tvm_ffi.Tensor) and (x.__chandle__() == y.__chandle__() or (
        x.shape == y.shape and x.dtype == y.dtype))


class _Plan:
    """One store's replayable decode step: the C call array and the past-length slots."""

    def __init__(self, so: Any, store: Any, calls: list, length: int, result: Any,
                 slots: list[tuple[int, int, int]]):
        # the recorded arguments stay alive (the planned intermediates are the VM's storage)
        self.store, self.result, self._keep = store, result, calls
        self._run = so.splice_replay
        self._arrays, self._slots = [], []
        table = (_Call * len(calls))()
        for i, (symbol, args) in enumerate(calls):
            arr = (_Any * max(len(args), 1))()
            for j, a in enumerate(args):
                if isinstance(a, int):
                    arr[j] = _Any(FFI_INT, 0, a)
                elif isinstance(a, float):
                    arr[j] = _Any(FFI_FLOAT, 0, ctypes.c_int64.from_buffer_copy(
                        ctypes.c_double(a)).value)
                else:
                    arr[j] = _Any(FFI_TENSOR, 0, a.__chandle__())
            table[i] = _Call(ctypes.cast(getattr(so, KERNEL_PREFIX + symbol), ctypes.c_void_p),
                             arr, len(args))
            self._arrays.append(arr)
        self._table, self._n = table, len(calls)
        self._slots = [(self._arrays[i], j, value - length) for i, j, value in slots]
        self._cache = self._cache_slots(calls)
        if self._cache is not None:  # the tensors the calls use, but not the recorded store's
            cache = {t.__chandle__() for t in store.tensors}
            self._keep = [a for _, args in calls for a in args
                          if type(a) not in (int, float) and a.__chandle__() not in cache]

    def _cache_slots(self, calls: list) -> list | None:
        """Where the store's cache tensors are arguments: (array, index, which tensor); None
        when some argument views a cache tensor's memory otherwise (then the plan is bound
        to its store)."""
        handles = {t.__chandle__(): k for k, t in enumerate(self.store.tensors)}
        spans = [(t.data_ptr(), t.data_ptr() + t.numel() * t.dtype.itemsize)
                 for t in self.store.tensors]
        out = []
        for arr, (_, args) in zip(self._arrays, calls):
            for j, a in enumerate(args):
                if type(a) in (int, float):
                    continue
                k = handles.get(a.__chandle__())
                if k is not None:
                    out.append((arr, j, k))
                elif any(lo <= a.data_ptr() < hi for lo, hi in spans):
                    return None
        return out

    def rebind(self, store: Any) -> bool:
        """Point the plan at another store whose tensors have the shapes and dtypes of its own
        (a new generation's): its calls then read and write that store's cache."""
        old = self.store.tensors
        if self._cache is None or len(store.tensors) != len(old) or any(
                a.shape != b.shape or a.dtype != b.dtype for a, b in zip(store.tensors, old)):
            return False
        for arr, j, k in self._cache:
            arr[j].value = store.tensors[k].__chandle__()
        self.store = store
        return True

    def run(self, length: int) -> bool:
        """One step at past length `length`; False when a kernel failed."""
        for arr, j, offset in self._slots:
            arr[j].value = length + offset
        return self._run(self._table, ctypes.c_int(self._n)) == 0


def _plan(so: Any, store: Any, first: tuple[int, list], second: tuple[int, list],
          result: Any) -> _Plan | None:
    """The plan from two recorded steps at past lengths L and L + 1, or None (with the reason
    logged) where they do not agree up to the length or a call cannot be replayed."""
    (la, ca), (lb, cb) = first, second
    kernels = []
    for calls in (ca, cb):
        other = {s for s, _ in calls if s.startswith("vm.") and s not in VM_BUILTINS}
        if other:
            log.debug("decode replay off: the step calls %s", sorted(other))
            return None
        kernels.append([(s, args) for s, args in calls if not s.startswith("vm.")])
    ka, kb = kernels
    if [s for s, _ in ka] != [s for s, _ in kb]:
        log.debug("decode replay off: two steps run different kernels")
        return None
    slots = []
    for i, ((symbol, aa), (_, ab)) in enumerate(zip(ka, kb)):
        if len(aa) != len(ab) or not hasattr(so, KERNEL_PREFIX + symbol):
            log.debug("decode replay off: %s cannot be called from C", symbol)
            return None
        for j, (x, y) in enumerate(zip(aa, ab)):
            if not _same_kind(x, y):
                log.debug("decode replay off: %s argument %d changes kind", symbol, j)
                return None
            if type(y) not in (int, float) or x == y:
                continue
            if type(y) is int and y - x == lb - la:
                slots.append((i, j, y))
                continue
            log.debug("decode replay off: %s argument %d changes otherwise", symbol, j)
            return None
    return _Plan(so, store, kb, lb, result, slots)


class DecodeReplay:
    """One artefact's decode replay (module docstring): `step(store, length, run)` returns the
    step's result tensor, from the replay where the store has one, else from `run` (the VM),
    recorded."""

    def __init__(self, vm: Any, native: Any):
        """`native`: the library's ctypes handle (None: the VM always)."""
        self._vm, self._plan, self._last = vm, None, None
        self._so = native if native is not None and hasattr(native, "splice_replay") else None
        self.off = self._so is None  # no replay in the library: the VM always

    def step(self, store: Any, length: int, run: Callable[[], Any]) -> Any:
        if self.off:
            return run()
        plan = self._plan
        if plan is not None and (plan.store is store or plan.rebind(store)):
            if plan.run(length):
                return plan.result
            log.debug("decode replay off: a kernel failed; the step runs on the VM")
            self.off, self._plan = True, None
            return run()
        recorded, result = record_calls(self._vm, run)
        calls = [(symbol, args) for symbol, _, args in recorded]
        last = self._last
        self._last = (store, length, calls)
        if last is not None and last[0] is store and last[1] == length - 1:
            self._plan = _plan(self._so, store, (last[1], last[2]), (length, calls), result)
            self._last = None
            if self._plan is None:
                self.off = True
        return result
