"""Tensor-parallel sharding shared by the dense architectures."""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear

from .._errors import InvalidArgumentError


def shard_attention_mlp(layers: Sequence[nn.Module], group: mx.distributed.Group | None) -> None:
    """Split heads and MLP columns across ``group``; one all-reduce after o_proj and down_proj.

    Query/key/value and gate/up projections are split by output rows (each rank owns whole
    heads), o_proj and down_proj by input columns, so the only communication per block is
    the sum of the two partial outputs.
    """
    group = group or mx.distributed.init()
    size = group.size()
    for layer in layers:
        attn = layer.self_attn
        if attn.n_kv_heads % size or attn.n_heads % size:
            raise ValueError(f"{attn.n_kv_heads} KV heads cannot be split over {size} ranks")
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, name, shard_linear(getattr(attn, name), "all-to-sharded", group=group))
        attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
        attn.n_heads //= size
        attn.n_kv_heads //= size
        mlp = layer.mlp
        if hasattr(mlp, "gate_proj"):
            mlp.gate_proj = shard_linear(mlp.gate_proj, "all-to-sharded", group=group)
            mlp.up_proj = shard_linear(mlp.up_proj, "all-to-sharded", group=group)
            mlp.down_proj = shard_linear(mlp.down_proj, "sharded-to-all", group=group)


def shard_projections(
    module: nn.Module,
    group: mx.distributed.Group,
    *,
    split_out: Sequence[str] = (),
    split_in: Sequence[str] = (),
    segments: dict[str, int] | None = None,
) -> None:
    """Shard the named linears of ``module`` (projections :func:`shard_attention_mlp` cannot name).

    ``split_out`` layers are split by output rows (each rank computes a slice), ``split_in``
    by input columns (each rank's partial output is all-reduced). ``segments[name] = n``
    splits a fused projection (``gate_up_proj``) so every rank gets a slice of each part.
    """
    segments = segments or {}
    for name in split_out:
        layer = shard_linear(
            getattr(module, name), "all-to-sharded", segments=segments.get(name, 1), group=group
        )
        setattr(module, name, layer)
    for name in split_in:
        setattr(module, name, shard_linear(getattr(module, name), "sharded-to-all", group=group))


def check_heads(n_heads: int, n_kv_heads: int, group: mx.distributed.Group) -> None:
    """Refuse a split that would cut a head (or a query group) across ranks."""
    if n_kv_heads % group.size() or n_heads % group.size():
        raise InvalidArgumentError(
            f"{n_heads} heads / {n_kv_heads} KV heads cannot be split over {group.size()} ranks"
        )
