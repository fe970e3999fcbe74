"""Calibration across processes: 2 processes (gloo, loopback) each take half the calibration
batches and all-reduce their statistics; the results must equal the 1-process results to
floating-point rounding (the additions happen in another order, nothing else differs)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from splice.passes.infra import distributed
from splice.errors import InputError
from splice.passes.infra.base import PassContext
from splice.passes.estimate_patch import EstimatePatchPass
from splice.passes.quantize_activations import calibrate_ranges
from splice.passes.quantize_weights import QuantizeWeightsPass
from splice.passes.numerics.stages import StageRunner, stage_hessians
from splice.passes.infra.reduce import Reducer, TorchDistributedReducer
from splice.passes.select_layers import SelectLayersPass
from tests.passes.test_patch import deep_model
from tests.passes.models import token_batch

WORLD = 2
RTOL = 1e-10
SOLVES = "gptq.solves"  # how many GPTQ solves this process ran


def calibration() -> torch.Tensor:
    return token_batch(3, batch=10, seq=16)  # 160 tokens: enough for a 64-wide lstsq patch


def statistics(ctx: PassContext) -> dict[str, torch.Tensor]:
    """Every reduced statistic, computed on ctx.calibration (this process's share)."""
    torch.set_num_threads(1)
    out: dict[str, torch.Tensor] = {}
    module = deep_model(layers=4)
    runner = StageRunner(module, ctx.calibration, torch.float64)
    stage = next(s for s, nodes in enumerate(runner.stages) if nodes[0].layer == 0)
    runner.run(stage - 1)
    wanted = {id(n) for n in runner.stages[stage] if n.op == "linear"}
    for k, h in enumerate(stage_hessians(runner, stage, wanted, ctx.reduce).values()):
        out[f"hessian.{k}"] = h
    from splice.passes.numerics import quantizers

    solves = []
    plain = quantizers.gptq
    quantizers.gptq = lambda *a, **k: (solves.append(1), plain(*a, **k))[1]
    try:
        q = QuantizeWeightsPass(method="gptq", bits=4, group_size=16)(deep_model(layers=2), ctx)
    finally:
        quantizers.gptq = plain
    out["gptq.tokens"] = torch.tensor(float(q.report["calibration_tokens"]))
    out[SOLVES] = torch.tensor(float(len(solves)))
    for name in sorted(q.module.weights):
        if name.endswith((".qweight", ".scales", ".qzeros")):  # every rank holds every result
            out[f"gptq.{name}"] = q.module.weights[name].to(torch.float64)
    for kind in ("linearpatch", "lstsq"):
        m = deep_model(layers=4)
        before = set(m.weights)
        EstimatePatchPass(kind=kind, start=1, n=2)(m, ctx)
        for name in sorted(set(m.weights) - before):
            out[f"{kind}.{name}"] = m.weights[name].to(torch.float64)
    sel = SelectLayersPass(n=1, allow_first=True)(deep_model(layers=4), ctx).report
    out["select.scores"] = torch.tensor([sel["scores"][s] for s in sorted(sel["scores"])])
    m = deep_model(layers=2)
    values = [n.output for n in m.graph.nodes if n.role == "attn_norm"]
    for k, (lo, hi) in enumerate(calibrate_ranges(m, values, ctx.calibration, per_channel=True,
                                                  dtype=torch.float64,
                                                  reduce=ctx.reduce).values()):
        out[f"range.{k}"] = torch.stack([lo, hi])
    return out


def _worker(rank: int, port: int, path: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        reducer = TorchDistributedReducer()
        share = distributed.shard(calibration(), reducer.rank, reducer.world_size)
        stats = statistics(PassContext(calibration=share, reducer=reducer))
        save_file({k: v.contiguous() for k, v in stats.items()}, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dist") / "stats")
    mp.spawn(_worker, args=(free_port(), path), nprocs=WORLD, join=True)
    ranks = [load_file(f"{path}.{r}") for r in range(WORLD)]
    single = statistics(PassContext(calibration=calibration()))
    return single, ranks


def test_two_processes_equal_one_process_to_rounding(results):
    single, ranks = results
    assert set(single) == set(ranks[0]) == set(ranks[1])
    assert any(k.startswith("hessian.") for k in single) and "lstsq.patch.1" in "".join(single)
    assert any(k.endswith(".qweight") for k in single)
    for name, ref in single.items():
        if name == SOLVES:
            continue
        for r, stats in enumerate(ranks):
            torch.testing.assert_close(stats[name], ref, rtol=RTOL, atol=1e-12,
                                       msg=lambda m: f"rank {r}, {name}: {m}")


def test_each_process_saw_only_its_share(results):
    """The Hessian over a share is not the whole-set Hessian: the reduction did the work."""
    single, _ = results
    share = distributed.shard(calibration(), 0, WORLD)
    part = statistics(PassContext(calibration=share))
    assert not torch.allclose(part["hessian.0"], single["hessian.0"], rtol=1e-3)
    assert part["gptq.tokens"] * WORLD == single["gptq.tokens"]


def test_shard_splits_whole_rows_and_refuses_too_few():
    calib = torch.arange(7 * 3).reshape(7, 3)
    parts = [distributed.shard(calib, r, 3) for r in range(3)]
    assert [p.shape[0] for p in parts] == [3, 2, 2]
    assert torch.equal(torch.cat(parts), calib)
    with pytest.raises(InputError, match="cannot be shared by 4 processes"):
        distributed.shard(calib[:3], 0, 4)


def test_one_process_reducer_is_identity_and_checks_op():
    t = torch.randn(3)
    assert Reducer()(t) is t
    with pytest.raises(InputError, match="accepted: sum, max, min"):
        Reducer()(t, "mean")
    with pytest.raises(InputError, match="torch.distributed process group"):
        TorchDistributedReducer()


def test_gptq_solves_are_shared_out_not_repeated(results):
    """Each linear's GPTQ solve runs on one rank, which hands the result to the others."""
    single, ranks = results
    counts = [int(r[SOLVES]) for r in ranks]
    assert sum(counts) == int(single[SOLVES]) and all(0 < c < int(single[SOLVES]) for c in counts)
