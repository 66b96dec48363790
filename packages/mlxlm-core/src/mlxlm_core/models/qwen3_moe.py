"""Qwen3-MoE: Qwen3 attention with sparse mixture-of-experts MLPs on most layers."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn

from . import llama, qwen3
from .sharding import shard_attention_mlp
from .switch_layers import SparseMoE, shard_sparse_moe, stack_experts


@dataclasses.dataclass
class ModelArgs(qwen3.ModelArgs):
    # Defaults are transformers' Qwen3MoeConfig ones.
    num_experts: int = 128
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] | None = None
    moe_intermediate_size: int = 768

    def is_sparse(self, layer: int) -> bool:
        """Whether block ``layer`` uses experts (else a dense MLP of ``intermediate_size``)."""
        if layer in (self.mlp_only_layers or []) or self.num_experts <= 0:
            return False
        return (layer + 1) % self.decoder_sparse_step == 0


class Model(llama.Model):
    model_type: ClassVar[str] = "qwen3_moe"
    args: ModelArgs

    def build_layers(self, args: llama.ModelArgs) -> list[nn.Module]:
        assert isinstance(args, ModelArgs)
        layers: list[nn.Module] = []
        for i in range(args.num_hidden_layers):
            moe = None
            if args.is_sparse(i):
                moe = SparseMoE(
                    args.hidden_size,
                    args.moe_intermediate_size,
                    args.num_experts,
                    top_k=args.num_experts_per_tok,
                    normalize_top_k=args.norm_topk_prob,
                )
            attn = llama.Attention(args, qk_norm=True)
            layers.append(llama.DecoderLayer(args, attn=attn, mlp=moe))
        return layers

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        weights = super().sanitize(weights)
        return stack_experts(weights, num_experts=self.args.num_experts)

    def shard(self, group: mx.distributed.Group | None = None) -> None:
        group = group or mx.distributed.init()
        shard_attention_mlp(self.layers, group)  # attention and the dense MLP layers
        for layer in self.layers:
            if isinstance(layer.mlp, SparseMoE):
                shard_sparse_moe(layer.mlp, group)
