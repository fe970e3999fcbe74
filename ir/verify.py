"""The verifier: every invariant the passes and backends rely on, each with its own message."""

from __future__ import annotations

from .core import DTYPE_OF_TORCH, Graph, IRError, Module
from .opdef import get_op


class VerifyError(IRError):
    pass


def verify_graph(graph: Graph) -> None:
    defined: set[int] = set()
    names: set[str] = set()

    def define(v, where: str) -> None:
        if id(v) in defined:
            raise VerifyError(f"{where}: value %{v.name} defined twice")
        if v.name in names:
            raise VerifyError(f"{where}: two values are named %{v.name}")
        defined.add(id(v))
        names.add(v.name)

    for v in graph.inputs:
        if v.producer is not None or v.is_const:
            raise VerifyError(f"graph input %{v.name} has a producer or is a constant")
        define(v, "inputs")
    for wname, v in graph.consts.items():
        if v.const != wname:
            raise VerifyError(f"constant %{v.name} names weight {v.const!r}, registered as {wname!r}")
        define(v, "constants")
    seen_nodes: set[int] = set()
    for pos, node in enumerate(graph.nodes):
        where = f"node {pos} ({node.op}, role {node.role!r})"
        if id(node) in seen_nodes:
            raise VerifyError(f"{where}: node appears twice in the graph")
        seen_nodes.add(id(node))
        opdef = get_op(node.op)
        if node.graph is not graph:
            raise VerifyError(f"{where}: node.graph does not point to this graph")
        if not opdef.min_inputs <= len(node.inputs) <= len(opdef.inputs):
            raise VerifyError(f"{where}: {len(node.inputs)} inputs, op takes "
                              f"{opdef.min_inputs}..{len(opdef.inputs)}")
        for i, v in enumerate(node.inputs):
            if v is None:
                if not opdef.inputs[i].endswith("?"):
                    raise VerifyError(f"{where}: required input {opdef.inputs[i]} is missing")
                continue
            if id(v) not in defined:
                raise VerifyError(f"{where}: input %{v.name} is used before it is defined "
                                  "(not in topological order, or not in the graph)")
            if (node, i) not in v.uses:
                raise VerifyError(f"{where}: use-list of %{v.name} lacks this use")
        try:
            attrs = opdef.check_attrs(node.attrs)
        except IRError as e:
            raise VerifyError(f"{where}: {e}") from None
        if attrs != node.attrs:
            raise VerifyError(f"{where}: attributes lack defaults for "
                              f"{sorted(set(attrs) - set(node.attrs))}")
        try:
            expected = opdef.shape(node)
        except IRError as e:
            raise VerifyError(f"{where}: {e}") from None
        if len(expected) != len(node.outputs):
            raise VerifyError(f"{where}: {len(node.outputs)} outputs, op has {len(expected)}")
        for i, (v, (dtype, shape)) in enumerate(zip(node.outputs, expected)):
            if v.producer is not node or v.index != i:
                raise VerifyError(f"{where}: output %{v.name} does not point back to its producer")
            if v.dtype != dtype or tuple(v.shape) != tuple(shape):
                raise VerifyError(f"{where}: output %{v.name} is {v.dtype}{list(v.shape)}, "
                                  f"the shape rule gives {dtype}{list(shape)}")
            define(v, where)
    for v in graph.values():
        for node, i in v.uses:
            if id(node) not in seen_nodes:
                raise VerifyError(f"use-list of %{v.name} names a node not in the graph ({node.op})")
            if node.inputs[i] is not v:
                raise VerifyError(f"use-list of %{v.name} is stale: {node.op} input {i} is another value")
    for v in graph.outputs:
        if id(v) not in defined:
            raise VerifyError(f"graph output %{v.name} is not defined in the graph")


def verify(module: Module) -> None:
    """Check the graph's invariants and that every constant has a weight of its dtype and shape."""
    verify_graph(module.graph)
    for name, v in module.graph.consts.items():
        t = module.weights.get(name)
        if t is None:
            raise VerifyError(f"constant %{name} has no weight in the module")
        if tuple(t.shape) != tuple(v.shape) or DTYPE_OF_TORCH.get(t.dtype) != v.dtype:
            raise VerifyError(f"constant %{name} is declared {v.dtype}{list(v.shape)} but its weight "
                              f"is {t.dtype}{list(t.shape)}")
    extra = set(module.weights) - set(module.graph.consts)
    if extra:
        raise VerifyError(f"weights not referenced by the graph: {sorted(extra)[:5]}")
