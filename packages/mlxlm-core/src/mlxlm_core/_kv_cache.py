"""The growing key/value cache, :class:`KVCache`, and what every cache shares (see :mod:`.cache`).

Kept apart from :mod:`.cache` (the public module, which re-exports all of it) so that the
base cache, its in-place appends and its bookkeeping read as one unit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import mlx.core as mx
from mlx.utils import tree_map

from ._errors import InvalidArgumentError
from ._mx_typed import flat_items, int_list, item_int

__all__ = [
    "CacheCapabilities",
    "CachePolicy",
    "KVCache",
    "Mask",
    "cat_rows",
    "cat_time",
    "pad_time",
]

Mask = mx.array | str | None


@dataclass(frozen=True)
class CacheCapabilities:
    """What a cache type supports; the engine and tools check these, never ``hasattr``."""

    trimmable: bool
    mergeable: bool
    quantized: bool
    serialisable: bool


@dataclass(frozen=True)
class CachePolicy:
    """How a model should build its caches.

    ``max_kv_size`` bounds every layer's cache (a rotating window); ``kv_bits`` stores keys
    and values quantized.
    """

    max_kv_size: int | None = None
    kv_bits: int | None = None
    kv_group_size: int = 64

    def __post_init__(self) -> None:
        if self.max_kv_size is not None and self.max_kv_size < 1:
            raise InvalidArgumentError(f"max_kv_size must be positive, got {self.max_kv_size}")
        if self.kv_bits is not None and self.kv_bits not in (2, 3, 4, 5, 6, 8):
            raise InvalidArgumentError(f"kv_bits must be one of 2,3,4,5,6,8, got {self.kv_bits}")


def cat_rows(*parts: mx.array) -> mx.array:
    return mx.concatenate(list(parts), axis=0)


def cat_time(*parts: mx.array) -> mx.array:
    return mx.concatenate(list(parts), axis=2)


def pad_time(x: mx.array, left: int, right: int = 0) -> mx.array:
    if left == 0 and right == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[2] = (left, right)
    return mx.pad(x, widths)


class KVCache:
    """Growing cache: keeps every position, grows its buffers in steps of ``step``."""

    capabilities: ClassVar[CacheCapabilities] = CacheCapabilities(
        trimmable=True, mergeable=True, quantized=False, serialisable=True
    )
    step: ClassVar[int] = 256
    # The (keys, values) objects last known to be referenced by this cache alone, in
    # row-contiguous buffers (see append_in_place); any other assignment voids it.
    _sole: tuple[Any, Any] | None = None
    _views_out = False  # views were handed out since the buffers were last made fresh

    def __init__(self, *, batch_size: int = 1, left_padding: Sequence[int] | None = None) -> None:
        self.keys: Any = None
        self.values: Any = None
        self.length = 0  # filled slots along the time axis
        self.offset = 0  # absolute positions processed (== length unless slots were dropped)
        pads = list(left_padding) if left_padding is not None else [0] * batch_size
        # starts: where each row's tokens begin (its rope origin); valid_from: the first
        # absolute position whose slot holds data. They differ only for rows merged into a
        # rotating window after part of their history rotated out.
        self.starts = mx.array(pads, dtype=mx.int32)
        self.valid_from = self.starts
        self._padded = any(p > 0 for p in pads)  # some slots hold no data: masks needed
        self._shifted = self._padded  # rows start at different positions: per-row rope

    # -- storage ---------------------------------------------------------------------
    def _store(self, x: mx.array) -> Any:
        return x

    def _slice(self, stored: Any, stop: int) -> Any:
        return tree_map(lambda a: a[..., :stop, :], stored)

    def _alloc(self, new: Any, capacity: int) -> Any:
        return tree_map(lambda a: mx.zeros((*a.shape[:2], capacity, a.shape[3]), a.dtype), new)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Any, Any]:
        """Append ``n`` new positions and return everything attention should see."""
        n = keys.shape[2]
        k_new, v_new = self._store(keys), self._store(values)
        capacity = 0 if self.keys is None else self._slots()
        # Writing into a buffer only this cache holds leaves it so (MLX updates it in place
        # or, if something else still reads it, copies it first).
        sole = self._holds_sole_buffers()
        if self.length + n > capacity:
            sole = True
            grow = ((n + self.step - 1) // self.step) * self.step
            k_more, v_more = self._alloc(k_new, grow), self._alloc(v_new, grow)
            if self.keys is None:
                self.keys, self.values = k_more, v_more
            else:
                filled = self.length

                def grow_into(old: mx.array, more: mx.array) -> mx.array:
                    return mx.concatenate([old[..., :filled, :], more], axis=2)

                self.keys = tree_map(grow_into, self.keys, k_more)
                self.values = tree_map(grow_into, self.values, v_more)
        end = self.length + n

        def write(buf: mx.array, new: mx.array) -> mx.array:
            buf[..., self.length : end, :] = new
            return buf

        self.keys = tree_map(write, self.keys, k_new)
        self.values = tree_map(write, self.values, v_new)
        self.length = end
        self.offset += n
        self._sole = (self.keys, self.values) if sole else None
        self._views_out = True
        return self._slice(self.keys, end), self._slice(self.values, end)

    def _slots(self) -> int:
        """Slots the buffers hold (read every step: no tree walk for plain arrays)."""
        keys = self.keys
        return keys.shape[2] if isinstance(keys, mx.array) else flat_items(keys)[0][1].shape[2]

    def _holds_sole_buffers(self) -> bool:
        sole = self._sole
        return sole is not None and sole[0] is self.keys and sole[1] is self.values

    def append_in_place(self, n: int = 1) -> tuple[mx.array, mx.array, int]:
        """Room for ``n`` positions that a kernel writes itself: ``(keys, values, slot)``.

        The cache advances by ``n`` and returns its buffers, row-contiguous and referenced by
        it alone, so a kernel may write slots ``slot .. slot + n - 1`` without MLX knowing
        (the fused CUDA decode step does, saving two operations per layer). Views handed
        out before (``state``, ``update_and_fetch``) keep their contents: new slots lie
        beyond them, and when a trim would let a write reach into one, the cache first
        moves to fresh buffers. Plain single-array storage only.
        """
        if not isinstance(self.keys, mx.array) or not isinstance(self.values, mx.array):
            raise InvalidArgumentError("append_in_place needs a cache holding plain arrays")
        end = self.length + n
        if not self._holds_sole_buffers() or end > self.keys.shape[2]:
            capacity = self.length + ((n + self.step - 1) // self.step) * self.step
            self.keys, self.values = (self._fresh(a, capacity) for a in (self.keys, self.values))
            self._views_out = False
        slot = self.length
        self.length = end
        self.offset += n
        self._sole = (self.keys, self.values)
        return self.keys, self.values, slot

    def _fresh(self, buffer: mx.array, capacity: int) -> mx.array:
        """A new buffer of ``capacity`` slots holding the filled ones of ``buffer``."""
        b, h, _, d = buffer.shape
        empty = mx.zeros((b, h, capacity - self.length, d), buffer.dtype)
        return mx.concatenate([buffer[..., : self.length, :], empty], axis=2)

    # -- what the model asks ---------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return int(self.starts.shape[0])

    def positions(self) -> int | mx.array:
        """Rope offset of the next token, per row when rows are padded."""
        return self.offset - self.starts if self._shifted else self.offset

    def make_mask(self, n: int, *, window: int | None = None) -> Mask:
        """Mask for ``n`` new queries against the cache after they are added."""
        total = self.length + n
        if not self._padded and (window is None or total <= window):
            return None if n == 1 else "causal"
        first = self.offset + n - total  # absolute position of slot 0
        key_pos = mx.arange(first, first + total)
        query_pos = mx.arange(self.offset, self.offset + n)
        mask = query_pos[:, None] >= key_pos[None]
        if window is not None:
            mask = mask & (key_pos[None] > query_pos[:, None] - window)
        if self._padded:
            valid = key_pos[None] >= self.valid_from[:, None]  # (B, total)
            return mask[None, None] & valid[:, None, None, :]
        return mask

    def _refresh_flags(self) -> None:
        first = self.offset - self.length  # absolute position of slot 0
        self._padded = bool(mx.any(self.valid_from > first).item())
        self._shifted = bool(mx.any(self.starts != 0).item())

    # -- capabilities ----------------------------------------------------------------
    def size(self) -> int:
        return self.length

    def trim(self, n: int) -> int:
        """Drop the last ``n`` positions; returns how many were dropped."""
        n = min(self.length, n)
        if n and self._views_out:
            self._sole = None  # a view may cover slots that appending would now rewrite
        self.length -= n
        self.offset -= n
        return n

    def filter(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` of the batch (finished sequences leave)."""
        idx = mx.array(list(rows), dtype=mx.int32)
        if self.keys is not None:
            self.keys = tree_map(lambda a: a[idx], self.keys)
            self.values = tree_map(lambda a: a[idx], self.values)
        self.starts = self.starts[idx]
        self.valid_from = self.valid_from[idx]
        self._drop_common_padding()

    def _drop_common_padding(self) -> None:
        """Remove slots that every row pads, so caches stay as short as possible."""
        if self.batch_size == 0:
            return
        first = self.offset - self.length
        common = item_int(mx.min(self.starts)) - first
        if common > 0 and self.keys is not None:
            self.keys = tree_map(lambda a: a[..., common:, :], self.keys)
            self.values = tree_map(lambda a: a[..., common:, :], self.values)
            self.length -= common
        self.starts = self.starts - item_int(mx.min(self.starts))
        self.valid_from = self.starts
        self.offset = self.length
        self._refresh_flags()

    def extend(self, other: KVCache) -> None:
        """Append the rows of ``other`` to this batch, right-aligning both time axes."""
        if other.keys is None:
            raise InvalidArgumentError("cannot merge an empty cache into a batch")
        if self.keys is None or self.batch_size == 0:
            self.__dict__.update(other.__dict__)
            self._sole = None  # both caches now hold the same buffers
            return
        mine, theirs = self.length, other.length
        total = max(mine, theirs)

        def aligned(cache: KVCache, stored: Any) -> Any:
            trimmed = cache._slice(stored, cache.length)
            return tree_map(lambda a: pad_time(a, total - cache.length), trimmed)

        self.keys = tree_map(cat_rows, aligned(self, self.keys), aligned(other, other.keys))
        self.values = tree_map(cat_rows, aligned(self, self.values), aligned(other, other.values))
        # Express both rows' starts relative to the new common slot 0.
        mine_starts = self.starts - (self.offset - self.length) + (total - mine)
        their_starts = other.starts - (other.offset - other.length) + (total - theirs)
        self.starts = mx.concatenate([mine_starts, their_starts])
        self.valid_from = self.starts
        self.length = self.offset = total
        self._refresh_flags()

    # -- serialisation ---------------------------------------------------------------
    @property
    def state(self) -> tuple[Any, Any]:
        self._views_out = True
        return self._slice(self.keys, self.length), self._slice(self.values, self.length)

    @property
    def meta_state(self) -> dict[str, Any]:
        return {
            "offset": self.offset,
            "starts": int_list(self.starts),
            "valid_from": int_list(self.valid_from),
        }

    @classmethod
    def from_state(cls, state: tuple[Any, Any], meta: dict[str, Any]) -> KVCache:
        cache = cls.__new__(cls)
        cache._restore(state, meta)
        return cache

    def _restore(self, state: tuple[Any, Any], meta: dict[str, Any]) -> None:
        self.keys, self.values = state
        self.length = self._slots()
        self.offset = int(meta["offset"])
        self.starts = mx.array(meta["starts"], dtype=mx.int32)
        self.valid_from = mx.array(meta.get("valid_from", meta["starts"]), dtype=mx.int32)
        self._refresh_flags()

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        arrays = [a for _, a in flat_items(self.state)]
        return sum(a.nbytes for a in arrays)

    def empty(self) -> bool:
        return self.keys is None or self.length == 0
