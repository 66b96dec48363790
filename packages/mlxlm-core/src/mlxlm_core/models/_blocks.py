"""Pieces of the decoder stack that architectures with their own checkpoint names share
(GPT-2, GPT-NeoX, EXAONE, InternLM2): the layer loop, caches for all-global layers, the
output head, sanitize's dropping of buffers and tied heads, and splitting heads over ranks.

Llama-shaped models under Hugging Face's usual names subclass :mod:`.llama` instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn

from ..cache import CachePolicy, KVCache
from .base import default_caches, layer_masks
from .sharding import check_heads, shard_projections


def run_layers(
    layers: Sequence[nn.Module],
    h: mx.array,
    cache: Sequence[KVCache] | None,
    *,
    windows: Sequence[int | None] | None = None,
) -> mx.array:
    """``h`` through every ``layer(h, mask, cache)``; ``windows[i]`` is layer i's sliding
    window (None: global), each layer getting its cache (none without a cache list)."""
    caches: Sequence[KVCache | None] = cache if cache is not None else [None] * len(layers)
    masks = layer_masks(h.shape[1], caches, windows or [None] * len(layers))
    for layer, layer_cache, mask in zip(layers, caches, masks, strict=True):
        h = layer(h, mask, layer_cache)
    return h


class GlobalLayerCaches:
    """``make_cache`` for models whose layers all attend globally: one cache per layer,
    growing, bounded or quantized as the policy says."""

    @property
    def layers(self) -> Sequence[nn.Module]:  # the model's blocks, as every model has them
        raise NotImplementedError

    def make_cache(
        self,
        policy: CachePolicy,
        *,
        batch_size: int = 1,
        left_padding: Sequence[int] | None = None,
    ) -> list[KVCache]:
        return default_caches(
            len(self.layers), policy, batch_size=batch_size, left_padding=left_padding
        )


def output_logits(h: mx.array, embedding: nn.Embedding, head: nn.Module | None) -> mx.array:
    """The untied head's logits, or the tied embedding's (``head`` None)."""
    return embedding.as_linear(h) if head is None else head(h)


def drop_unused(
    weights: dict[str, mx.array], *, buffers: tuple[str, ...], tied_head: str | None
) -> dict[str, mx.array]:
    """``weights`` without the buffers transformers saves (names ending in ``buffers``)
    and, for a tied model (``tied_head`` the head's prefix), the head copy."""
    return {
        k: v
        for k, v in weights.items()
        if not k.endswith(buffers) and not (tied_head and k.startswith(tied_head))
    }


def shard_heads(
    attn: nn.Module,
    group: mx.distributed.Group,
    *,
    split_out: Sequence[str],
    split_in: Sequence[str],
    segments: dict[str, int] | None = None,
) -> None:
    """Give each rank whole heads of ``attn``: its ``split_out`` projections split by
    output rows (``segments``: fused q/k/v split part by part), ``split_in`` by input
    columns (one all-reduce), and its head counts divided."""
    check_heads(attn.n_heads, attn.n_kv_heads, group)
    shard_projections(attn, group, split_out=split_out, split_in=split_in, segments=segments)
    attn.n_heads //= group.size()
    attn.n_kv_heads //= group.size()
