"""The generic torch.export frontend: small modules in, IR out, logits equal to torch's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from splice import ir
from splice.errors import FrontendError
from splice.frontend.torch_export import from_torch

VOCAB, D, FF = 61, 24, 40


class TinyLM(nn.Module):
    """Embedding -> RMSNorm -> gate/up Linear -> SiLU * up -> down Linear -> residual -> RMSNorm
    -> lm head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.norm1 = nn.RMSNorm(D, eps=1e-6)
        self.gate = nn.Linear(D, FF, bias=False)
        self.up = nn.Linear(D, FF)
        self.down = nn.Linear(FF, D, bias=False)
        self.norm2 = nn.RMSNorm(D, eps=1e-5)
        self.head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        h = self.norm1(x)
        x = x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))
        return self.head(self.norm2(x))


class HandRMSNorm(nn.Module):
    """transformers' LlamaRMSNorm, with its float32 casts; `offset` gives Gemma's (1 + w)."""

    def __init__(self, d: int, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)
        self.offset = offset

    def forward(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        w = self.weight + self.offset if self.offset else self.weight
        return w * h.to(x.dtype)


class HandWritten(nn.Module):
    """The same kind of model spelt out in small ops, with a tied head and a logit soft-cap."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.norm1 = HandRMSNorm(D)
        self.w_gate = nn.Parameter(torch.randn(FF, D) / D ** 0.5)
        self.w_up = nn.Parameter(torch.randn(D, FF) / D ** 0.5)
        self.w_down = nn.Parameter(torch.randn(D, FF) / FF ** 0.5)
        self.norm2 = HandRMSNorm(D, offset=1.0)

    def forward(self, ids):
        x = self.embed(ids)
        h = self.norm1(x)
        g = h @ self.w_gate.T
        u = h @ self.w_up
        x = x + nn.functional.gelu((g * torch.sigmoid(g)) * u, approximate="tanh") @ self.w_down.t()
        logits = self.norm2(x) @ self.embed.weight.T / 2
        return torch.tanh(logits / 15.0) * 15.0


def _check_matches(model: nn.Module, module: ir.Module, shapes, atol: float = 1e-5) -> float:
    worst = 0.0
    for shape in shapes:
        ids = torch.randint(0, VOCAB, shape)
        with torch.no_grad():
            ref = model(ids)
        ours = ir.run_logits(module, ids)["logits"]
        assert ours.shape == ref.shape
        worst = max(worst, (ours - ref).abs().max().item())
    assert worst <= atol, worst
    return worst


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_tiny_lm_imports_and_matches_torch():
    model = TinyLM().eval()
    module = from_torch(model, torch.randint(0, VOCAB, (2, 5)))
    ir.verify(module)
    g = module.graph
    assert g.op_counts() == {"add": 1, "embedding": 1, "linear": 4, "mul": 1, "rms_norm": 2,
                             "silu": 1}
    assert [(v.name, v.shape) for v in g.inputs] == [("input_ids", ("batch", "seq"))]
    assert [(v.name, v.shape) for v in g.outputs] == [("logits", ("batch", "seq", VOCAB))]
    assert set(module.weights) == set(model.state_dict())
    for name, t in model.state_dict().items():
        assert torch.equal(module.weights[name], t)
    norms = g.find(op="rms_norm")
    assert [(n.role, n.attrs["eps"]) for n in norms] == [("norm1", 1e-6), ("norm2", 1e-5)]
    assert {n.origin for n in g.nodes} == {"frontend.torch_export"}
    c = module.config
    assert (c.architecture, c.vocab_size, c.hidden_size, c.num_layers) == \
        ("torch.export", VOCAB, D, 0)
    _check_matches(model, module, [(1, 1), (2, 5), (3, 17)])


def test_weights_are_copies():
    model = TinyLM().eval()
    module = from_torch(model, torch.randint(0, VOCAB, (1, 4)))
    with torch.no_grad():
        model.head.weight.zero_()
    assert module.weights["head.weight"].abs().sum() > 0


def test_hand_written_forms_are_fused():
    model = HandWritten().eval()
    module = from_torch(model, torch.randint(0, VOCAB, (1, 6)))
    ir.verify(module)
    counts = module.graph.op_counts()
    assert counts == {"add": 1, "embedding": 1, "gelu": 1, "linear": 3, "matmul": 1, "mul": 2,
                      "rms_norm": 2, "silu": 1, "softcap": 1}
    gemma = module.graph.find(op="rms_norm", role="norm2")[0]
    assert gemma.attrs["offset"] == 1.0
    head = [n for n in module.graph.find(op="linear") if n.inputs[1].name == "embed.weight"]
    assert len(head) == 1, "x @ embed.weight.T should be a linear on the tied table"
    _check_matches(model, module, [(1, 1), (2, 9)])


def test_static_shapes():
    model = TinyLM().eval()
    module = from_torch(model, torch.randint(0, VOCAB, (2, 5)), dynamic=False)
    ir.verify(module)
    assert module.graph.inputs[0].shape == (2, 5)
    assert module.graph.outputs[0].shape == (2, 5, VOCAB)
    _check_matches(model, module, [(2, 5)])


def test_training_mode_is_exported_as_eval_and_restored():
    class WithDropout(TinyLM):
        def forward(self, ids):
            return nn.functional.dropout(super().forward(ids), 0.5, self.training)

    model = WithDropout().train()
    module = from_torch(model, torch.randint(0, VOCAB, (2, 3)))
    assert model.training
    _check_matches(model.eval(), module, [(2, 4)])


def test_pattern_not_fused_when_an_inner_value_escapes():
    class Escaping(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, D)

        def forward(self, ids):
            x = self.embed(ids)
            r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
            return x * r + r      # r is used outside the norm: it cannot be fused away

    with pytest.raises(FrontendError, match="aten.pow.Tensor_Scalar"):
        from_torch(Escaping(), torch.randint(0, VOCAB, (2, 3)))


class CumSum(TinyLM):
    def forward(self, ids):
        return self.head(torch.cumsum(self.embed(ids), dim=1))


class LayerNormed(TinyLM):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(D)

    def forward(self, ids):
        return self.head(self.ln(self.embed(ids)))


@pytest.mark.parametrize("model, op, line", [
    (CumSum(), "aten.cumsum.default", "torch.cumsum(self.embed(ids), dim=1)"),
    (LayerNormed(), "aten.layer_norm.default", "self.ln(self.embed(ids))"),
])
def test_unsupported_op_names_op_and_source_line(model, op, line):
    with pytest.raises(FrontendError) as info:
        from_torch(model, torch.randint(0, VOCAB, (2, 3)))
    msg = str(info.value)
    assert op in msg and line in msg and "test_torch_export.py" in msg
    assert "supported aten ops:" in msg and "aten.linear.default" in msg


@pytest.mark.parametrize("ids, message", [
    (torch.zeros(4, dtype=torch.long), "2-D integer"),
    (torch.zeros(2, 3), "2-D integer"),
    (torch.zeros(2, 0, dtype=torch.long), "non-empty"),
    ([[1, 2]], "must be a torch.Tensor"),
])
def test_bad_example_input(ids, message):
    with pytest.raises(FrontendError, match=message):
        from_torch(TinyLM(), ids)


def test_not_a_module():
    with pytest.raises(FrontendError, match="expected a torch.nn.Module"):
        from_torch(lambda ids: ids, torch.zeros(1, 2, dtype=torch.long))


def test_outputs_other_than_logits_are_refused():
    class TwoOutputs(TinyLM):
        def forward(self, ids):
            logits = super().forward(ids)
            return logits, logits

    class Broadcast4D(TinyLM):
        def __init__(self):
            super().__init__()
            self.register_buffer("bias", torch.zeros(2, 1, 1, VOCAB))

        def forward(self, ids):
            return super().forward(ids) + self.bias

    with pytest.raises(FrontendError, match="one logits tensor"):
        from_torch(TwoOutputs(), torch.randint(0, VOCAB, (2, 3)))
    with pytest.raises(FrontendError, match=r"returns f32\[2, 'batch', 'seq', 61\]; expected logits"):
        from_torch(Broadcast4D(), torch.randint(0, VOCAB, (2, 3)))


def test_untraceable_module():
    class DataDependent(TinyLM):
        def forward(self, ids):
            x = self.embed(ids)
            return self.head(x if x.sum() > 0 else -x)

    with pytest.raises(FrontendError, match="torch.export could not trace .*DataDependent: Could not guard"):
        from_torch(DataDependent(), torch.randint(0, VOCAB, (2, 3)))


def test_fixed_size_module_needs_static_shapes():
    class Fixed(TinyLM):
        def forward(self, ids):
            return super().forward(ids.reshape(2, 4))

    with pytest.raises(FrontendError, match="pass dynamic=False"):
        from_torch(Fixed(), torch.randint(0, VOCAB, (2, 4)))
    module = from_torch(Fixed(), torch.randint(0, VOCAB, (2, 4)), dynamic=False)
    assert module.graph.inputs[0].shape == (2, 4)
