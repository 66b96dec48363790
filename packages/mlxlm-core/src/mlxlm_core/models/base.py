"""What every architecture shares: the model contract, argument parsing, attention."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol, Self, runtime_checkable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from ..cache import CachePolicy, KVCache, Mask, QuantizedKVCache, cache_for_policy

__all__ = [
    "BaseModelArgs",
    "LanguageModel",
    "attention",
    "cache_mask",
    "default_caches",
    "layer_masks",
]


@dataclasses.dataclass
class BaseModelArgs:
    """Hugging Face ``config.json`` fields; unknown keys are ignored."""

    model_type: str

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> Self:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})


@runtime_checkable
class LanguageModel(Protocol):
    """The contract between an architecture and the rest of mlxlm.

    - ``__call__(inputs, cache=None, input_embeddings=None)`` maps token ids ``(B, L)`` to
      logits ``(B, L, vocab)``; ``cache`` is one cache per layer from ``make_cache``.
    - ``layers``: the transformer blocks (their count sizes the cache list).
    - ``sanitize(weights)``: turns checkpoint weights (Hugging Face names) into this
      module's parameters (drops rotary buffers, ties embeddings, stacks experts...).
    - ``make_cache(policy, batch_size=..., left_padding=...)``: per-layer caches honouring
      the policy (a bound, KV quantization) and the layer's own sliding window.
    - ``shard(group)``: split weights for tensor parallelism where the shapes allow.
    Quantization and adapters are module swaps done from outside; models never branch on them.
    """

    model_type: ClassVar[str]
    layers: Sequence[nn.Module]

    def __call__(
        self,
        inputs: mx.array,
        cache: Sequence[KVCache] | None = None,
        input_embeddings: mx.array | None = None,
    ) -> mx.array: ...

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]: ...

    def make_cache(
        self,
        policy: CachePolicy,
        *,
        batch_size: int = 1,
        left_padding: Sequence[int] | None = None,
    ) -> list[KVCache]: ...


def default_caches(
    n_layers: int,
    policy: CachePolicy,
    *,
    batch_size: int = 1,
    left_padding: Sequence[int] | None = None,
    windows: Sequence[int | None] | None = None,
) -> list[KVCache]:
    """One cache per layer; ``windows[i]`` is layer i's sliding window (None: global)."""
    windows = windows or [None] * n_layers
    return [
        cache_for_policy(policy, window=w, batch_size=batch_size, left_padding=left_padding)
        for w in windows
    ]


def cache_mask(n: int, cache: KVCache | None, *, window: int | None = None) -> Mask:
    """The attention mask for ``n`` new tokens given a layer's cache."""
    if cache is not None:
        return cache.make_mask(n, window=window)
    if n == 1:
        return None
    if window is not None and n > window:
        pos = mx.arange(n)
        return (pos[:, None] >= pos[None]) & (pos[None] > pos[:, None] - window)
    return "causal"


def layer_masks(
    n: int, caches: Sequence[KVCache | None], windows: Sequence[int | None]
) -> list[Mask]:
    """One mask per layer for ``n`` new tokens, built once per distinct window.

    Models that mix sliding-window and global layers give each layer the mask of its own
    window, computed from the first cache of a layer with that window (layers sharing a
    window share a cache kind and state, hence a mask).
    """
    built: dict[int | None, Mask] = {}
    for cache, window in zip(caches, windows, strict=True):
        if window not in built:
            built[window] = cache_mask(n, cache, window=window)
    return [built[w] for w in windows]


def rope_offset(cache: KVCache | None) -> int | mx.array:
    return 0 if cache is None else cache.positions()


def attention(
    queries: mx.array,
    keys: Any,
    values: Any,
    *,
    cache: KVCache | None,
    scale: float,
    mask: Mask,
    softcap: float | None = None,
) -> mx.array:
    """Scaled dot-product attention over plain or quantized keys/values (B, H, L, D).

    ``softcap`` bounds the scores to ``(-softcap, softcap)`` with ``softcap * tanh(s /
    softcap)`` before the softmax (Gemma 2), which the fused kernel cannot do.
    """
    quantized = isinstance(cache, QuantizedKVCache)
    if not quantized and softcap is None:
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
    bits_group = (cache.bits, cache.group_size) if isinstance(cache, QuantizedKVCache) else None
    return _explicit_attention(
        queries, keys, values, scale=scale, mask=mask, softcap=softcap, quantized=bits_group
    )


def _explicit_attention(
    queries: mx.array,
    keys: Any,
    values: Any,
    *,
    scale: float,
    mask: Mask,
    softcap: float | None,
    quantized: tuple[int, int] | None,
) -> mx.array:
    batch, q_heads, length, dim = queries.shape
    kv_heads = (keys[0] if quantized else keys).shape[1]
    repeats = q_heads // kv_heads
    # Group query heads under their KV head so the matmuls broadcast.
    q = (queries * scale).reshape(batch, kv_heads, repeats, length, dim)
    k = tree_map(lambda a: mx.expand_dims(a, 2), keys)
    v = tree_map(lambda a: mx.expand_dims(a, 2), values)
    if quantized:
        bits, group = quantized
        k_packed, k_scales, k_biases = k
        scores = mx.quantized_matmul(
            q, k_packed, k_scales, k_biases, transpose=True, group_size=group, bits=bits
        )
    else:
        scores = q @ k.swapaxes(-1, -2)
    if softcap is not None:
        scores = mx.tanh(scores / softcap) * softcap
    if isinstance(mask, str):
        k_len = scores.shape[-1]
        q_pos = mx.arange(k_len - length, k_len)
        mask = q_pos[:, None] >= mx.arange(k_len)[None]
    if mask is not None:
        if mask.ndim == 4:  # (B, 1, L, K) -> broadcast over the repeat axis
            mask = mx.expand_dims(mask, 2)
        scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
    weights = mx.softmax(scores, axis=-1, precise=True)
    if quantized:
        bits, group = quantized
        v_packed, v_scales, v_biases = v
        out = mx.quantized_matmul(
            weights, v_packed, v_scales, v_biases, transpose=False, group_size=group, bits=bits
        )
    else:
        out = weights @ v
    return out.reshape(batch, q_heads, length, -1)
