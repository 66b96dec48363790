"""Phi-3, Phi-3.5-mini, Phi-4 and Phi-4-mini: Llama's block with fused ``qkv_proj`` and
``gate_up_proj`` projections (kept fused, as checkpoints and adapters name them), su /
longrope scaling and, on Phi-4-mini, rope over only part of each head.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear

from .._errors import InvalidArgumentError
from ..cache import KVCache
from . import llama
from ._activations import activation
from .base import attention, rope_offset
from .rope import make_rope


@dataclasses.dataclass
class ModelArgs(llama.ModelArgs):
    # Defaults are transformers' Phi3Config ones.
    tie_word_embeddings: bool = False
    max_position_embeddings: int | None = 4096
    original_max_position_embeddings: int = 4096
    partial_rotary_factor: float = 1.0
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.rope_scaling = self._longrope_settings(self.rope_scaling)
        # A window as long as the context is no window: keep the cache growing (trimmable).
        limit = self.max_position_embeddings
        if self.sliding_window is not None and limit and self.sliding_window >= limit:
            self.sliding_window = None

    def _longrope_settings(self, scaling: dict[str, Any] | None) -> dict[str, Any] | None:
        """Phi spells longrope ``su`` and keeps its original context length at top level."""
        if not scaling:
            return None
        scaling = dict(scaling)
        kind = scaling.pop("type", None) or scaling.get("rope_type")
        scaling["rope_type"] = "longrope" if kind == "su" else kind
        if scaling["rope_type"] == "longrope":
            scaling.setdefault(
                "original_max_position_embeddings", self.original_max_position_embeddings
            )
            if scaling.get("attention_factor") is not None:
                scaling.setdefault("long_mscale", scaling["attention_factor"])
        return scaling

    @property
    def rope_dims(self) -> int:
        assert self.head_dim is not None
        return int(self.head_dim * self.partial_rotary_factor)


class Attention(nn.Module):
    """Grouped-query attention whose query, key and value rows live in one ``qkv_proj``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        assert args.head_dim is not None and args.num_key_value_heads is not None
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.head_dim = head_dim = args.head_dim
        self.scale = head_dim**-0.5
        rows = (self.n_heads + 2 * self.n_kv_heads) * head_dim
        self.qkv_proj = nn.Linear(args.hidden_size, rows, bias=args.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * head_dim, args.hidden_size, bias=args.attention_bias)
        # Rotates the leading rope_dims of each head only; long-context configs always use the
        # long factors (as mlx-lm does), so cached keys never change frequencies mid-sequence.
        self.rope = make_rope(
            args.rope_dims,
            base=args.rope_theta,
            traditional=args.rope_traditional,
            scaling=args.rope_scaling,
            max_position_embeddings=args.max_position_embeddings,
        )

    def __call__(self, x: mx.array, mask: Any, cache: KVCache | None) -> mx.array:
        batch, length, _ = x.shape
        q_rows, kv_rows = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = mx.split(self.qkv_proj(x), [q_rows, q_rows + kv_rows], axis=-1)
        q = q.reshape(batch, length, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = k.reshape(batch, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = v.reshape(batch, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = rope_offset(cache)
        q, k = self.rope(q, offset), self.rope(k, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class MLP(nn.Module):
    """Gated MLP whose gate and up rows live in one ``gate_up_proj`` (gate first)."""

    def __init__(self, dim: int, hidden: int, *, act: Callable[[mx.array], mx.array]):
        super().__init__()
        self.gate_up_proj = nn.Linear(dim, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.act = act

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(self.act(gate) * up)


def shard_fused_attention(attn: Attention, group: mx.distributed.Group) -> None:
    """Split whole heads of a fused ``qkv_proj`` (each of q, k, v split on its own)."""
    size = group.size()
    if attn.n_heads % size or attn.n_kv_heads % size:
        raise InvalidArgumentError(
            f"{attn.n_heads} query / {attn.n_kv_heads} KV heads cannot be split over {size} ranks"
        )
    q_rows, kv_rows = attn.n_heads * attn.head_dim, attn.n_kv_heads * attn.head_dim
    segments = [q_rows, q_rows + kv_rows]
    attn.qkv_proj = shard_linear(attn.qkv_proj, "all-to-sharded", segments=segments, group=group)
    attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
    attn.n_heads //= size
    attn.n_kv_heads //= size


def shard_fused_mlp(mlp: MLP, group: mx.distributed.Group) -> None:
    mlp.gate_up_proj = shard_linear(mlp.gate_up_proj, "all-to-sharded", segments=2, group=group)
    mlp.down_proj = shard_linear(mlp.down_proj, "sharded-to-all", group=group)


class Model(llama.Model):
    model_type: ClassVar[str] = "phi3"
    args: ModelArgs

    def build_layers(self, args: llama.ModelArgs) -> list[nn.Module]:
        assert isinstance(args, ModelArgs)
        act = activation(args.hidden_act)
        return [
            llama.DecoderLayer(
                args,
                attn=Attention(args),
                mlp=MLP(args.hidden_size, args.intermediate_size, act=act),
            )
            for _ in range(args.num_hidden_layers)
        ]

    def shard(self, group: mx.distributed.Group | None = None) -> None:
        group = group or mx.distributed.init()
        for layer in self.layers:
            shard_fused_attention(layer.self_attn, group)
            shard_fused_mlp(layer.mlp, group)
