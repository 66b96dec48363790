"""GLM-4 (GLM-4-0414 dense): Llama's attention with partial, interleaved rope and biased
q/k/v only, an MLP with one fused ``gate_up_proj``, and extra norms on the outputs of the
attention (``post_self_attn_layernorm``) and of the MLP (``post_mlp_layernorm``)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import mlx.core as mx
import mlx.nn as nn

from ..cache import KVCache
from . import llama
from .sharding import shard_attention_mlp, shard_projections


@dataclasses.dataclass
class ModelArgs(llama.ModelArgs):
    # Defaults are transformers' Glm4Config ones.
    head_dim: int | None = 128
    attention_bias: bool = True  # q/k/v only: o_proj never has a bias
    partial_rotary_factor: float = 0.5
    rope_traditional: bool = True  # rotated pairs are interleaved
    tie_word_embeddings: bool = False


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(dim, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(nn.silu(gate) * up)


class Attention(llama.Attention):
    def __init__(self, args: ModelArgs):
        assert args.head_dim is not None
        super().__init__(args, rope_dims=int(args.head_dim * args.partial_rotary_factor))
        # GLM biases q/k/v (attention_bias) but never the output projection.
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.hidden_size, bias=False)


class DecoderLayer(llama.DecoderLayer):
    def __init__(self, args: ModelArgs):
        super().__init__(
            args, attn=Attention(args), mlp=MLP(args.hidden_size, args.intermediate_size)
        )
        self.post_self_attn_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_mlp_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: Any, cache: KVCache | None) -> mx.array:
        attn = self.self_attn(self.input_layernorm(x), mask, cache)
        h = x + self.post_self_attn_layernorm(attn)
        return h + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(h)))


class Model(llama.Model):
    model_type: ClassVar[str] = "glm4"

    def build_layers(self, args: llama.ModelArgs) -> list[nn.Module]:
        assert isinstance(args, ModelArgs)
        return [DecoderLayer(args) for _ in range(args.num_hidden_layers)]

    def shard(self, group: mx.distributed.Group | None = None) -> None:
        group = group or mx.distributed.init()
        shard_attention_mlp(self.layers, group)  # attention; the fused MLP is split below
        for layer in self.layers:
            # Two segments: every rank takes a slice of the gate half and of the up half.
            shard_projections(
                layer.mlp,
                group,
                split_out=["gate_up_proj"],
                split_in=["down_proj"],
                segments={"gate_up_proj": 2},
            )
