"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2 attention, routed experts plus a shared
expert whose output a sigmoid gate scales, on every ``decoder_sparse_step``-th block."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear

from . import llama, qwen2
from .sharding import shard_attention_mlp
from .switch_layers import SparseMoE, shard_sparse_moe, stack_experts


@dataclasses.dataclass
class ModelArgs(qwen2.ModelArgs):
    # Defaults are transformers' Qwen2MoeConfig ones.
    num_experts: int = 60
    num_experts_per_tok: int = 4
    moe_intermediate_size: int = 1408
    shared_expert_intermediate_size: int = 5632
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] | None = None
    qkv_bias: bool = True

    def is_sparse(self, layer: int) -> bool:
        """Whether block ``layer`` uses experts (else a dense MLP of ``intermediate_size``)."""
        if layer in (self.mlp_only_layers or []) or self.num_experts <= 0:
            return False
        return (layer + 1) % self.decoder_sparse_step == 0


class SharedExpertMoE(SparseMoE):
    """Routed experts plus one always-on SwiGLU expert, gated per token by a sigmoid."""

    def __init__(self, args: ModelArgs):
        super().__init__(
            args.hidden_size,
            args.moe_intermediate_size,
            args.num_experts,
            top_k=args.num_experts_per_tok,
            normalize_top_k=args.norm_topk_prob,
        )
        self.shared_expert = llama.MLP(args.hidden_size, args.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(args.hidden_size, 1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        shared = mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return super().__call__(x) + shared


class Model(llama.Model):
    model_type: ClassVar[str] = "qwen2_moe"
    args: ModelArgs

    def build_layers(self, args: llama.ModelArgs) -> list[nn.Module]:
        assert isinstance(args, ModelArgs)
        return [
            llama.DecoderLayer(
                args,
                attn=llama.Attention(args, bias=args.qkv_bias),
                mlp=SharedExpertMoE(args) if args.is_sparse(i) else None,
            )
            for i in range(args.num_hidden_layers)
        ]

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        return stack_experts(super().sanitize(weights), num_experts=self.args.num_experts)

    def shard(self, group: mx.distributed.Group | None = None) -> None:
        group = group or mx.distributed.init()
        shard_attention_mlp(self.layers, group)  # attention and the dense MLP layers
        for layer in self.layers:
            if isinstance(layer.mlp, SharedExpertMoE):
                shard_sparse_moe(layer.mlp, group)
                # The shared expert is split like a dense MLP (its own all-reduce); the
                # gate is one output column, so every rank keeps all of it.
                shared = layer.mlp.shared_expert
                shared.gate_proj = shard_linear(shared.gate_proj, "all-to-sharded", group=group)
                shared.up_proj = shard_linear(shared.up_proj, "all-to-sharded", group=group)
                shared.down_proj = shard_linear(shared.down_proj, "sharded-to-all", group=group)
