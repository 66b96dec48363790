"""Tensor-parallel sharding shared by the dense architectures."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear

from .._errors import InvalidArgumentError


def split_ranges(total: int, parts: int, *, multiple: int = 1) -> list[tuple[int, int]]:
    """Contiguous, near-even ``[start, stop)`` ranges of ``total`` in units of ``multiple``.

    Uneven splits are allowed (9 heads over 2 ranks: 5 and 4... in whole KV groups), so a
    model whose head count does not divide the world size still shards.
    """
    units = total // multiple
    if units < parts:
        raise InvalidArgumentError(f"{total} cannot be split over {parts} ranks")
    base, extra = divmod(units, parts)
    bounds, start = [], 0
    for rank in range(parts):
        stop = start + base + (1 if rank < extra else 0)
        bounds.append((start * multiple, stop * multiple))
        start = stop
    return bounds


def slice_rows(layer: nn.Module, start: int, stop: int) -> nn.Module:
    """A copy of a (quantized) linear computing only output rows ``[start, stop)``."""
    new = copy.copy(layer)
    for name in ("weight", "scales", "biases", "bias"):
        if name in layer:
            new[name] = mx.contiguous(layer[name][start:stop])
    return new


class AllSumLinear(nn.Module):
    """A linear layer over a slice of its input, summed across ranks (row parallel).

    Each rank multiplies its slice of the input features by the matching columns; one
    ``all_sum`` yields the full product on every rank. The bias is added once, after it.
    """

    def __init__(self, layer: nn.Module, start: int, stop: int, group: mx.distributed.Group):
        super().__init__()
        inner = copy.copy(layer)
        if "bias" in inner:
            self.bias = layer["bias"]
            del inner["bias"]
        if isinstance(layer, nn.QuantizedLinear):
            group_size, bits = layer.group_size, layer.bits
            if start % group_size or stop % group_size:
                raise InvalidArgumentError(
                    f"cannot split a layer quantized in groups of {group_size} at {start}:{stop}"
                )
            per_word = 32 // bits if 32 % bits == 0 else None
            if per_word is None:
                raise InvalidArgumentError(f"cannot split {bits}-bit packed weights by columns")
            inner.weight = mx.contiguous(layer.weight[:, start // per_word : stop // per_word])
            for name in ("scales", "biases"):
                if name in layer:
                    inner[name] = mx.contiguous(
                        layer[name][:, start // group_size : stop // group_size]
                    )
        else:
            inner.weight = mx.contiguous(layer.weight[:, start:stop])
        self.inner = inner
        self.group = group

    def __call__(self, x: mx.array) -> mx.array:
        y = mx.distributed.all_sum(self.inner(x), group=self.group)
        return y + self.bias if "bias" in self else y


def shard_attention_mlp(layers: Sequence[nn.Module], group: mx.distributed.Group | None) -> None:
    """Split heads and MLP columns across ``group``; one all-reduce after o_proj and down_proj.

    Query/key/value and gate/up projections are split by output rows (each rank owns whole
    KV groups, with their query heads), o_proj and down_proj by input columns, so the only
    communication per block is the sum of the two partial outputs. Splits may be uneven:
    SmolLM2's 3 KV heads go 2 + 1 over two ranks.
    """
    group = group or mx.distributed.init()
    size, rank = group.size(), group.rank()
    for layer in layers:
        attn = layer.self_attn
        hd = attn.head_dim
        if attn.n_kv_heads < size:
            raise InvalidArgumentError(
                f"{attn.n_kv_heads} KV heads cannot be split over {size} ranks"
            )
        q_per_kv = attn.n_heads // attn.n_kv_heads
        kv0, kv1 = split_ranges(attn.n_kv_heads, size)[rank]
        q0, q1 = kv0 * q_per_kv, kv1 * q_per_kv
        attn.q_proj = slice_rows(attn.q_proj, q0 * hd, q1 * hd)
        attn.k_proj = slice_rows(attn.k_proj, kv0 * hd, kv1 * hd)
        attn.v_proj = slice_rows(attn.v_proj, kv0 * hd, kv1 * hd)
        attn.o_proj = AllSumLinear(attn.o_proj, q0 * hd, q1 * hd, group)
        attn.n_heads, attn.n_kv_heads = q1 - q0, kv1 - kv0
        mlp = layer.mlp
        if hasattr(mlp, "gate_proj"):
            hidden = mlp.gate_proj.weight.shape[0]
            align = getattr(mlp.down_proj, "group_size", 1)
            h0, h1 = split_ranges(hidden, size, multiple=align)[rank]
            mlp.gate_proj = slice_rows(mlp.gate_proj, h0, h1)
            mlp.up_proj = slice_rows(mlp.up_proj, h0, h1)
            mlp.down_proj = AllSumLinear(mlp.down_proj, h0, h1, group)


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
