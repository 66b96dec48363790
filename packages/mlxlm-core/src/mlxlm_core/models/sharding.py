"""Tensor-parallel sharding shared by the dense architectures."""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear


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
