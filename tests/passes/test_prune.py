"""select_layers and prune_layers: structural, numeric, negative and idempotent tests (STYLE 12)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from splice.frontend.decoder import build_decoder
from splice.ir import Interpreter, Module, default_feeds, past_from_present, run_logits
from splice.passes import PassContext, PassError, PassManager
from splice.passes.prune_layers import PruneLayersPass, stream_in, stream_out
from splice.passes.select_layers import SelectLayersPass
from tests.passes.models import SPECS, random_weights, token_batch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a loaded machine torch's spinning workers
    make them an order of magnitude slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def deep_model(kind: str = "llama", layers: int = 5, seed: int = 0, **changes) -> Module:
    """A seeded random decoder of family `kind` with `layers` layers (float64)."""
    spec = SPECS[kind]
    types = tuple(spec.layer_types[i % len(spec.layer_types)] for i in range(layers)) \
        if spec.layer_types else ()
    spec = dataclasses.replace(spec, num_layers=layers, layer_types=types, **changes)
    return build_decoder(spec, random_weights(spec, seed), origin="tests.prune",
                         source=f"random {kind} x{layers} seed {seed}")


def calib(seed: int = 0, batch: int = 6, seq: int = 16) -> PassContext:
    return PassContext(calibration=token_batch(seed, batch=batch, seq=seq))


def bypass_logits(module: Module, ids: torch.Tensor, start: int, n: int,
                  patch: torch.Tensor | None = None) -> torch.Tensor:
    """float64 logits of the unpruned module with the stream leaving layer start + n - 1 replaced
    by the stream entering layer start (times `patch`): what pruning must compute."""
    x_in, x_out = stream_in(module, start, "test"), stream_out(module, start + n - 1, "test")
    seen: dict[str, torch.Tensor] = {}

    def hook(node, outs):
        if node is x_in.producer:
            seen["x"] = outs[x_in.index]
        if node is x_out.producer:
            return (seen["x"] if patch is None else seen["x"] @ patch,)
        return None

    feeds = default_feeds(module, ids, None, torch.float64)
    return Interpreter(module, torch.float64).run(feeds, hook=hook)["logits"]


def logits64(module: Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    return run_logits(module, token_batch() if ids is None else ids, torch.float64)["logits"]


# -- select_layers: structural -----------------------------------------------------------------

def test_select_structural_records_the_lowest_scoring_block():
    module = deep_model()
    text = str(module.graph)
    result = SelectLayersPass(n=2)(module, calib())
    r = result.report
    assert result.modified and str(module.graph) == text
    assert sorted(r["scores"]) == [1, 2, 3]  # layer 0 is not a candidate by default
    assert r["start"] == min(r["scores"], key=r["scores"].get)
    assert module.config.extra["prune_block"] == [r["start"], 2]
    assert r["block"] == [r["start"], r["start"] + 2] and r["tokens"] == 96
    first = SelectLayersPass(n=2, allow_first=True)(deep_model(), calib()).report
    assert sorted(first["scores"]) == [0, 1, 2, 3]


# -- select_layers: numeric --------------------------------------------------------------------

@pytest.mark.parametrize("metric", ["cosine", "angular"])
def test_select_numeric_scores_match_a_direct_computation(metric):
    module = deep_model("gqa", seed=1)
    ctx = calib(1)
    r = SelectLayersPass(n=2, metric=metric)(module, ctx).report
    names = ["embed"] + [f"h.{i}" for i in range(5)]
    acts = Interpreter(module, torch.float64).run(
        default_feeds(module, ctx.calibration, None, torch.float64), capture=names)
    for s, score in r["scores"].items():
        a, b = acts[names[s]].reshape(-1, 32), acts[names[s + 2]].reshape(-1, 32)
        cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
        want = (1 - cos) if metric == "cosine" else torch.arccos(cos.clamp(-1, 1)) / math.pi
        assert score == pytest.approx(float(want.mean()), rel=1e-10)


def test_select_numeric_ppl_is_the_perplexity_without_the_block():
    module = deep_model(seed=2)
    ctx = calib(2)
    r = SelectLayersPass(n=1, metric="ppl")(module, ctx).report
    ids = ctx.calibration
    for s, score in r["scores"].items():
        logp = torch.log_softmax(bypass_logits(module, ids, s, 1)[:, :-1], -1)
        nll = -logp.gather(-1, ids[:, 1:, None]).mean()
        assert score == pytest.approx(math.exp(float(nll)), rel=1e-9)
    assert r["start"] == min(r["scores"], key=r["scores"].get)


# -- select_layers: negative -------------------------------------------------------------------

def test_select_negative_needs_calibration():
    with pytest.raises(PassError, match="calibration"):
        SelectLayersPass(n=2)(deep_model(), PassContext())


@pytest.mark.parametrize("n, match", [(0, "at least 1"), (5, "every layer"), (7, "every layer")])
def test_select_negative_block_sizes(n, match):
    module = deep_model()
    with pytest.raises(PassError, match=match):
        SelectLayersPass(n=n)(module, calib())
    assert "prune_block" not in module.config.extra


def test_select_negative_nan_activations_name_the_value():
    module = deep_model()
    ctx = calib()
    module.weights["layers.2.mlp.down_proj.weight"][0, 0] = float("nan")
    with pytest.raises(PassError, match=r"%h\.2 \(layer 2\) holds NaN"):
        SelectLayersPass(n=2)(module, ctx)


def test_select_negative_token_ids_outside_the_vocabulary():
    with pytest.raises(PassError, match="vocabulary is 0..63"):
        SelectLayersPass(n=2)(deep_model(), PassContext(calibration=torch.tensor([[1, 64]])))


# -- select_layers: idempotent -----------------------------------------------------------------

def test_select_idempotent():
    module = deep_model()
    assert SelectLayersPass(n=2)(module, calib()).modified
    extra = dict(module.config.extra)
    again = SelectLayersPass(n=2)(module, calib())
    assert not again.modified and module.config.extra == extra


# -- prune_layers: structural ------------------------------------------------------------------

def test_prune_structural_removes_and_renumbers():
    module = deep_model(layers=5)
    w3 = {k: v.clone() for k, v in module.weights.items() if k.startswith("layers.3.")}
    per_layer = len(module.graph.find(layer=0))
    result = PruneLayersPass(start=1, n=2)(module)
    g = module.graph
    assert result.modified
    assert g.layers() == [0, 1, 2] and len(g.find(layer=2)) == per_layer
    assert [v.name for v in g.inputs] == ["input_ids", "position_ids"] + [
        f"past.{i}.{kv}" for i in range(3) for kv in ("key", "value")]
    assert [v.name for v in g.outputs] == ["logits"] + [
        f"present.{i}.{kv}" for i in range(3) for kv in ("key", "value")]
    assert {k.split(".")[1] for k in module.weights if k.startswith("layers.")} == {"0", "1", "2"}
    for k, v in w3.items():  # old layer 3 is layer 1 now, same tensors
        assert torch.equal(module.weights[k.replace("layers.3.", "layers.1.")], v)
    # the old layer 3 reads the stream leaving layer 0, and is named as layer 1
    assert stream_in(module, 1, "test").name == "h.0"
    assert stream_out(module, 1, "test").name == "h.1"
    assert module.config.num_layers == 3
    assert module.config.extra["pruned"] == [{"start": 1, "n": 2, "layers": 5, "patch": None}]
    r = result.report
    assert r["block"] == [1, 3] and r["removed_nodes"] == 2 * per_layer
    assert r["removed_inputs"] == ["past.1.key", "past.1.value", "past.2.key", "past.2.value"]
    assert r["parameters_after"] < r["parameters_before"]


def test_prune_structural_takes_the_selected_block_and_consumes_it():
    module = deep_model(layers=4)
    SelectLayersPass(n=1, allow_first=True)(module, calib())
    start = module.config.extra["prune_block"][0]
    result = PruneLayersPass()(module)  # a recorded block at layer 0 was vetted by allow_first
    assert result.report["block"] == [start, start + 1]
    assert "prune_block" not in module.config.extra and module.config.num_layers == 3


# -- prune_layers: numeric ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(SPECS))
@pytest.mark.parametrize("start, n", [(1, 2), (2, 3), (0, 1)])
def test_prune_numeric_equals_bypassing_the_block(kind, start, n):
    module = deep_model(kind, layers=5, seed=3)
    ids = token_batch(3)
    want = bypass_logits(module, ids, start, n)
    PruneLayersPass(start=start, n=n, allow_first=True)(module)
    torch.testing.assert_close(logits64(module, ids), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["gqa", "gemma"])
def test_prune_numeric_kv_cache_decoding_still_agrees(kind):
    module = deep_model(kind, layers=5, seed=4)
    PruneLayersPass(start=2, n=2)(module)
    ids = token_batch(4, batch=1, seq=9)
    full = logits64(module, ids)
    first = run_logits(module, ids[:, :6], torch.float64)
    rest = run_logits(module, ids[:, 6:], torch.float64, past_from_present(first))
    torch.testing.assert_close(rest["logits"], full[:, 6:], rtol=1e-10, atol=1e-10)
    assert sorted(past_from_present(first)) == sorted(
        f"past.{i}.{kv}" for i in range(3) for kv in ("key", "value"))


def test_prune_numeric_check_reports_the_damage():
    from splice.passes import NumericCheckInstrument

    module = deep_model()
    _, report = PassManager([SelectLayersPass(n=2), PruneLayersPass()],
                            [NumericCheckInstrument(token_batch())]).run(module, calib())
    assert report[0]["numeric"]["max_rel_diff"] == 0.0  # selecting changes nothing
    assert report[1]["numeric"]["exact"] is False and report[1]["numeric"]["kl"] > 0


# -- prune_layers: negative --------------------------------------------------------------------

@pytest.mark.parametrize("settings, match", [
    (dict(start=1, n=0), "at least 1"),
    (dict(start=1, n=5), "every layer of a 5-layer model"),
    (dict(start=3, n=3), r"start must be in 1\.\.2"),
    (dict(start=0, n=2), "layer 0.*allow_first"),
    (dict(start=-2, n=2), "layer index >= 0"),
    (dict(start=1), "needs n"),
    (dict(), "no block to prune"),
])
def test_prune_negative_bad_blocks(settings, match):
    module = deep_model()
    text = str(module.graph)
    with pytest.raises(PassError, match=match):
        PruneLayersPass(**settings)(module)
    assert str(module.graph) == text and module.config.num_layers == 5


def test_prune_negative_n_disagrees_with_the_recorded_block():
    module = deep_model()
    SelectLayersPass(n=2)(module, calib())
    with pytest.raises(PassError, match="recorded block"):
        PruneLayersPass(n=3)(module)


def test_prune_negative_graph_without_layers():
    from tests.passes.models import hand_built

    module = hand_built()
    for node in module.graph.nodes:
        node.layer = None
    with pytest.raises(PassError, match="no decoder layers"):
        PruneLayersPass(start=1, n=1)(module)


# -- prune_layers: idempotent ------------------------------------------------------------------

@pytest.mark.parametrize("settings", [{}, {"start": 1, "n": 2}])
def test_prune_idempotent(settings):
    module = deep_model()
    SelectLayersPass(n=2)(module, calib())
    assert PruneLayersPass(**settings)(module).modified
    text, names = str(module.graph), sorted(module.weights)
    again = PruneLayersPass(**settings)(module)
    assert not again.modified and "skipped" in again.report
    assert str(module.graph) == text and sorted(module.weights) == names
    assert module.config.num_layers == 3
