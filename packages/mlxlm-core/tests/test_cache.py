"""Unit tests of mlxlm_core.cache against brute-force attention.

The reference keeps every row's own keys and values in numpy (no padding, no rotation, no
batching) and attends in float64 over exactly the positions a query may see: its own
earlier tokens, limited to the last ``window`` of them when there is a window. Whatever a
cache does inside (growth, left padding, rotation, merging rows, dropping rows,
quantization, a trip through a file), attention through it must give the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten
from mlxlm_core._errors import CheckpointError, InvalidArgumentError
from mlxlm_core.cache import (
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
    can_trim_prompt_cache,
    load_prompt_cache,
    make_prompt_cache,
    merge_caches,
    save_prompt_cache,
    trim_prompt_cache,
)
from mlxlm_core.models.base import attention

HEADS, DIM = 2, 32  # 32: the smallest group a quantized cache accepts
SCALE = DIM**-0.5


class Rows:
    """A batched cache plus, per row, the history a brute-force reference needs."""

    def __init__(self, cache: KVCache, *, window: int | None = None, seed: int = 0):
        self.cache = cache
        # What a query may see: the model's sliding window, capped by a rotating bound.
        bound = getattr(cache, "max_size", None)
        self.window = window if bound is None else min(window or bound, bound)
        self.rng = np.random.default_rng(seed)
        self.keys: list[np.ndarray] = [np.zeros((HEADS, 0, DIM)) for _ in range(cache.batch_size)]
        self.values = [k.copy() for k in self.keys]
        self.alive = list(range(cache.batch_size))  # which original row each batch row is

    def step(self, n: int, *, pads: Sequence[int] | None = None, tol: float = 1e-4) -> None:
        """Feed ``n`` positions (the first ``pads[b]`` of row b are padding) and check."""
        batch = self.cache.batch_size
        pads = pads or [0] * batch
        q, k, v = (self.rng.normal(size=(batch, HEADS, n, DIM)).astype(np.float32) for _ in "qkv")
        mask = self.cache.make_mask(n, window=self.window)
        keys, values = self.cache.update_and_fetch(mx.array(k), mx.array(v))
        out = np.array(
            attention(mx.array(q), keys, values, cache=self.cache, scale=SCALE, mask=mask)
        )
        for b in range(batch):
            row = self.alive[b]
            real = slice(pads[b], n)
            self.keys[row] = np.concatenate([self.keys[row], k[b, :, real]], axis=1)
            self.values[row] = np.concatenate([self.values[row], v[b, :, real]], axis=1)
            want = brute_force(q[b, :, real], self.keys[row], self.values[row], self.window)
            np.testing.assert_allclose(out[b, :, real], want, atol=tol, err_msg=f"row {row}")

    def filter(self, rows: Sequence[int]) -> None:
        self.cache.filter(rows)
        self.alive = [self.alive[r] for r in rows]


def brute_force(
    q: np.ndarray, keys: np.ndarray, values: np.ndarray, window: int | None
) -> np.ndarray:
    """Queries are the last ``q.shape[1]`` positions of this row's own history."""
    total, n = keys.shape[1], q.shape[1]
    out = np.zeros(q.shape)
    for i in range(n):
        p = total - n + i
        lo = 0 if window is None else max(0, p - window + 1)
        s = q[:, i : i + 1].astype(np.float64) @ keys[:, lo : p + 1].transpose(0, 2, 1) * SCALE
        w = np.exp(s - s.max(-1, keepdims=True))
        out[:, i] = ((w / w.sum(-1, keepdims=True)) @ values[:, lo : p + 1])[:, 0]
    return out


def fill(cache: KVCache, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    k, v = (
        mx.array(rng.normal(size=(cache.batch_size, HEADS, n, DIM)).astype(np.float32))
        for _ in "kv"
    )
    cache.update_and_fetch(k, v)


# -- growth and trimming ------------------------------------------------------------------


def test_growth_keeps_every_position_across_buffer_steps() -> None:
    rows = Rows(KVCache())
    rows.step(200)
    for n in (1, 30, 50, 1):  # crosses the 256-slot allocation step
        rows.step(n)
    assert rows.cache.size() == rows.cache.offset == 282
    capacity = rows.cache.keys.shape[2]  # buffers grow a whole step at a time
    assert rows.cache.size() < capacity < rows.cache.size() + KVCache.step
    keys = rows.cache.state[0]
    np.testing.assert_array_equal(np.array(keys[0]), rows.keys[0].astype(np.float32))
    assert rows.cache.nbytes == 2 * 282 * HEADS * DIM * 4


def test_trim_drops_the_tail_and_later_writes_land_after_it() -> None:
    rows = Rows(KVCache())
    rows.step(10)
    rows.step(3)
    assert trim_prompt_cache([rows.cache], 3) == 3
    rows.keys[0], rows.values[0] = rows.keys[0][:, :10], rows.values[0][:, :10]
    assert rows.cache.size() == 10 and rows.cache.positions() == 10
    rows.step(4)
    rows.step(1)
    assert trim_prompt_cache([rows.cache], 100) == 15  # never more than it holds
    assert rows.cache.empty()


def _write_behind_mlx(buffer: mx.array, slot: int, value: float) -> None:
    """What the fused CUDA decode kernel does: write one slot of a buffer MLX thinks fixed."""
    mx.eval(buffer)
    np.asarray(memoryview(buffer))[..., slot, :] = value


def test_append_in_place_writes_the_caches_own_buffers_and_spares_views() -> None:
    cache = KVCache()
    k, v = (mx.random.normal((1, HEADS, 5, DIM)) for _ in range(2))
    cache.update_and_fetch(k, v)
    kept = cache.state  # views someone keeps (a prefix cache entry, say)
    mx.eval(kept)
    own = cache.keys
    keys, values, slot = cache.append_in_place(1)
    assert keys is own and slot == 5 and cache.length == cache.offset == 6  # no copy
    _write_behind_mlx(keys, slot, 7.0)
    _write_behind_mlx(values, slot, -7.0)
    seen_k, seen_v = (np.array(a) for a in cache.state)
    assert (seen_k[..., 5, :] == 7.0).all() and (seen_v[..., 5, :] == -7.0).all()
    np.testing.assert_array_equal(np.array(kept[0]), np.array(k))
    # After a trim the next slot lies inside the kept views: the cache moves first.
    cache.trim(3)
    keys, _, slot = cache.append_in_place(1)
    assert slot == 3 and keys is not own
    _write_behind_mlx(keys, slot, 9.0)
    np.testing.assert_array_equal(np.array(kept[0]), np.array(k))
    now = np.array(cache.state[0])
    np.testing.assert_array_equal(now[..., :3, :], np.array(k)[..., :3, :])
    assert (now[..., 3, :] == 9.0).all() and now.shape[2] == 4


def test_append_in_place_grows_and_never_writes_restored_or_quantized_storage() -> None:
    cache = KVCache()
    k = mx.random.normal((1, HEADS, KVCache.step, DIM))
    cache.update_and_fetch(k, k)
    keys, _, slot = cache.append_in_place(2)  # past the full buffer: a bigger one
    assert slot == KVCache.step and keys.shape[2] == 2 * KVCache.step
    np.testing.assert_array_equal(np.array(keys[..., : KVCache.step, :]), np.array(k))
    copy = KVCache.from_state(cache.state, cache.meta_state)  # shares the source's memory
    copied, _, slot = copy.append_in_place(1)
    assert slot == KVCache.step + 2 and copied is not cache.keys
    _write_behind_mlx(copied, slot, 3.0)
    assert not (np.array(cache.keys)[..., slot, :] == 3.0).any()
    quantized = QuantizedKVCache(bits=4, group_size=32)
    quantized.update_and_fetch(k, k)
    with pytest.raises(InvalidArgumentError, match="plain arrays"):
        quantized.append_in_place(1)


def test_rotating_caches_are_not_trimmable() -> None:
    caches = [KVCache(), RotatingKVCache(max_size=4)]
    fill(caches[0], 5, 0)
    fill(caches[1], 5, 0)
    assert not can_trim_prompt_cache(caches)
    assert trim_prompt_cache(caches, 2) == 0
    assert caches[0].size() == 5


def test_quantized_trim() -> None:
    rows = Rows(QuantizedKVCache(bits=8, group_size=32))
    rows.step(6, tol=0.03)
    rows.step(1, tol=0.03)
    assert trim_prompt_cache([rows.cache], 1) == 1
    rows.keys[0], rows.values[0] = rows.keys[0][:, :6], rows.values[0][:, :6]
    rows.step(2, tol=0.03)


# -- left padding and windows --------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "window", "tol"),
    [
        (lambda **kw: KVCache(**kw), None, 1e-4),
        (lambda **kw: KVCache(**kw), 5, 1e-4),  # a sliding window over a growing cache
        (lambda **kw: RotatingKVCache(max_size=5, **kw), None, 1e-4),
        (lambda **kw: RotatingKVCache(max_size=64, **kw), 5, 1e-4),  # window < bound
        (lambda **kw: QuantizedKVCache(bits=8, group_size=32, **kw), None, 0.03),
    ],
)
def test_padded_batch_attention_equals_each_row_alone(make, window, tol) -> None:
    rows = Rows(make(batch_size=3, left_padding=[3, 0, 7]), window=window, seed=1)
    rows.step(9, pads=[3, 0, 7], tol=tol)  # row 2 has 2 real tokens, row 1 has 9
    assert np.array(rows.cache.positions()).tolist() == [6, 9, 2]
    for n in (1, 1, 3, 1, 8, 1):  # decode steps and chunks longer than the window
        rows.step(n, tol=tol)


def test_rotating_window_bounds_size_and_matches_brute_force() -> None:
    rows = Rows(RotatingKVCache(max_size=4), seed=2)
    for n in (2, 1, 1, 1, 7, 1, 1, 3, 1):
        rows.step(n)
        assert rows.cache.size() <= 4
    assert rows.cache.offset == 18 and rows.cache.positions() == 18


# -- batches: filter, extend, merge ----------------------------------------------------------


def test_filter_drops_rows_and_shared_padding() -> None:
    rows = Rows(KVCache(batch_size=3, left_padding=[4, 1, 0]), seed=3)
    rows.step(6, pads=[4, 1, 0])
    rows.step(1)
    rows.filter([0, 1])  # the unpadded row leaves: one slot of padding is now shared
    assert rows.cache.size() == 6 and rows.cache.batch_size == 2
    assert np.array(rows.cache.positions()).tolist() == [3, 6]
    rows.step(1)
    rows.filter([1])
    assert rows.cache.size() == 7 and rows.cache.positions() == 7
    assert rows.cache.make_mask(1) is None  # back to the unpadded fast path
    rows.step(2)


@pytest.mark.parametrize("kind", ["plain", "quantized"])
def test_merged_rows_attend_like_each_row_alone(kind: str) -> None:
    """Sequences prefilled alone, then batched: each row must see only its own history."""
    make = (
        (lambda: KVCache())
        if kind == "plain"
        else (lambda: QuantizedKVCache(bits=8, group_size=32))
    )
    tol = 1e-4 if kind == "plain" else 0.03
    singles = [Rows(make(), seed=10 + i) for i in range(3)]
    for rows, n in zip(singles, (4, 11, 7)):
        rows.step(n, tol=tol)
    merged = merge_caches([[r.cache] for r in singles])[0]
    assert type(merged) is type(singles[0].cache) and merged.batch_size == 3
    assert np.array(merged.positions()).tolist() == [4, 11, 7]
    batch = Rows(merged, seed=20)
    batch.keys, batch.values = [r.keys[0] for r in singles], [r.values[0] for r in singles]
    for n in (1, 2, 1):
        batch.step(n, tol=tol)
    # A newcomer joins the running batch through extend().
    newcomer = Rows(make(), seed=30)
    newcomer.step(15, tol=tol)
    batch.cache.extend(newcomer.cache)
    batch.keys.append(newcomer.keys[0])
    batch.values.append(newcomer.values[0])
    batch.alive.append(3)
    batch.step(1, tol=tol)
    batch.filter([3, 1])
    batch.step(2, tol=tol)


def test_merge_rotating_caches_with_rotated_history() -> None:
    window = 6
    singles = [Rows(RotatingKVCache(max_size=window), seed=40 + i) for i in range(3)]
    for rows, chunks in zip(singles, ((3,), (9, 1, 1), (5, 1))):  # row 1 has rotated
        for n in chunks:
            rows.step(n)
    merged = merge_caches([[r.cache] for r in singles])[0]
    assert isinstance(merged, RotatingKVCache) and merged.size() <= window
    assert np.array(merged.positions()).tolist() == [3, 11, 6]
    batch = Rows(merged, seed=50)
    batch.keys, batch.values = [r.keys[0] for r in singles], [r.values[0] for r in singles]
    for n in (1, 1, 4, 1):
        batch.step(n)
        assert batch.cache.size() <= window
    with pytest.raises(InvalidArgumentError):
        merged.extend(RotatingKVCache(max_size=window))


def join(batch: Rows, newcomer: Rows) -> Rows:
    """Merge two tracked batches into one (rows of ``newcomer`` go last)."""
    merged = merge_caches([[batch.cache], [newcomer.cache]])[0]
    out = Rows(merged, window=batch.window, seed=int(batch.rng.integers(1 << 30)))
    out.keys = [batch.keys[r] for r in batch.alive] + [newcomer.keys[r] for r in newcomer.alive]
    out.values = [batch.values[r] for r in batch.alive] + [
        newcomer.values[r] for r in newcomer.alive
    ]
    return out


_KINDS = {
    "plain": (lambda **kw: KVCache(**kw), 1e-4),
    "rotating": (lambda **kw: RotatingKVCache(max_size=5, **kw), 1e-4),
    "quantized": (lambda **kw: QuantizedKVCache(bits=8, group_size=32, **kw), 0.03),
}
_OPS = st.one_of(
    st.tuples(st.just("step"), st.integers(1, 7)),
    st.tuples(st.just("filter"), st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True)),
    st.tuples(st.just("join"), st.lists(st.integers(0, 6), min_size=1, max_size=2)),
)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    kind=st.sampled_from(sorted(_KINDS)),
    pads=st.lists(st.integers(0, 4), min_size=1, max_size=3),
    ops=st.lists(_OPS, max_size=6),
)
def test_random_batch_histories_match_brute_force(kind: str, pads: list[int], ops: list) -> None:
    """Any mix of prefill, decode, rows leaving and rows joining keeps every row exact."""
    make, tol = _KINDS[kind]
    rows = Rows(make(batch_size=len(pads), left_padding=pads), seed=len(ops))
    rows.step(max(pads) + 2, pads=pads, tol=tol)
    for op, arg in ops:
        if op == "step":
            rows.step(arg, tol=tol)
        elif op == "filter":
            keep = sorted({r % rows.cache.batch_size for r in arg})
            rows.filter(keep)
        else:  # a new padded batch, prefilled on its own, joins the running one
            new = Rows(make(batch_size=len(arg), left_padding=arg), seed=sum(arg))
            new.step(max(arg) + 1, pads=arg, tol=tol)
            rows = join(rows, new)
        if kind == "rotating":
            assert rows.cache.size() <= 5
    rows.step(1, tol=tol)


# -- quantized state and files ---------------------------------------------------------------


def test_quantized_state_is_packed_and_dequantizes_close() -> None:
    cache = QuantizedKVCache(bits=4, group_size=32)
    rng = np.random.default_rng(5)
    k = rng.normal(size=(1, HEADS, 5, DIM)).astype(np.float32)
    cache.update_and_fetch(mx.array(k), mx.array(k))
    keys = cache.state[0]
    assert len(keys) == 3 and keys[0].dtype == mx.uint32
    assert keys[0].shape == (1, HEADS, 5, DIM * 4 // 32) and keys[1].shape == (1, HEADS, 5, 1)
    back = np.array(mx.dequantize(*keys, group_size=32, bits=4))
    step = (k.max(-1, keepdims=True) - k.min(-1, keepdims=True)) / 15
    assert np.all(np.abs(back - k) <= step + 1e-5)  # within one level of its group
    assert cache.meta_state["bits"] == 4 and cache.meta_state["group_size"] == 32
    assert cache.capabilities.quantized and not KVCache.capabilities.quantized
    assert cache.nbytes < 5 * HEADS * DIM * 4 * 2 / 2  # well under the float footprint


def test_save_and_load_round_trip_all_cache_types(tmp_path) -> None:
    made = [
        Rows(KVCache(batch_size=2, left_padding=[2, 0]), seed=60),
        Rows(RotatingKVCache(max_size=5, batch_size=2, left_padding=[2, 0]), seed=61),
        Rows(QuantizedKVCache(bits=8, group_size=32, batch_size=2, left_padding=[2, 0]), seed=62),
    ]
    for rows in made:
        rows.step(7, pads=[2, 0], tol=0.03)
        rows.step(1, tol=0.03)
    path = tmp_path / "prompt.safetensors"
    save_prompt_cache(path, [r.cache for r in made], metadata={"model": "tiny", "chat": "yes"})
    loaded, info = load_prompt_cache(path, return_metadata=True)
    assert info == {"model": "tiny", "chat": "yes"}
    assert [type(c) for c in loaded] == [KVCache, RotatingKVCache, QuantizedKVCache]
    for rows, cache in zip(made, loaded):
        assert cache.meta_state == rows.cache.meta_state
        for a, b in zip(tree_flatten(cache.state), tree_flatten(rows.cache.state)):
            assert mx.array_equal(a[1], b[1])
        rows.cache = cache  # the loaded cache carries on where the saved one stopped
        rows.step(1, tol=0.03)
        rows.step(3, tol=0.03)
    assert not list(tmp_path.glob("*.partial*"))


def test_load_rejects_a_file_that_is_not_a_prompt_cache(tmp_path) -> None:
    path = tmp_path / "weights.safetensors"
    mx.save_safetensors(str(path), {"w": mx.zeros((2,))})
    with pytest.raises(CheckpointError):
        load_prompt_cache(path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(CheckpointError):
        load_prompt_cache(tmp_path / "junk.safetensors")


def test_empty_caches_are_refused_with_a_clear_error(tmp_path) -> None:
    with pytest.raises(InvalidArgumentError, match="empty"):
        save_prompt_cache(tmp_path / "c.safetensors", [KVCache()])
    for make in (KVCache, lambda: RotatingKVCache(max_size=4)):
        full = make()
        fill(full, 3, 0)
        with pytest.raises(InvalidArgumentError, match="empty"):
            merge_caches([[full], [make()]])


# -- building caches from a policy -----------------------------------------------------------


class _Layers:
    """Stands in for a model without make_cache(): only its layer count matters."""

    def __init__(self) -> None:
        self.layers = [object(), object()]


def test_make_prompt_cache_follows_the_policy() -> None:
    assert [type(c) for c in make_prompt_cache(_Layers())] == [KVCache, KVCache]
    bounded = make_prompt_cache(_Layers(), max_kv_size=16, batch_size=2, left_padding=[1, 0])
    assert all(isinstance(c, RotatingKVCache) and c.max_size == 16 for c in bounded)
    assert bounded[0].batch_size == 2
    quantized = make_prompt_cache(_Layers(), kv_bits=4, kv_group_size=32)
    assert all(isinstance(c, QuantizedKVCache) and c.bits == 4 for c in quantized)
    with pytest.raises(InvalidArgumentError):
        make_prompt_cache(_Layers(), max_kv_size=0)
    with pytest.raises(InvalidArgumentError):
        make_prompt_cache(_Layers(), kv_bits=7)
    with pytest.raises(InvalidArgumentError):
        make_prompt_cache(_Layers(), kv_bits=4, max_kv_size=8)
