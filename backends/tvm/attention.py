"""Attention over the in-place KV cache, and the cache append.

Cache layouts. Values are [batch, kv_heads, capacity, head_dim], the IR's present layout. Keys are
stored transposed, [batch, kv_heads, head_dim, capacity]: the scores of one query against
sixteen consecutive keys are then one vector FMA per channel (q[d] broadcast times 16 contiguous
key entries), where the IR's layout would need a horizontal sum per key or a gather. The runtime
turns keys back into the IR's layout whenever a cache leaves it (KVCache.numpy) or enters it.

CPU form (`grouped_attention`): one task per (batch, kv head, query, key split) computes the
scores of all the kv head's query heads together, so each key and value is read once for its
group (SmolLM2: 3 query heads a kv head, Gemma 3 270M: 4), and a long context is cut into up to
DECODE_SPLITS runs of keys whose partial softmaxes (max, sum, weighted values) are combined after,
flash-decoding's split: a decode step has kv_heads x splits tasks instead of heads (Gemma 3
270M: 1 kv head, so 1 task without the split). The GPU form (`attention`) keeps one row per
head for dlight's schedules.

Key tiles. The attention runs over whole tiles of KEY_TILE positions, past+seq rounded up: the
loops over keys have a constant inner extent, so they vectorise without a bounds test; positions
past the end are masked like future ones. The runtime keeps the capacity a multiple of KEY_TILE,
so a padded tile always reads inside the cache (stale or zero entries, never used: their weight
is exactly 0 through a select, not by underflow).

exp. LLVM lowers a vector exp to sixteen libm calls; `exp_f32` is the Cephes polynomial that TVM's
topi.fast_exp uses, as an expression (relative error below 4e-6 over float32's range, ~1e-7 where
softmax weights matter), so softmax and SiLU vectorise.
"""

from __future__ import annotations

from tvm import te, tirx
from tvm.script import tirx as T

KEY_TILE = 16
DECODE_SPLITS = 4  # key splits of one (kv head, query) in decode: parallelism for few kv heads

_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
      5.0000001201e-1)


def exp_f32(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """e^x for float32 without a libm call (topi's fast_exp): 2^n * p(x - n ln 2)."""
    def c(v: float):
        return tirx.const(v, "float32")

    xc = tirx.max(tirx.min(x, c(88.3762626647950)), c(-88.3762626647949))
    n = tirx.floor(xc * c(1.44269504088896341) + c(0.5))
    f = xc - n * c(0.6931471805599453)
    y = c(_P[0])
    for p in _P[1:]:
        y = y * f + c(p)
    y = y * f * f + f + c(1.0)
    two_n = tirx.reinterpret("float32", tirx.shift_left((n + c(127.0)).astype("int32"),
                                                        tirx.const(23, "int32")))
    return tirx.max(two_n * y, x)


def _allowed(i, j, past, total, *, causal: bool, sliding_window: int):
    """Whether query row i (position past + i) sees key position j."""
    cond = j < total
    if causal:
        cond = tirx.all(cond, j <= past + i)
    if sliding_window:
        cond = tirx.all(cond, past + i - j < sliding_window)
    return cond


def attention(q: te.Tensor, k_cache: te.Tensor, v_cache: te.Tensor, past: tirx.Var, *,
              num_heads: int, num_kv_heads: int, head_dim: int, scale: float, causal: bool,
              softcap: float, sliding_window: int) -> te.Tensor:
    """Grouped-query attention of q [b, s, heads*hd] over the first past+s cache positions (the
    new keys and values already appended). Masked scores are -inf before the softmax, as in the
    reference; a row always keeps its own position, so it is never all masked."""
    b, s = q.shape[0], q.shape[1]
    total = past + s
    tiles = tirx.floordiv(total - 1, KEY_TILE) + 1
    rep = num_heads // num_kv_heads
    dt = q.dtype
    tile5 = (b, num_heads, s, tiles, KEY_TILE)

    def key(jo, ji):
        return jo * KEY_TILE + ji

    d = te.reduce_axis((0, head_dim), name="d")
    score = te.compute(tile5, lambda ib, h, i, jo, ji: te.sum(
        q[ib, i, h * head_dim + d] * k_cache[ib, h // rep, d, key(jo, ji)].astype(dt), axis=d),
        name="score")

    def allowed(i, j):
        return _allowed(i, j, past, total, causal=causal, sliding_window=sliding_window)

    def fmask(ib, h, i, jo, ji):
        v = score[ib, h, i, jo, ji] * tirx.const(scale, dt)
        if softcap:
            v = te.tanh(v / tirx.const(softcap, dt)) * tirx.const(softcap, dt)
        return tirx.Select(allowed(i, key(jo, ji)), v, tirx.min_value(dt))
    masked = te.compute(tile5, fmask, name="masked")
    ro, ri = te.reduce_axis((0, tiles), name="ro"), te.reduce_axis((0, KEY_TILE), name="ri")
    mx = te.compute((b, num_heads, s), lambda ib, h, i: te.max(masked[ib, h, i, ro, ri],
                                                                axis=[ro, ri]), name="rowmax")
    ex = te.compute(tile5, lambda ib, h, i, jo, ji: tirx.Select(
        allowed(i, key(jo, ji)), exp_f32(masked[ib, h, i, jo, ji] - mx[ib, h, i]),
        tirx.const(0.0, dt)), name="exp")
    so, si = te.reduce_axis((0, tiles), name="so"), te.reduce_axis((0, KEY_TILE), name="si")
    den = te.compute((b, num_heads, s), lambda ib, h, i: te.sum(ex[ib, h, i, so, si],
                                                                 axis=[so, si]), name="rowsum")
    wo, wi = te.reduce_axis((0, tiles), name="wo"), te.reduce_axis((0, KEY_TILE), name="wi")
    num = te.compute((b, num_heads, s, head_dim), lambda ib, h, i, dd: te.sum(
        ex[ib, h, i, wo, wi] * v_cache[ib, h // rep, key(wo, wi), dd].astype(dt), axis=[wo, wi]),
        name="weighted")
    return te.compute((b, s, num_heads * head_dim), lambda ib, i, c: num[
        ib, c // head_dim, i, c % head_dim] / den[ib, c // head_dim, i], name="attention")


def grouped_attention(q: te.Tensor, k_cache: te.Tensor, v_cache: te.Tensor, past: tirx.Var, *,
                      num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                      causal: bool, softcap: float, sliding_window: int,
                      splits: int = 1) -> te.Tensor:
    """`attention`'s result, computed per (kv head, key split) (module docstring): the split's
    softmax over its keys relative to its own max m_p, with sum l_p and weighted values a_p;
    then with M = max_p m_p, out = sum_p a_p e^(m_p - M) / sum_p l_p e^(m_p - M). With one split
    the split's weight is e^0 = 1 exactly, and the result is `attention`'s up to the order of the
    float32 sums (each key lane's over the tiles first); with more, the splits' rounding too.
    A split past the last key tile reads the last tile again (clamped inside the cache) and masks
    it: its sum and values are 0 (the splits cover at most splits - 1 tiles past the last)."""
    b, s = q.shape[0], q.shape[1]
    total = past + s
    tiles = tirx.floordiv(total - 1, KEY_TILE) + 1
    per = tirx.floordiv(tiles - 1, splits) + 1  # key tiles a split
    rep, kvh, hd, dt = num_heads // num_kv_heads, num_kv_heads, head_dim, q.dtype
    shape = (b, kvh, s, splits, rep, per, KEY_TILE)
    part = shape[:5]

    def key(p, t, ji):
        return (p * per + t) * KEY_TILE + ji

    def column(p, t, ji):  # the cache position read: the tile clamped inside the cache
        return tirx.min(p * per + t, tiles - 1) * KEY_TILE + ji

    def allowed(i, p, t, ji):
        return _allowed(i, key(p, t, ji), past, total, causal=causal,
                        sliding_window=sliding_window)

    d = te.reduce_axis((0, hd), name="d")
    score = te.compute(shape, lambda ib, g, i, p, r, t, ji: te.sum(
        q[ib, i, (g * rep + r) * hd + d] * k_cache[ib, g, d, column(p, t, ji)].astype(dt), axis=d),
        name="score")

    def fmask(ib, g, i, p, r, t, ji):
        v = score[ib, g, i, p, r, t, ji] * tirx.const(scale, dt)
        if softcap:
            v = te.tanh(v / tirx.const(softcap, dt)) * tirx.const(softcap, dt)
        return tirx.Select(allowed(i, p, t, ji), v, tirx.min_value(dt))
    masked = te.compute(shape, fmask, name="masked")

    def lanes_then_total(name, src, combine, axis_name):
        """A reduction over (t, ji) in two stages, each lane's over the tiles then the lanes,
        so the first vectorises over the key tile."""
        t = te.reduce_axis((0, per), name=f"{axis_name}_t")
        lanes = te.compute((*part, KEY_TILE), lambda ib, g, i, p, r, ji: combine(
            src[ib, g, i, p, r, t, ji], axis=t), name=f"{name}_lanes")
        j = te.reduce_axis((0, KEY_TILE), name=f"{axis_name}_j")
        return te.compute(part, lambda ib, g, i, p, r: combine(
            lanes[ib, g, i, p, r, j], axis=j), name=name)
    mx = lanes_then_total("split_max", masked, te.max, "m")
    ex = te.compute(shape, lambda ib, g, i, p, r, t, ji: tirx.Select(
        allowed(i, p, t, ji), exp_f32(masked[ib, g, i, p, r, t, ji] - mx[ib, g, i, p, r]),
        tirx.const(0.0, dt)), name="exp")
    sm = lanes_then_total("split_sum", ex, te.sum, "s")
    wo, wi = te.reduce_axis((0, per), name="wo"), te.reduce_axis((0, KEY_TILE), name="wi")
    acc = te.compute((*part, hd), lambda ib, g, i, p, r, dd: te.sum(
        ex[ib, g, i, p, r, wo, wi] * v_cache[ib, g, column(p, wo, wi), dd].astype(dt),
        axis=[wo, wi]),
        name="weighted")
    # the split's results in one row (its hd weighted sums, its max, its sum): the block its
    # task ends with, so that every stage above computes under the task
    partial = te.compute((*part, hd + 2), lambda ib, g, i, p, r, c: tirx.Select(
        c < hd, acc[ib, g, i, p, r, tirx.min(c, hd - 1)], tirx.Select(
            c == hd, mx[ib, g, i, p, r], sm[ib, g, i, p, r])), name="partial")
    head = (b, kvh, s, rep)
    pm = te.reduce_axis((0, splits), name="pm")
    top = te.compute(head, lambda ib, g, i, r: te.max(partial[ib, g, i, pm, r, hd], axis=pm),
                     name="top")
    weight = te.compute(part, lambda ib, g, i, p, r: exp_f32(
        partial[ib, g, i, p, r, hd] - top[ib, g, i, r]), name="split_weight")
    ps = te.reduce_axis((0, splits), name="ps")
    den = te.compute(head, lambda ib, g, i, r: te.sum(
        partial[ib, g, i, ps, r, hd + 1] * weight[ib, g, i, ps, r], axis=ps), name="rowsum")
    pw = te.reduce_axis((0, splits), name="pw")
    num = te.compute((*head, hd), lambda ib, g, i, r, dd: te.sum(
        partial[ib, g, i, pw, r, dd] * weight[ib, g, i, pw, r], axis=pw), name="combined")

    def out(ib, i, c):
        g, r = c // (rep * hd), c // hd % rep
        return num[ib, g, i, r, c % hd] / den[ib, g, i, r]
    return te.compute((b, s, num_heads * hd), out, name="attention")


def kv_append_func(kv_heads: int, head_dim: int, dtype: str, *, transposed: bool):
    """Write new [b, s, kv_heads*head_dim] (float32) at positions past..past+s-1 of a cache of
    `dtype`, in place (call_tir_inplace): cache[b, h, past+i, d] for values, cache[b, h, d,
    past+i] for the transposed keys, cast to `dtype` (float16: rounded to nearest). The cache
    never moves; a step writes only its own positions."""
    kvh, hd = T.int64(kv_heads), T.int64(head_dim)

    @T.prim_func(private=True, s_tir=True)
    def kv_append(var_cache: T.handle, var_new: T.handle, past: T.int64):
        T.func_attr({"tirx.noalias": True, "splice.kernel": "kv_append"})
        batch, capacity, seq = T.int64(), T.int64(), T.int64()
        cache = T.match_buffer(var_cache, (batch, kvh, capacity, hd), dtype)
        new = T.match_buffer(var_new, (batch, seq, kvh * hd), "float32")
        for ib, h, i, d in T.grid(batch, kvh, seq, hd):
            with T.sblock("append"):
                vb, vh, vi, vd = T.axis.remap("SSSS", [ib, h, i, d])
                cache[vb, vh, past + vi, vd] = T.Cast(dtype, new[vb, vi, vh * hd + vd])

    @T.prim_func(private=True, s_tir=True)
    def kv_append_t(var_cache: T.handle, var_new: T.handle, past: T.int64):
        T.func_attr({"tirx.noalias": True, "splice.kernel": "kv_append"})
        batch, capacity, seq = T.int64(), T.int64(), T.int64()
        cache = T.match_buffer(var_cache, (batch, kvh, hd, capacity), dtype)
        new = T.match_buffer(var_new, (batch, seq, kvh * hd), "float32")
        for ib, h, i, d in T.grid(batch, kvh, seq, hd):
            with T.sblock("append"):
                vb, vh, vi, vd = T.axis.remap("SSSS", [ib, h, i, d])
                cache[vb, vh, vd, past + vi] = T.Cast(dtype, new[vb, vi, vh * hd + vd])
    return kv_append_t if transposed else kv_append
