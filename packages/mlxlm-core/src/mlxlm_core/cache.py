"""Key/value caches.

Every cache here is batched: it holds ``B`` rows that share one time axis, each row
left-padded to a common length. A single sequence is simply ``B == 1`` with no padding, so
single-sequence and batched generation run the same code (one engine).

Row ``b`` starts at absolute slot ``starts[b]`` (its left padding). The model asks the cache
for two things besides storage: the rope offset of each row (:meth:`positions`) and the
attention mask for ``n`` new queries (:meth:`make_mask`). Caches declare what they can do in
:class:`CacheCapabilities` instead of being probed with ``hasattr``.

Layout of stored arrays: ``(B, kv_heads, T, head_dim)``; a quantized cache stores each of
keys and values as the ``(packed, scales, biases)`` triple of :func:`mx.quantize`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, overload

import mlx.core as mx
from mlx.utils import tree_map, tree_unflatten

from ._errors import CheckpointError, InvalidArgumentError
from ._kv_cache import (
    CacheCapabilities,
    CachePolicy,
    KVCache,
    Mask,
    cat_rows,
    cat_time,
    pad_time,
)
from ._mx_typed import flat_items

__all__ = [
    "CacheCapabilities",
    "CachePolicy",
    "KVCache",
    "QuantizedKVCache",
    "RotatingKVCache",
    "can_trim_prompt_cache",
    "load_prompt_cache",
    "make_prompt_cache",
    "merge_caches",
    "save_prompt_cache",
    "trim_prompt_cache",
]


class RotatingKVCache(KVCache):
    """A window of the last ``max_size`` positions (``max_kv_size``, sliding windows).

    Positions are stored in temporal order (the oldest dropped by slicing), which keeps
    masks and batching simple; the copy this costs per step is bounded by the window.
    """

    capabilities: ClassVar[CacheCapabilities] = CacheCapabilities(
        trimmable=False, mergeable=True, quantized=False, serialisable=True
    )

    def __init__(
        self, *, max_size: int, batch_size: int = 1, left_padding: Sequence[int] | None = None
    ) -> None:
        super().__init__(batch_size=batch_size, left_padding=left_padding)
        if max_size < 1:
            raise InvalidArgumentError(f"max_kv_size must be positive, got {max_size}")
        self.max_size = max_size

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Any, Any]:
        k_new, v_new = self._store(keys), self._store(values)
        n = keys.shape[2]
        if self.keys is None:
            k_all, v_all = k_new, v_new
        else:
            k_all, v_all = (
                tree_map(cat_time, self.keys, k_new),
                tree_map(cat_time, self.values, v_new),
            )
        self.offset += n
        total = self.length + n
        # These n queries need the last (max_size - 1) old positions; make_mask() then limits
        # each query to its own window.
        visible = min(total, self.max_size - 1 + n)

        def last(size: int) -> Callable[[mx.array], mx.array]:
            return lambda a: a[..., total - size :, :]

        k_vis, v_vis = tree_map(last(visible), k_all), tree_map(last(visible), v_all)
        self.length = min(total, self.max_size)
        self.keys = tree_map(last(self.length), k_all)
        self.values = tree_map(last(self.length), v_all)
        return k_vis, v_vis

    def make_mask(self, n: int, *, window: int | None = None) -> Mask:
        window = self.max_size if window is None else min(window, self.max_size)
        visible = min(self.length + n, self.max_size - 1 + n)
        if not self._padded:
            if n == 1:
                return None
            if self.length + n <= window:
                return "causal"
        end = self.offset + n  # absolute positions of what update_and_fetch() returns
        key_pos = mx.arange(end - visible, end)
        query_pos = mx.arange(self.offset, end)
        mask = (query_pos[:, None] >= key_pos[None]) & (key_pos[None] > query_pos[:, None] - window)
        if self._padded:
            valid = key_pos[None] >= self.valid_from[:, None]
            return mask[None, None] & valid[:, None, None, :]
        return mask

    def trim(self, n: int) -> int:
        return 0

    def _drop_common_padding(self) -> None:
        # Slots map to absolute positions through the window; only refresh the flags. Once
        # padding has rotated out no mask is needed, but rows still keep their own positions.
        self._refresh_flags()

    def extend(self, other: KVCache) -> None:
        raise InvalidArgumentError("rotating caches join a batch through merge_caches()")

    @property
    def meta_state(self) -> dict[str, Any]:
        return {**super().meta_state, "max_size": self.max_size}

    def _restore(self, state: tuple[Any, Any], meta: dict[str, Any]) -> None:
        super()._restore(state, meta)
        self.max_size = int(meta["max_size"])


class QuantizedKVCache(KVCache):
    """Keys and values stored quantized (``bits``, ``group_size``), attended in place."""

    capabilities: ClassVar[CacheCapabilities] = CacheCapabilities(
        trimmable=True, mergeable=True, quantized=True, serialisable=True
    )

    def __init__(
        self,
        *,
        bits: int = 8,
        group_size: int = 64,
        batch_size: int = 1,
        left_padding: Sequence[int] | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, left_padding=left_padding)
        self.bits = bits
        self.group_size = group_size

    def _store(self, x: mx.array) -> Any:
        if x.shape[-1] % self.group_size:
            raise InvalidArgumentError(
                f"kv_group_size {self.group_size} does not divide the head dimension {x.shape[-1]}"
            )
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    @property
    def meta_state(self) -> dict[str, Any]:
        return {**super().meta_state, "bits": self.bits, "group_size": self.group_size}

    def _restore(self, state: tuple[Any, Any], meta: dict[str, Any]) -> None:
        super()._restore((tuple(state[0]), tuple(state[1])), meta)
        self.bits = int(meta["bits"])
        self.group_size = int(meta["group_size"])


# ----------------------------------------------------------------------------------------
# Building, merging and trimming whole prompt caches (one cache per layer)


def make_prompt_cache(
    model: Any,
    *,
    max_kv_size: int | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    batch_size: int = 1,
    left_padding: Sequence[int] | None = None,
) -> list[KVCache]:
    """One cache per layer, as the model's ``make_cache(policy)`` wants, or the default."""
    policy = CachePolicy(max_kv_size=max_kv_size, kv_bits=kv_bits, kv_group_size=kv_group_size)
    if hasattr(model, "make_cache"):
        caches = model.make_cache(policy, batch_size=batch_size, left_padding=left_padding)
    else:
        caches = [
            cache_for_policy(policy, batch_size=batch_size, left_padding=left_padding)
            for _ in model.layers
        ]
    return caches


def cache_for_policy(
    policy: CachePolicy,
    *,
    window: int | None = None,
    batch_size: int = 1,
    left_padding: Sequence[int] | None = None,
) -> KVCache:
    """The cache one attention layer gets under ``policy`` (``window``: its sliding window)."""
    bound = policy.max_kv_size
    if window is not None:
        bound = window if bound is None else min(bound, window)
    if bound is not None:
        if policy.kv_bits is not None:
            raise InvalidArgumentError("kv_bits cannot be combined with a bounded (rotating) cache")
        return RotatingKVCache(max_size=bound, batch_size=batch_size, left_padding=left_padding)
    if policy.kv_bits is not None:
        return QuantizedKVCache(
            bits=policy.kv_bits,
            group_size=policy.kv_group_size,
            batch_size=batch_size,
            left_padding=left_padding,
        )
    return KVCache(batch_size=batch_size, left_padding=left_padding)


def merge_caches(per_sequence: Sequence[Sequence[KVCache]]) -> list[KVCache]:
    """Stack several single-sequence prompt caches (layer lists) into one batched cache."""
    if not per_sequence:
        raise InvalidArgumentError("nothing to merge")
    merged: list[KVCache] = []
    for layer_caches in zip(*per_sequence):
        first = layer_caches[0]
        if any(c.empty() for c in layer_caches):
            raise InvalidArgumentError("cannot merge an empty cache into a batch")
        if not first.capabilities.mergeable:
            raise InvalidArgumentError(f"{type(first).__name__} cannot be batched")
        if isinstance(first, RotatingKVCache):
            merged.append(_merge_rotating(list(layer_caches)))  # type: ignore[arg-type]
            continue
        base = type(first).from_state(first.state, first.meta_state)
        for other in layer_caches[1:]:
            base.extend(other)
        merged.append(base)
    return merged


def _merge_rotating(caches: list[RotatingKVCache]) -> RotatingKVCache:
    """Right-align rotating caches by their last position so one window serves all rows."""
    end = max(c.offset for c in caches)
    length = max(c.length for c in caches)
    keys, values, starts, valid_from = [], [], [], []
    for c in caches:
        shift = end - c.offset  # this row's positions, seen from the merged clock
        k, v = c.state
        keys.append(tree_map(lambda a, c=c: pad_time(a, length - c.length), k))
        values.append(tree_map(lambda a, c=c: pad_time(a, length - c.length), v))
        starts.append(c.starts + shift)
        first_stored = end - c.length
        valid_from.append(mx.maximum(c.valid_from + shift, first_stored))
    out = RotatingKVCache(max_size=caches[0].max_size, batch_size=len(caches))
    out.keys = tree_map(cat_rows, *keys)
    out.values = tree_map(cat_rows, *values)
    out.length, out.offset = length, end
    out.starts = mx.concatenate(starts)
    out.valid_from = mx.concatenate(valid_from)
    out._drop_common_padding()
    return out


def can_trim_prompt_cache(cache: Sequence[KVCache]) -> bool:
    return all(c.capabilities.trimmable for c in cache)


def trim_prompt_cache(cache: Sequence[KVCache], num_tokens: int) -> int:
    """Drop the last ``num_tokens`` of every layer; returns how many were dropped."""
    if not can_trim_prompt_cache(cache) or not cache:
        return 0
    dropped = [c.trim(num_tokens) for c in cache]  # every layer, not just the first
    return dropped[0]


# ----------------------------------------------------------------------------------------
# Prompt-cache files: safetensors with the arrays and the class/meta of each layer

_CACHE_TYPES: dict[str, type[KVCache]] = {
    cls.__name__: cls for cls in (KVCache, RotatingKVCache, QuantizedKVCache)
}


def save_prompt_cache(
    path: str | Path, cache: Sequence[KVCache], metadata: dict[str, str] | None = None
) -> None:
    """Write a prompt cache (and string metadata) to ``path`` atomically."""
    path = Path(path)
    arrays: dict[str, mx.array] = {}
    for i, c in enumerate(cache):
        if not c.capabilities.serialisable:
            raise InvalidArgumentError(f"{type(c).__name__} cannot be saved")
        if c.empty():
            raise InvalidArgumentError(f"layer {i}: an empty cache cannot be saved")
        for key, arr in flat_items(c.state):
            arrays[f"{i}.{key}"] = arr
    layers = [{"type": type(c).__name__, "meta": c.meta_state} for c in cache]
    info = {"mlxlm.layers": json.dumps(layers), **(metadata or {})}
    tmp = path.with_name(path.name + ".partial.safetensors")
    try:
        mx.save_safetensors(str(tmp), arrays, metadata=info)
        tmp.replace(path)
    except (OSError, RuntimeError) as exc:
        tmp.unlink(missing_ok=True)
        raise InvalidArgumentError(f"cannot write prompt cache {path}: {exc}") from None


@overload
def load_prompt_cache(
    path: str | Path, *, return_metadata: Literal[False] = False
) -> list[KVCache]: ...


@overload
def load_prompt_cache(
    path: str | Path, *, return_metadata: Literal[True]
) -> tuple[list[KVCache], dict[str, str]]: ...


@overload
def load_prompt_cache(
    path: str | Path, *, return_metadata: bool
) -> list[KVCache] | tuple[list[KVCache], dict[str, str]]: ...


def load_prompt_cache(
    path: str | Path, *, return_metadata: bool = False
) -> list[KVCache] | tuple[list[KVCache], dict[str, str]]:
    """Read a file written by :func:`save_prompt_cache`."""
    arrays: dict[str, mx.array]
    info: dict[str, str]
    try:
        loaded = mx.load(str(path), return_metadata=True)
        # With return_metadata=True the result is always an (arrays, metadata) pair.
        assert isinstance(loaded, tuple)
        arrays, info = loaded
        layers = json.loads(info.pop("mlxlm.layers"))
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: not a prompt-cache file ({exc})") from None
    cache: list[KVCache] = []
    for i, layer in enumerate(layers):
        prefix = f"{i}."
        items = [(k[len(prefix) :], v) for k, v in arrays.items() if k.startswith(prefix)]
        state = tree_unflatten(items)
        state = (state[0], state[1]) if isinstance(state, list) else state
        cls = _CACHE_TYPES.get(layer["type"])
        if cls is None:
            raise CheckpointError(f"{path}: unknown cache type {layer['type']!r}")
        cache.append(cls.from_state(state, layer["meta"]))
    return (cache, info) if return_metadata else cache
