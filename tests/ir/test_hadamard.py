"""Hadamard matrices: every construction is orthonormal with +-1/sqrt(n) entries, the factorisation
is the documented one, the fast transform equals the dense product, and the `hadamard` op
verifies, round-trips through the text form and computes x @ H."""

from __future__ import annotations

import math

import pytest
import torch

from splice.ir import Graph, IRError, emit, parse_graph, print_graph
from splice.ir.core import Module, ModelConfig
from splice.ir.hadamard import (MAX_BASE, _WILLIAMSON, factorize, fwht, hadamard_matrix,
                                hadamard_transform, largest_block, random_hadamard,
                                random_orthogonal, supported_bases)
from splice.ir.interpreter import Interpreter
from splice.ir.verify import verify


def assert_orthonormal_hadamard(h: torch.Tensor, block: int | None = None) -> None:
    n = h.shape[0]
    m = block or n
    assert h.dtype == torch.float64
    assert (h @ h.T - torch.eye(n, dtype=torch.float64)).abs().max().item() <= 1e-12
    nonzero = h[h != 0]
    assert nonzero.numel() == n * m
    assert torch.equal(nonzero.abs(), torch.full_like(nonzero, 1 / math.sqrt(m)))


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 36, 44, 52, 64, 76, 92, 100, 116, 156, 172,
                               576, 1536])
def test_orthonormal_with_plus_minus_entries(n):
    assert_orthonormal_hadamard(hadamard_matrix(n))


def test_every_base_is_hadamard():
    # all bases up to 256 and those next to the cap: the same code builds the ones between
    bases = supported_bases(256) + [b for b in supported_bases(MAX_BASE) if b > MAX_BASE - 64]
    assert {52, 92, 100, 116, 156, 172, 1020} <= set(bases)
    for b in bases:
        # the +-1 matrix in float32: integer sums up to 1024 are exact, and it is 2x faster
        h = (hadamard_matrix(b) * math.sqrt(b)).round().float()
        assert torch.equal(h.abs(), torch.ones(b, b)), b
        assert torch.equal(h @ h.T, b * torch.eye(b)), b


def test_williamson_sequences_are_symmetric():
    for m, rows in _WILLIAMSON.items():
        for row in rows:
            assert len(row) == m and row == row[0] + row[1:][::-1], (m, row)


def test_11008_rows_without_the_dense_matrix():
    n = 11008
    rows = torch.tensor([0, 1, 63, 64, 5000, 11007])
    basis = torch.zeros(len(rows), n, dtype=torch.float64)
    basis[torch.arange(len(rows)), rows] = 1
    h_rows = fwht(basis)
    assert (h_rows @ h_rows.T - torch.eye(len(rows), dtype=torch.float64)).abs().max() <= 1e-12
    assert (h_rows.abs() - 1 / math.sqrt(n)).abs().max() <= 1e-15
    # row r of H_172 (x) H_64 is kron(H_172[r // 64], H_64[r % 64])
    h172, h64 = hadamard_matrix(172), hadamard_matrix(64)
    for i, r in enumerate(rows.tolist()):
        assert (h_rows[i] - torch.kron(h172[r // 64], h64[r % 64])).abs().max() <= 1e-15
    x = torch.randn(8, n, dtype=torch.float64)
    assert (fwht(x).norm(dim=-1) / x.norm(dim=-1) - 1).abs().max() <= 1e-13


@pytest.mark.parametrize("n,factors", [(576, [36, 16]), (1536, [12, 128]), (11008, [172, 64]),
                                       (4096, [4096]), (64, [64]), (172, [172]), (1, [1]),
                                       (4864, [76, 64]), (896, [28, 32])])
def test_factorize(n, factors):
    assert factorize(n) == factors


@pytest.mark.parametrize("n", [3, 6, 10, 188, 376, 4 * 47 * 2])
def test_factorize_none(n):
    assert factorize(n) is None


def test_unsupported_order_names_n_and_the_bases():
    with pytest.raises(IRError, match=r"order 188 .*12, 20, 28, 36, .*172") as info:
        hadamard_matrix(188)
    assert isinstance(info.value, ValueError)
    with pytest.raises(IRError, match="positive integer"):
        factorize(0)


def test_block_diagonal_when_no_full_construction():
    n = 376  # 47 * 8: neither 188 nor 376 has a construction, 8 is the largest block
    assert largest_block(n) == 8
    h = hadamard_matrix(n, allow_block=True)
    assert_orthonormal_hadamard(h, block=8)
    assert torch.equal(h[:8, :8], hadamard_matrix(8))
    assert h[:8, 8:].abs().max() == 0
    assert largest_block(576) == 576
    with pytest.raises(IRError, match="larger than 1"):
        hadamard_matrix(7, allow_block=True)


@pytest.mark.parametrize("n", [1, 2, 12, 64, 76, 172 * 4, 576, 1536])
def test_fwht_equals_dense_product(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, 2, n, generator=g, dtype=torch.float64)
    assert (fwht(x) - x @ hadamard_matrix(n)).abs().max().item() <= 1e-12


def test_fwht_explicit_factors_and_low_precision():
    x = torch.randn(4, 48, dtype=torch.float64)
    h = torch.kron(hadamard_matrix(12), hadamard_matrix(4))
    assert (fwht(x, [12, 4]) - x @ h).abs().max() <= 1e-12
    h = torch.kron(hadamard_matrix(4), hadamard_matrix(12))
    assert (fwht(x, [4, 12]) - x @ h).abs().max() <= 1e-12
    with pytest.raises(IRError, match="multiply to 24"):
        fwht(x, [12, 2])
    x16 = (torch.randn(2, 4096) * 30).to(torch.float16)
    y16 = fwht(x16)
    assert y16.dtype == torch.float16 and torch.isfinite(y16).all()
    ref = x16.double() @ hadamard_matrix(4096)
    assert ((y16.double() - ref).abs().max() / ref.abs().max()).item() < 2e-3


def test_random_hadamard_orthogonal_seeded():
    q = random_hadamard(576, seed=3)
    assert_orthonormal_hadamard(q)
    assert torch.equal(q, random_hadamard(576, seed=3))
    assert not torch.equal(q, random_hadamard(576, seed=4))
    # Q = diag(s) @ H, so x @ Q = fwht(x * s)
    s = (q / hadamard_matrix(576))[:, 0]
    assert torch.equal(s.abs(), torch.ones(576, dtype=torch.float64))
    x = torch.randn(5, 576, dtype=torch.float64)
    assert (x @ q - fwht(x * s)).abs().max() <= 1e-12
    assert_orthonormal_hadamard(random_hadamard(376, seed=0, allow_block=True), block=8)


def test_random_orthogonal():
    q = random_orthogonal(19, seed=1)
    assert (q @ q.T - torch.eye(19, dtype=torch.float64)).abs().max() <= 1e-12
    assert torch.equal(q, random_orthogonal(19, seed=1))


def _module(width: int, attrs: dict) -> Module:
    g = Graph()
    x = g.add_input("x", "f32", ("batch", "seq", width))
    node = emit(g, "hadamard", [x], attrs)
    g.outputs.append(node.output)
    cfg = ModelConfig(architecture="test", vocab_size=1, hidden_size=width, num_layers=0,
                      num_heads=1, num_kv_heads=1, head_dim=width, intermediate_size=width,
                      max_position=1)
    return Module(g, {}, cfg)


@pytest.mark.parametrize("width,attrs,h", [
    (576, {"size": 576}, lambda: hadamard_matrix(576)),
    (376, {"size": 376, "block": 8}, lambda: hadamard_matrix(376, allow_block=True)),
    (4 * 12, {"size": 12, "group": 4, "scale": 0.5},
     lambda: 0.5 * torch.block_diag(*[hadamard_matrix(12)] * 4)),
])
def test_op_verifies_round_trips_and_computes_x_at_h(width, attrs, h):
    m = _module(width, attrs)
    verify(m)
    text = print_graph(m.graph)
    assert print_graph(parse_graph(text)) == text
    x = torch.randn(2, 3, width, dtype=torch.float64)
    y = Interpreter(m, torch.float64).run({"x": x})["hadamard"]
    assert (y - x @ h()).abs().max().item() <= 1e-12


@pytest.mark.parametrize("width,attrs,match", [
    (188, {"size": 188}, r"size 188 has no full construction \(set block to 4"),
    (576, {"size": 288}, "expected 288"),
    (24, {"size": 12, "group": 3}, "expected 36"),
    (376, {"size": 376, "block": 94}, "order 94"),
    (376, {"size": 376, "block": 16}, "does not divide"),
])
def test_op_rejects_bad_attributes(width, attrs, match):
    with pytest.raises(IRError, match=match):
        _module(width, attrs)


def test_op_reference_matches_hadamard_transform_in_float32():
    x = torch.randn(2, 1536)
    y = hadamard_transform(x, 1536)
    assert y.dtype == torch.float32
    assert (y.double() - x.double() @ hadamard_matrix(1536)).abs().max() < 1e-5
