"""GLM-4.5 / 4.6 / 4.7 (and -Air): grouped-query attention with partial rope (pairs not
interleaved, unlike dense GLM-4) and optional per-head q/k norms, then DeepSeek-V3's
sigmoid-routed experts with a shared expert after ``first_k_dense_replace`` dense blocks.
Multi-token-prediction blocks in checkpoints are dropped."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn

from . import deepseek_v2, deepseek_v3, llama
from .sharding import shard_attention_mlp


@dataclasses.dataclass
class ModelArgs(deepseek_v3.ModelArgs):
    # Defaults are transformers' Glm4MoeConfig ones; DeepSeek's latent-attention fields
    # are unused here (GLM attends with ordinary heads).
    moe_intermediate_size: int = 1408
    n_routed_experts: int = 128
    n_shared_experts: int | None = 1
    routed_scaling_factor: float = 1.0
    n_group: int | None = 1
    topk_group: int | None = 1
    first_k_dense_replace: int = 1
    partial_rotary_factor: float = 0.5
    use_qk_norm: bool = False


class Attention(llama.Attention):
    def __init__(self, args: ModelArgs):
        assert args.head_dim is not None
        super().__init__(
            args,
            qk_norm=args.use_qk_norm,
            rope_dims=int(args.head_dim * args.partial_rotary_factor),
        )
        # attention_bias covers q/k/v only.
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.hidden_size, bias=False)


class Model(deepseek_v2.Model):
    model_type: ClassVar[str] = "glm4_moe"
    args: ModelArgs

    def build_layers(self, args: llama.ModelArgs) -> list[nn.Module]:
        assert isinstance(args, ModelArgs)
        return [
            llama.DecoderLayer(
                args,
                attn=Attention(args),
                mlp=deepseek_v2.MoE(args, deepseek_v3.Router(args)) if args.is_sparse(i) else None,
            )
            for i in range(args.num_hidden_layers)
        ]

    def shard(self, group: mx.distributed.Group | None = None) -> None:
        group = group or mx.distributed.init()
        shard_attention_mlp(self.layers, group)  # attention and the dense MLPs
        for layer in self.layers:
            if isinstance(layer.mlp, deepseek_v2.MoE):
                deepseek_v2.shard_moe(layer.mlp, group)
