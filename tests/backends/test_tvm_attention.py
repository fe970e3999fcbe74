"""TVM backend: the KV cache's dtypes, and the CPU's grouped attention
(attention.grouped_attention, scheduled as a build schedules it) against a float64 softmax
reference: grouped-query heads, one and several key splits (a split past the last key tile,
splits of several tiles), causal, sliding-window and soft-capped scores, decode rows and a
prefill chunk after a past. The keys live transposed in a cache larger than the context, whose
unused positions hold garbage that must never be read into the result (a weight not exactly 0
would show)."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install 'splice[tvm]')")

from splice.backends.tvm.attention import KEY_TILE  # noqa: E402


def _reference(q, k, v, past, *, heads, kv_heads, hd, scale, softcap, window):
    """q [s, heads*hd], k and v [kv_heads, positions, hd] (positions >= past + s): float64."""
    s = q.shape[0]
    rep = heads // kv_heads
    out = np.zeros((s, heads * hd))
    for h in range(heads):
        for i in range(s):
            keys = np.arange(past + i + 1)
            if window:
                keys = keys[past + i - keys < window]
            sc = k[h // rep, keys] @ q[i, h * hd:(h + 1) * hd].astype(np.float64) * scale
            if softcap:
                sc = np.tanh(sc / softcap) * softcap
            w = np.exp(sc - sc.max())
            out[i, h * hd:(h + 1) * hd] = (w / w.sum()) @ v[h // rep, keys]
    return out


def _build(s, *, heads, kv_heads, hd, scale, softcap, window, splits, cache="float32"):
    from tvm import s_tir, te, tirx

    from splice.backends.tvm.attention import grouped_attention
    from splice.backends.tvm.schedule import _attention

    past, cap = tirx.Var("past", "int64"), tirx.Var("capacity", "int64")
    q = te.placeholder((1, s, heads * hd), "float32", "q")
    k = te.placeholder((1, kv_heads, hd, cap), cache, "k")
    v = te.placeholder((1, kv_heads, cap, hd), cache, "v")
    out = grouped_attention(q, k, v, past, num_heads=heads, num_kv_heads=kv_heads, head_dim=hd,
                            scale=scale, causal=True, softcap=softcap, sliding_window=window,
                            splits=splits)
    sch = s_tir.Schedule(te.create_prim_func([q, k, v, past, out]))
    _attention(sch, s > 1)
    return tvm.compile(sch.mod, target=tvm.target.Target({"kind": "llvm"}))


@pytest.mark.parametrize("heads,kv_heads,hd,softcap,window", [
    (9, 3, 64, 0.0, 0), (4, 1, 256, 0.0, 0), (6, 2, 32, 30.0, 0), (4, 2, 16, 0.0, 40)])
@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("s,pasts", [(1, (0, 5, 40, 300)), (13, (0, 20))])
def test_grouped_attention_matches_the_softmax_reference(heads, kv_heads, hd, softcap, window,
                                                         splits, s, pasts):
    fn = _build(s, heads=heads, kv_heads=kv_heads, hd=hd, scale=hd ** -0.5, softcap=softcap,
                window=window, splits=splits)
    rng = np.random.default_rng(heads * 100 + hd + splits)
    for past in pasts:
        total = past + s
        cap = -(-total // KEY_TILE) * KEY_TILE + 2 * KEY_TILE
        q = rng.standard_normal((s, heads * hd)).astype(np.float32)
        # stale entries past the context: a weight that is not exactly 0 shows as ~1e30
        k = np.full((kv_heads, cap, hd), 1e30, np.float32)
        v = np.full((kv_heads, cap, hd), 1e30, np.float32)
        k[:, :total] = rng.standard_normal((kv_heads, total, hd)) * 2
        v[:, :total] = rng.standard_normal((kv_heads, total, hd))
        out = tvm.runtime.tensor(np.zeros((1, s, heads * hd), np.float32))
        fn(tvm.runtime.tensor(q[None]), tvm.runtime.tensor(np.ascontiguousarray(
            k.transpose(0, 2, 1)[None])), tvm.runtime.tensor(v[None]), past, out)
        want = _reference(q, k, v, past, heads=heads, kv_heads=kv_heads, hd=hd,
                          scale=hd ** -0.5, softcap=softcap, window=window)
        got = out.numpy()[0]
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * max(1.0, total ** 0.5),
                                   err_msg=f"past {past}")


@pytest.mark.parametrize("s,past", [(1, 300), (13, 20)])
def test_a_float16_cache_is_read_back_as_the_rounded_values(s, past):
    """The attention over float16 keys and values is the float32 attention over those values
    rounded (the cast back is exact)."""
    heads, kv_heads, hd = 6, 2, 32
    fn = _build(s, heads=heads, kv_heads=kv_heads, hd=hd, scale=hd ** -0.5, softcap=0.0,
                window=0, splits=4 if s == 1 else 1, cache="float16")
    rng = np.random.default_rng(7)
    total = past + s
    cap = -(-total // KEY_TILE) * KEY_TILE
    q = rng.standard_normal((s, heads * hd)).astype(np.float32)
    k = rng.standard_normal((kv_heads, cap, hd)).astype(np.float16)
    v = rng.standard_normal((kv_heads, cap, hd)).astype(np.float16)
    out = tvm.runtime.tensor(np.zeros((1, s, heads * hd), np.float32))
    fn(tvm.runtime.tensor(q[None]), tvm.runtime.tensor(np.ascontiguousarray(
        k.transpose(0, 2, 1)[None])), tvm.runtime.tensor(v[None]), past, out)
    want = _reference(q, k.astype(np.float32), v.astype(np.float32), past, heads=heads,
                      kv_heads=kv_heads, hd=hd, scale=hd ** -0.5, softcap=0.0, window=0)
    np.testing.assert_allclose(out.numpy()[0], want, rtol=0, atol=2e-6 * total ** 0.5)


def test_float16_cache_artefact_keeps_the_rounded_cache_and_close_logits(tmp_path):
    """A tiny Gemma 2-style model (GQA, soft-capping, a sliding window) exported with each cache
    dtype: the float16 artefact's first layer caches exactly the float32 artefact's values
    rounded (the same kernels produce them), its logits stay within float16's rounding of the
    float32 artefact's through prefill and decode steps, its cache goes back in as a dict, and
    the manifest says the dtype."""
    import json

    from splice.backends.tvm.export import export
    from splice.runtime import load

    from tests.tiny import VARIANTS, tiny_module

    module = tiny_module(seed=3, **VARIANTS["gemma2"])
    arts = {kv: load(export(module, tmp_path / kv, kv_cache=kv)) for kv in ("float32", "float16")}
    cache = json.loads((tmp_path / "float16" / "manifest.json").read_text())["tvm"]["cache"]
    assert cache["dtype"] == "float16"
    ids = np.random.default_rng(2).integers(0, module.config.vocab_size, (1, 40))
    out = {}
    for kv, art in arts.items():
        logits, c = art.logits(ids[:, :30])
        steps = [logits]
        for t in range(30, 40):
            logits, c = art.logits(ids[:, t:t + 1], c)
            steps.append(logits)
        out[kv] = (np.concatenate(steps, axis=1), c.numpy())
    (l32, c32), (l16, c16) = out["float32"], out["float16"]
    first = next(iter(c16))
    assert c16[first].dtype == np.float16
    np.testing.assert_array_equal(c16[first][:, :, :30], c32[first][:, :, :30].astype(np.float16))
    assert np.abs(l16 - l32).max() <= 2e-2 * np.abs(l32).max()
    assert np.abs(l16 - l32).max() > 0  # the cache really is float16
    again, _ = arts["float16"].logits(ids[:, 40 - 1:], c16 | {})
    assert np.isfinite(again).all()


def test_an_unknown_cache_dtype_is_refused_before_any_work(tmp_path):
    from splice.backends.tvm.export import export
    from splice.errors import InputError

    from tests.tiny import tiny_module

    with pytest.raises(InputError, match="kv_cache='bfloat16'; accepted: float32, float16"):
        export(tiny_module(seed=3), tmp_path / "art", kv_cache="bfloat16")
    assert not (tmp_path / "art").exists()
