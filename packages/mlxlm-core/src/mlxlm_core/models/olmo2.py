"""OLMo 2: Llama's attention and MLP with norms after each sub-block instead of before,
and RMSNorms over the whole query and key projections (not per head).

Sharded, each rank holds whole heads, so the q/k norms sum their statistic across ranks
(:class:`ShardedRMSNorm`) to stay the norm of the full projection.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import mlx.core as mx
import mlx.nn as nn

from ..cache import KVCache
from . import llama
from .sharding import shard_attention_mlp


@dataclasses.dataclass
class ModelArgs(llama.ModelArgs):
    # transformers' Olmo2Config default (mlx-lm's is True; real configs state it).
    tie_word_embeddings: bool = False


class Attention(llama.Attention):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.q_norm = nn.RMSNorm(self.n_heads * self.head_dim, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.n_kv_heads * self.head_dim, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: Any, cache: KVCache | None) -> mx.array:
        batch, length, _ = x.shape
        q = self.q_norm(self.q_proj(x)).reshape(batch, length, self.n_heads, -1)
        k = self.k_norm(self.k_proj(x)).reshape(batch, length, self.n_kv_heads, -1)
        v = self.v_proj(x).reshape(batch, length, self.n_kv_heads, -1)
        return self.o_proj(self.attend(q, k, v, mask, cache))


class DecoderLayer(llama.DecoderLayer):
    """``h = x + norm(attn(x)); out = h + norm(mlp(h))``: no norm on the block input."""

    def __init__(self, args: ModelArgs):
        super().__init__(args, attn=Attention(args))
        self.pop("input_layernorm")
        self.post_feedforward_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: Any, cache: KVCache | None) -> mx.array:
        h = x + self.post_attention_layernorm(self.self_attn(x, mask, cache))
        return h + self.post_feedforward_layernorm(self.mlp(h))


class Model(llama.Model):
    model_type: ClassVar[str] = "olmo2"

    def build_layers(self, args: llama.ModelArgs) -> list[nn.Module]:
        assert isinstance(args, ModelArgs)
        return [DecoderLayer(args) for _ in range(args.num_hidden_layers)]

    def shard(self, group: mx.distributed.Group | None = None) -> None:
        group = group or mx.distributed.init()
        shard_attention_mlp(self.layers, group)
        for layer in self.layers:
            attn = layer.self_attn
            attn.q_norm = ShardedRMSNorm.split(attn.q_norm, group)
            attn.k_norm = ShardedRMSNorm.split(attn.k_norm, group)


class ShardedRMSNorm(nn.Module):
    """One rank's slice of an RMSNorm whose statistic spans every rank's features.

    Each rank holds some heads of the projection; the mean square is summed across the
    group before normalising, so the result equals the unsharded norm's slice.
    """

    def __init__(self, weight: mx.array, *, eps: float, dims: int, group: mx.distributed.Group):
        super().__init__()
        self.weight = weight
        self.eps = eps
        self.dims = dims  # the unsharded width
        self.group = group

    @classmethod
    def split(cls, norm: nn.RMSNorm, group: mx.distributed.Group) -> ShardedRMSNorm:
        dims, size, rank = norm.weight.shape[0], group.size(), group.rank()
        part = dims // size
        weight = norm.weight[rank * part : (rank + 1) * part]
        return cls(weight, eps=norm.eps, dims=dims, group=group)

    def __call__(self, x: mx.array) -> mx.array:
        squares = mx.square(x.astype(mx.float32)).sum(axis=-1, keepdims=True)
        if self.group.size() > 1:
            squares = mx.distributed.all_sum(squares, group=self.group)
        normed = x.astype(mx.float32) * mx.rsqrt(squares / self.dims + self.eps)
        return self.weight * normed.astype(x.dtype)
