"""Any torch.nn.Module -> ir.Module, through torch.export.

The module is exported with dynamic batch and sequence dims and the FX graph is translated node by
node into IR ops. The graph is the export's default "training" IR, not the core-ATen opset that
`run_decompositions()` gives: the training IR keeps the composite ops whole (aten.linear,
aten.rms_norm, aten.silu, aten.gelu, aten.embedding), which are exactly the IR's coarse ops, while
core ATen shatters them into permute/view/addmm and pow/mean/rsqrt chains that would have to be
pattern-matched back together. Hand-written forms that the training IR does not fuse (HF's
LlamaRMSNorm, x * sigmoid(x), x @ W.T, tanh(x / c) * c) are fused by the rules of
torch_patterns.py.
Casts between float dtypes, clones, contiguous, eval-mode dropout and views that keep the shape
are identities in the IR (it computes in the precision the interpreter or backend chooses).
Division by a number becomes multiplication by its reciprocal (at most an ulp apart). Any other
aten op raises FrontendError naming the op, the source line that produced it, and the ops that
are supported.

The graph takes `input_ids [batch, seq]` and returns `logits [batch, seq, vocab]`; a generic module
has no positions and no KV cache, so the runtime recomputes the whole prefix at each step. Its
ModelConfig says what can be inferred: architecture "torch.export", vocab_size from the logits,
hidden_size from the embedding width (0 without an embedding); num_layers, heads, head_dim,
intermediate_size and max_position are 0, meaning "not known" (layers are not identified in an
arbitrary module, so nodes carry layer None and role = the owning submodule's name).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any, NoReturn

import torch
from torch import fx

from splice.errors import FrontendError
from splice.ir.core import DTYPE_OF_TORCH, TORCH_DTYPES, Graph, IRError, Module, ModelConfig, Value, emit
from .torch_patterns import (ADDS, DIVS, IDENTITY, MULS, TRANSPOSES, Fusion, Rules, is_number,
                             shape_key, target, val)

log = logging.getLogger(__name__)

ORIGIN = "frontend.torch_export"
_FRAME = re.compile(r'File "(.*)", line (\d+), in (.*)')


def from_torch(module: torch.nn.Module, example_input_ids: torch.Tensor, *,
               dynamic: bool = True) -> Module:
    """Export `module` (ids [batch, seq] -> logits [batch, seq, vocab]) and import it.

    With `dynamic` the batch and sequence dims stay symbolic ("batch", "seq"); without it the
    graph has the example's static shape. The module is exported in eval mode (its training flag
    is restored afterwards); its parameters and buffers are copied into the Module's weights
    under their state-dict names.
    """
    if not isinstance(module, torch.nn.Module):
        raise FrontendError(f"from_torch: expected a torch.nn.Module, got {type(module).__name__}")
    ids = _check_example(example_input_ids)
    ep = _export(module, ids, dynamic)
    name = f"{type(module).__module__}.{type(module).__qualname__}"
    return _Importer(ep, name, dynamic).run()


def _check_example(ids: Any) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise FrontendError(f"from_torch: example_input_ids must be a torch.Tensor, got "
                            f"{type(ids).__name__}")
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype.is_complex \
            or ids.dtype == torch.bool or ids.numel() == 0:
        raise FrontendError(f"from_torch: example_input_ids must be a non-empty 2-D integer "
                            f"tensor [batch, seq], got {ids.dtype} {list(ids.shape)}")
    return ids.to(torch.int64)


def _export(module: torch.nn.Module, ids: torch.Tensor, dynamic: bool):
    if dynamic:
        # torch.export specialises a dim whose example size is 1, so trace with at least 2
        ids = ids.repeat(2 if ids.shape[0] == 1 else 1, 2 if ids.shape[1] == 1 else 1)
        shapes: Any = ({0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC},)
    else:
        shapes = None
    was_training = module.training
    module.eval()
    try:
        ep = torch.export.export(module, (ids,), dynamic_shapes=shapes)
    except Exception as e:  # torch.export raises many types; all mean "this module cannot be traced"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Constraints violated" in first:
            first += " (the module fixes the batch or sequence size; pass dynamic=False)"
        raise FrontendError(f"from_torch: torch.export could not trace "
                            f"{type(module).__qualname__}: {first}") from e
    finally:
        module.train(was_training)
    return ep


def _source_line(node: fx.Node) -> str:
    """The innermost frame of the node's stack trace outside torch itself (the user's line)."""
    lines = (node.meta.get("stack_trace") or "").strip().splitlines()
    frames = []
    for i, line in enumerate(lines):
        m = _FRAME.match(line.strip())
        if m:
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            frames.append((f"{m.group(1)}:{m.group(2)} in {m.group(3)}", code))
    user = [f for f in frames if "/torch/" not in f[0]] or frames
    if not user:
        return "no source location recorded"
    where, code = user[-1]
    return f"{where}: {code}" if code else where


def _role(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] for v in stack.values() if isinstance(v, tuple) and v and v[0]
             and not str(v[0]).startswith("_empty")]
    return str(paths[-1]) if paths else ""


class _Importer:
    """One translation of an ExportedProgram; `env` maps FX nodes to IR values (or numbers)."""

    def __init__(self, ep, source: str, dynamic: bool):
        self.ep = ep
        self.source = source
        self.dynamic = dynamic
        self.g = Graph()
        self.weights: dict[str, torch.Tensor] = {}
        self.env: dict[fx.Node, Any] = {}
        self.const_nodes: dict[fx.Node, str] = {}
        self.rules = Rules(self.const_nodes)     # filled by _placeholders before any match
        self.user_input: fx.Node | None = None
        self.handlers: dict[str, Callable[[fx.Node], Any]] = {
            "aten.embedding.default": self._embedding, "aten.linear.default": self._linear,
            "aten.rms_norm.default": self._rms_norm, "aten.silu.default": self._silu,
            "aten.gelu.default": self._gelu, "aten.matmul.default": self._matmul,
            **{t: self._add for t in ADDS}, **{t: self._mul for t in MULS},
            **{t: self._div for t in DIVS}, **{t: self._transpose for t in TRANSPOSES},
        }

    # -- driver --------------------------------------------------------------------------------
    def run(self) -> Module:
        graph = self.ep.graph
        self._placeholders()
        fusions = self.rules.find_fusions(graph)
        absorbed = {n for f in fusions.values() for n in f.interior}
        output = None
        for node in graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                output = node
                continue
            if node.op != "call_function":
                self._unsupported(node, f" (an FX {node.op} node)")
            if node in absorbed:
                continue
            if node in fusions:
                self.env[node] = self._emit_fusion(node, fusions[node])
            else:
                self.env[node] = self._translate(node)
        module = Module(self.g, self.weights, self._config(self._outputs(output)))
        dropped = module.drop_dead_weights()
        if dropped:
            log.debug("torch.export import: %d unused weights dropped", len(dropped))
        log.info("imported %s through torch.export: %s", self.source, self.g.op_counts())
        return module

    def _placeholders(self) -> None:
        from torch.export.graph_signature import InputKind

        nodes = {n.name: n for n in self.ep.graph.nodes if n.op == "placeholder"}
        for spec in self.ep.graph_signature.input_specs:
            node = nodes[spec.arg.name]
            if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                src = self.ep.state_dict if spec.target in self.ep.state_dict else self.ep.constants
                tensor = src[spec.target].detach().clone()
                if tensor.dtype not in DTYPE_OF_TORCH:
                    raise FrontendError(f"from_torch: weight {spec.target} has dtype {tensor.dtype};"
                                        f" supported: {sorted(map(str, DTYPE_OF_TORCH))}")
                self.weights[spec.target] = tensor
                self.env[node] = self.g.const(spec.target, DTYPE_OF_TORCH[tensor.dtype],
                                              tuple(tensor.shape))
                self.const_nodes[node] = spec.target
            elif spec.kind == InputKind.USER_INPUT and self.user_input is None:
                shape = ("batch", "seq") if self.dynamic else tuple(val(node).shape)
                self.env[node] = self.g.add_input("input_ids", "i64", shape)
                self.user_input = node
            else:
                raise FrontendError(f"from_torch: the module takes an input {spec.arg.name} "
                                    f"({spec.kind.name}); supported: one input_ids tensor and "
                                    "parameters, buffers and constants")

    def _outputs(self, output: fx.Node | None) -> Value:
        from torch.export.graph_signature import OutputKind

        kinds = [s.kind for s in self.ep.graph_signature.output_specs]
        if kinds != [OutputKind.USER_OUTPUT]:
            raise FrontendError(f"from_torch: the module returns {[k.name for k in kinds]}; "
                                "supported: one logits tensor and no buffer mutation")
        assert output is not None
        result = output.args[0][0]
        v = self.env.get(result)
        if not isinstance(v, Value) or v.is_const or v in self.g.inputs:
            raise FrontendError("from_torch: the module's output is not computed from input_ids")
        ids = self.g.inputs[0]
        if len(v.shape) != 3 or v.shape[:2] != ids.shape or not isinstance(v.shape[2], int):
            raise FrontendError(f"from_torch: the module returns {v.dtype}{list(v.shape)}; "
                                f"expected logits [{ids.shape[0]}, {ids.shape[1]}, vocab]")
        self.g.rename(v, "logits")
        self.g.outputs = [v]
        return v

    def _config(self, logits: Value) -> ModelConfig:
        embed = next((n for n in self.g.nodes if n.op == "embedding"), None)
        hidden = embed.output.shape[-1] if embed is not None else 0
        return ModelConfig(
            architecture="torch.export", vocab_size=int(logits.shape[-1]),
            hidden_size=int(hidden) if isinstance(hidden, int) else 0, num_layers=0,
            num_heads=0, num_kv_heads=0, head_dim=0, intermediate_size=0, max_position=0,
            source=self.source, extra={"kv_cache": False, "torch_version": torch.__version__})

    # -- helpers -------------------------------------------------------------------------------
    def _unsupported(self, node: fx.Node, why: str = "") -> NoReturn:
        supported = sorted(set(self.handlers) | IDENTITY)
        raise FrontendError(
            f"from_torch: {target(node)}{why} is not supported by splice's IR (node "
            f"{node.name}, at {_source_line(node)}); supported aten ops: {', '.join(supported)}")

    def _value(self, node: fx.Node, arg: Any, what: str) -> Value:
        v = self.env.get(arg) if isinstance(arg, fx.Node) else None
        if not isinstance(v, Value):
            self._unsupported(node, f" with {what} {arg!r}")
        return v

    def _weight(self, node: fx.Node, arg: Any, what: str, rank: int) -> Value:
        v = self._value(node, arg, what)
        if not v.is_const or len(v.shape) != rank:
            self._unsupported(node, f" with {what} %{v.name} {list(v.shape)} (a {rank}-D "
                                    "parameter or buffer is required)")
        return v

    def _emit(self, node: fx.Node, op: str, inputs: list[Value | None],
              attrs: dict[str, Any] | None = None) -> Value:
        try:
            return emit(self.g, op, inputs, attrs, name=node.name, role=_role(node),
                        origin=ORIGIN).output
        except IRError as e:
            raise FrontendError(f"from_torch: {target(node)} (node {node.name}, at "
                                f"{_source_line(node)}) cannot become IR {op}: {e}") from None

    def _scalar(self, node: fx.Node, value: float, like: Value) -> Value:
        """A number operand as a 0-d constant weight of the other operand's dtype."""
        if like.dtype not in ("f64", "f32", "f16", "bf16"):
            self._unsupported(node, f" of a number and the {like.dtype} tensor %{like.name}")
        tensor = torch.tensor(float(value), dtype=TORCH_DTYPES[like.dtype])
        name = self.g.free_name(f"scalar.{node.name}")
        self.weights[name] = tensor
        return self.g.const(name, like.dtype, ())

    # -- translation of single nodes -----------------------------------------------------------
    def _translate(self, node: fx.Node) -> Any:
        name = target(node)
        if name in IDENTITY:
            return self._identity(node)
        handler = self.handlers.get(name)
        if handler is not None:
            return handler(node)
        if not isinstance(val(node), torch.Tensor):
            return None     # shape arithmetic (sym_size, operator.mul) and runtime asserts
        self._unsupported(node)

    def _identity(self, node: fx.Node) -> Value:
        src = node.args[0]
        if target(node) == "aten.dropout.default" and (node.args[2:3] or [False])[0]:
            self._unsupported(node, " in training mode")
        if shape_key(node) != shape_key(src):
            self._unsupported(node, f" changing shape {shape_key(src)} -> {shape_key(node)}")
        a, b = val(src), val(node)
        if a.dtype != b.dtype and not (a.dtype.is_floating_point and b.dtype.is_floating_point):
            self._unsupported(node, f" casting {a.dtype} to {b.dtype}")
        return self._value(node, src, "input")

    def _embedding(self, node: fx.Node) -> Value:
        table = self._weight(node, node.args[0], "embedding table", 2)
        ids = self._value(node, node.args[1], "ids")
        return self._emit(node, "embedding", [ids, table])

    def _linear(self, node: fx.Node) -> Value:
        x = self._value(node, node.args[0], "input")
        w = self._weight(node, node.args[1], "weight", 2)
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        inputs = [x, w] + ([self._weight(node, bias, "bias", 1)] if bias is not None else [])
        return self._emit(node, "linear", inputs)

    def _rms_norm(self, node: fx.Node) -> Value:
        x = self._value(node, node.args[0], "input")
        shape = list(node.args[1])
        w = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
        eps = node.args[3] if len(node.args) > 3 else node.kwargs.get("eps")
        if len(shape) != 1:
            self._unsupported(node, f" over {len(shape)} dims (only the last dim)")
        if eps is None:     # torch's default: the machine epsilon of the input dtype
            eps = torch.finfo(val(node.args[0]).dtype).eps
        inputs = [x] + ([self._weight(node, w, "weight", 1)] if w is not None else [])
        return self._emit(node, "rms_norm", inputs, {"eps": float(eps)})

    def _silu(self, node: fx.Node) -> Value:
        return self._emit(node, "silu", [self._value(node, node.args[0], "input")])

    def _gelu(self, node: fx.Node) -> Value:
        approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return self._emit(node, "gelu", [self._value(node, node.args[0], "input")],
                          {"approximate": approx})

    def _binary(self, node: fx.Node, op: str) -> Value:
        a, b = node.args[0], node.args[1]
        if node.kwargs.get("alpha", 1) != 1 or (len(node.args) > 2 and node.args[2] != 1):
            self._unsupported(node, " with alpha != 1")
        if is_number(a):
            a, b = b, a      # both ops commute; the tensor goes first to set the dtype
        x = self._value(node, a, "operand")
        if is_number(b):
            return self._emit(node, op, [x, self._scalar(node, b, x)])
        return self._emit(node, op, [x, self._value(node, b, "operand")])

    def _add(self, node: fx.Node) -> Value:
        return self._binary(node, "add")

    def _mul(self, node: fx.Node) -> Value:
        return self._binary(node, "mul")

    def _div(self, node: fx.Node) -> Value:
        b = node.args[1]
        if not is_number(b) or b == 0 \
                or node.kwargs.get("rounding_mode") is not None:
            self._unsupported(node, " by a tensor or with rounding (only true division by a "
                                    "non-zero number)")
        x = self._value(node, node.args[0], "dividend")
        return self._emit(node, "mul", [x, self._scalar(node, 1.0 / b, x)])

    def _matmul(self, node: fx.Node) -> Value:
        x = self._value(node, node.args[0], "left operand")
        w = self._weight(node, node.args[1], "right operand", 2)
        return self._emit(node, "matmul", [x, w])

    def _transpose(self, node: fx.Node) -> Value:
        """A transposed 2-D weight used other than by matmul: stored transposed as a new weight."""
        src = node.args[0]
        if not self.rules.is_transpose_of_weight(node):
            self._unsupported(node, " of an activation or a non-2-D tensor")
        base = self.const_nodes[src]
        name = self.g.free_name(f"{base}.T")
        self.weights[name] = self.weights[base].t().contiguous()
        return self.g.const(name, DTYPE_OF_TORCH[self.weights[name].dtype],
                            tuple(self.weights[name].shape))

    def _emit_fusion(self, node: fx.Node, f: Fusion) -> Value:
        inputs = [self._value(node, a, "operand") for a in f.operands]
        return self._emit(node, f.op, inputs, f.attrs)
