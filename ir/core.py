"""The IR's data structures: Value, Node, Graph and Module.

A Graph is a list of Nodes in topological order, with graph inputs, constants (weights held by the
Module, referenced by name) and outputs. Every Value has one producer: a Node, a graph input or a
constant. Use-lists are kept by the Node methods; nothing else edits `Node.inputs` directly, so the
verifier's use-list check is a real invariant rather than a hope.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Iterable, Iterator, MutableMapping, Sequence
from typing import Any

import torch

from .errors import IRError
from .opdef import get_op
from .printer import print_graph

Dim = int | str
Shape = tuple[Dim, ...]

DTYPES = ("f64", "f32", "f16", "bf16", "i64", "i32", "i8", "u8", "bool")

TORCH_DTYPES = {
    "f64": torch.float64, "f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16,
    "i64": torch.int64, "i32": torch.int32, "i8": torch.int8, "u8": torch.uint8, "bool": torch.bool,
}
DTYPE_OF_TORCH = {v: k for k, v in TORCH_DTYPES.items()}


class Value:
    """A tensor in the graph: a graph input, a constant weight, or a node output.

    `const` names the Module weight a constant holds. Values compare by identity.
    """

    __slots__ = ("name", "dtype", "shape", "producer", "index", "const", "uses", "__weakref__")

    def __init__(self, name: str, dtype: str, shape: Sequence[Dim], *, const: str | None = None):
        if dtype not in DTYPES:
            raise IRError(f"value {name!r}: unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
        self.name = name
        self.dtype = dtype
        self.shape: Shape = tuple(shape)
        self.producer: Node | None = None
        self.index = 0
        self.const = const
        self.uses: list[tuple[Node, int]] = []

    @property
    def is_const(self) -> bool:
        return self.const is not None

    def users(self) -> list[Node]:
        seen: dict[int, Node] = {}
        for node, _ in self.uses:
            seen.setdefault(id(node), node)
        return list(seen.values())

    def replace_all_uses_with(self, other: Value) -> None:
        for node, i in list(self.uses):
            node.replace_input(i, other)

    def __repr__(self) -> str:
        dims = ", ".join(str(d) for d in self.shape)
        return f"Value(%{self.name}: {self.dtype}[{dims}])"


class Node:
    """One op application. `meta` holds the traceability fields: layer, role and origin."""

    __slots__ = ("op", "inputs", "outputs", "attrs", "layer", "role", "origin", "graph")

    def __init__(
        self,
        op: str,
        inputs: Sequence[Value | None],
        outputs: Sequence[Value],
        attrs: dict[str, Any] | None = None,
        *,
        layer: int | None = None,
        role: str = "",
        origin: str = "",
    ):
        self.op = op
        self.inputs: list[Value | None] = []
        self.outputs: list[Value] = list(outputs)
        self.attrs: dict[str, Any] = dict(attrs or {})
        self.layer = layer
        self.role = role
        self.origin = origin
        self.graph: Graph | None = None
        for i, v in enumerate(outputs):
            if v.producer is not None:
                raise IRError(f"value %{v.name} already has a producer ({v.producer.op})")
            v.producer = self
            v.index = i
        for v in inputs:
            self._append_input(v)

    def _append_input(self, v: Value | None) -> None:
        if v is not None:
            v.uses.append((self, len(self.inputs)))
        self.inputs.append(v)

    def replace_input(self, index: int, new: Value | None) -> None:
        old = self.inputs[index]
        if old is not None:
            old.uses.remove((self, index))
        if new is not None:
            new.uses.append((self, index))
        self.inputs[index] = new

    def detach(self) -> None:
        """Drop this node's uses of its inputs (before it is removed from a graph)."""
        for i, v in enumerate(self.inputs):
            if v is not None:
                v.uses.remove((self, i))
        self.inputs = [None] * len(self.inputs)

    @property
    def output(self) -> Value:
        if len(self.outputs) != 1:
            raise IRError(f"{self.op} has {len(self.outputs)} outputs, not one")
        return self.outputs[0]

    def __repr__(self) -> str:
        ins = ", ".join("None" if v is None else f"%{v.name}" for v in self.inputs)
        return f"Node({self.op}({ins}) layer={self.layer} role={self.role!r})"


class Graph:
    """Inputs, constants, nodes in topological order, outputs."""

    __slots__ = ("inputs", "consts", "nodes", "outputs", "_names")

    def __init__(self) -> None:
        self.inputs: list[Value] = []
        self.consts: dict[str, Value] = {}
        self.nodes: list[Node] = []
        self.outputs: list[Value] = []
        self._names: set[str] = set()

    # -- names ---------------------------------------------------------------------------------
    def free_name(self, base: str) -> str:
        """`base`, or `base.N` for the first N that no value uses; nothing is claimed."""
        if base not in self._names:
            return base
        i = 1
        while f"{base}.{i}" in self._names:
            i += 1
        return f"{base}.{i}"

    def unique_name(self, base: str) -> str:
        name = self.free_name(base)
        self._names.add(name)
        return name

    def claim_name(self, name: str) -> None:
        if name in self._names:
            raise IRError(f"duplicate value name %{name}")
        self._names.add(name)

    def rename(self, value: Value, new: str) -> None:
        if value.is_const:
            raise IRError(f"constant %{value.name} is named by its weight; rename the weight instead")
        self.claim_name(new)
        self._names.discard(value.name)
        value.name = new

    # -- building ------------------------------------------------------------------------------
    def add_input(self, name: str, dtype: str, shape: Sequence[Dim]) -> Value:
        self.claim_name(name)
        v = Value(name, dtype, shape)
        self.inputs.append(v)
        return v

    def const(self, weight_name: str, dtype: str, shape: Sequence[Dim]) -> Value:
        """The constant Value for Module weight `weight_name` (one Value per weight)."""
        v = self.consts.get(weight_name)
        if v is not None:
            return v
        self.claim_name(weight_name)
        v = Value(weight_name, dtype, shape, const=weight_name)
        self.consts[weight_name] = v
        return v

    def append(self, node: Node) -> Node:
        node.graph = self
        self.nodes.append(node)
        return node

    def insert_before(self, anchor: Node, node: Node) -> Node:
        node.graph = self
        self.nodes.insert(self.nodes.index(anchor), node)
        return node

    def insert_after(self, anchor: Node, node: Node) -> Node:
        node.graph = self
        self.nodes.insert(self.nodes.index(anchor) + 1, node)
        return node

    def remove(self, node: Node) -> None:
        for v in node.outputs:
            if v.uses:
                users = ", ".join(n.op for n in v.users())
                raise IRError(f"cannot remove {node.op}: output %{v.name} still used by {users}")
            if v in self.outputs:
                raise IRError(f"cannot remove {node.op}: output %{v.name} is a graph output")
        node.detach()
        self.nodes.remove(node)
        node.graph = None
        for v in node.outputs:
            self._names.discard(v.name)

    def remove_const(self, weight_name: str) -> None:
        v = self.consts.pop(weight_name)
        if v.uses:
            raise IRError(f"constant %{weight_name} is still used")
        self._names.discard(weight_name)

    def dead_consts(self) -> list[str]:
        return [n for n, v in self.consts.items() if not v.uses]

    # -- queries -------------------------------------------------------------------------------
    def values(self) -> Iterator[Value]:
        yield from self.inputs
        yield from self.consts.values()
        for n in self.nodes:
            yield from n.outputs

    def find(self, *, op: str | None = None, role: str | None = None,
             layer: int | None | str = "any") -> list[Node]:
        return [n for n in self.nodes
                if (op is None or n.op == op) and (role is None or n.role == role)
                and (layer == "any" or n.layer == layer)]

    def layers(self) -> list[int]:
        return sorted({n.layer for n in self.nodes if n.layer is not None})

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return dict(sorted(counts.items()))

    def copy(self) -> Graph:
        """A structural copy: new Values and Nodes with the same names, types, attributes and
        metadata, the attributes copied through JSON and completed as the parser does, so the copy
        is what printing and parsing back would give (without the text, and without core having to
        import the parser, which imports core)."""
        g = Graph()
        env: dict[int, Value] = {}
        for v in self.inputs:
            env[id(v)] = g.add_input(v.name, v.dtype, v.shape)
        for v in self.consts.values():
            env[id(v)] = g.const(v.name, v.dtype, v.shape)
        for n in self.nodes:
            inputs: list[Value | None] = []
            for v in n.inputs:
                if v is not None and id(v) not in env:
                    raise IRError(f"{n.op}: use of undefined value %{v.name}")
                inputs.append(None if v is None else env[id(v)])
            outs = []
            for v in n.outputs:
                g.claim_name(v.name)
                outs.append(Value(v.name, v.dtype, v.shape))
            attrs = get_op(n.op).check_attrs(json.loads(json.dumps(n.attrs, sort_keys=True)))
            g.append(Node(n.op, inputs, outs, attrs, layer=n.layer, role=str(n.role),
                          origin=str(n.origin)))
            env.update((id(v), o) for v, o in zip(n.outputs, outs))
        for v in self.outputs:
            if id(v) not in env:
                raise IRError(f"return of undefined value %{v.name}")
            g.outputs.append(env[id(v)])
        return g

    def __str__(self) -> str:
        return print_graph(self)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What a backend and the runtime need to know beyond the graph itself.

    The graph is the truth for the computation; this records sizes (for KV-cache allocation and
    reports), special tokens and provenance. Passes that change sizes (pruning) replace it.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position: int
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    source: str = ""
    chat_template: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise IRError(f"model config: unknown fields {sorted(unknown)}")
        d = dict(d)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """A tokenizer carried with the model: its kind ("hf" for tokenizer.json, "llama2c" for a
    llama2.c tok*.bin) and its files as bytes, copied verbatim into the artefact."""

    kind: str
    files: dict[str, bytes]


class Module:
    """A graph, the weights its constants name, the model config and the tokenizer.

    `weights` is a dict, or any MutableMapping that behaves like one: frontend.lazy.LazyWeights
    reads each weight from disk when asked (layer-by-layer compiles of models larger than
    memory), so code that walks all weights should ask for one at a time."""

    __slots__ = ("graph", "weights", "config", "tokenizer")

    def __init__(self, graph: Graph, weights: MutableMapping[str, torch.Tensor],
                 config: ModelConfig, tokenizer: Tokenizer | None = None):
        self.graph = graph
        self.weights = weights
        self.config = config
        self.tokenizer = tokenizer

    def weight(self, value: Value) -> torch.Tensor:
        if value.const is None:
            raise IRError(f"%{value.name} is not a constant")
        return self.weights[value.const]

    def set_weight(self, value: Value, tensor: torch.Tensor) -> None:
        """Replace a constant's tensor, keeping the Value's dtype and shape in step."""
        if value.const is None:
            raise IRError(f"%{value.name} is not a constant")
        self.weights[value.const] = tensor
        value.shape = tuple(tensor.shape)
        value.dtype = DTYPE_OF_TORCH[tensor.dtype]

    def add_weight(self, name: str, tensor: torch.Tensor) -> Value:
        """Store `tensor` as a new weight (renamed if `name` is taken) and return its constant."""
        while name in self.weights or name in self.graph._names:
            name = self.graph.free_name(name) if name in self.graph._names else name + ".1"
        self.weights[name] = tensor
        return self.graph.const(name, DTYPE_OF_TORCH[tensor.dtype], tensor.shape)

    def rename_weight(self, old: str, new: str) -> Value:
        """Give weight `old` the free name `new`: a new constant that every user of the old one
        reads. The tensor is moved, never read (a lazy store moves its on-disk reference)."""
        g = self.graph
        v = g.consts[old]
        if new in self.weights or new in g._names:
            raise IRError(f"cannot rename weight {old} to {new}: the name is taken")
        move = getattr(self.weights, "move", None)  # frontend.lazy.LazyWeights
        if callable(move):
            move(old, new)
        else:
            self.weights[new] = self.weights.pop(old)
        nv = g.const(new, v.dtype, v.shape)
        for node, i in list(v.uses):
            node.replace_input(i, nv)
        g.remove_const(old)
        return nv

    def drop_dead_weights(self) -> list[str]:
        dead = self.graph.dead_consts()
        for name in dead:
            self.graph.remove_const(name)
            if name in self.weights:
                del self.weights[name]  # not pop(): a lazy store would read it first
        return dead

    def num_parameters(self) -> int:
        shape = getattr(self.weights, "shape", None)  # a lazy store answers without reading
        if callable(shape):
            return sum(math.prod(shape(k)) for k in self.weights)
        return sum(t.numel() for t in self.weights.values())

    def clone(self) -> Module:
        """A deep copy: graph structure and weight tensors are both copied (weights still on
        disk stay there, shared: their files are never written in place)."""
        graph = self.graph.copy()
        own = getattr(self.weights, "clone", None)  # a lazy store copies its references
        weights = own() if callable(own) else {k: v.clone() for k, v in self.weights.items()}
        return Module(graph, weights, self.config, copy.deepcopy(self.tokenizer))

    def config_json(self) -> str:
        return json.dumps(self.config.to_json(), indent=2, sort_keys=True)


def iter_uses(values: Iterable[Value]) -> Iterator[tuple[Node, int]]:
    for v in values:
        yield from v.uses


def emit(graph: Graph, op: str, inputs: Sequence[Value | None], attrs: dict[str, Any] | None = None,
         *, name: str | None = None, layer: int | None = None, role: str = "", origin: str = "",
         before: Node | None = None, after: Node | None = None) -> Node:
    """Create a node of `op`: attributes checked and completed with defaults, output values named
    (from `name`, or the op) and shaped by the op's shape rule, placed at the end of the graph or
    before/after an anchor node."""
    opdef = get_op(op)
    attrs = opdef.check_attrs(attrs or {})
    n_in = len(inputs)
    if n_in < opdef.min_inputs or n_in > len(opdef.inputs):
        raise IRError(f"{op} takes {opdef.min_inputs}..{len(opdef.inputs)} inputs, got {n_in}")
    node = Node(op, inputs, [], attrs, layer=layer, role=role, origin=origin)
    base = name or (f"{role}.{layer}" if role and layer is not None else role or op)
    for i, (dtype, shape) in enumerate(opdef.shape(node)):
        vname = base if len(opdef.outputs) == 1 else f"{base}.{opdef.outputs[i]}"
        v = Value(graph.unique_name(vname), dtype, shape)
        v.producer, v.index = node, i
        node.outputs.append(v)
    if before is not None:
        graph.insert_before(before, node)
    elif after is not None:
        graph.insert_after(after, node)
    else:
        graph.append(node)
    return node
