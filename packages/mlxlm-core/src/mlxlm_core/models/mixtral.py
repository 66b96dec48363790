"""Mixtral: Mistral attention (optionally windowed) with a sparse MoE in every block."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import mlx.core as mx
import mlx.nn as nn

from . import llama
from ._hf_config import apply_rope_parameters
from .sharding import shard_attention_mlp
from .switch_layers import SparseMoE, shard_sparse_moe, stack_experts

# Mixtral's expert projections, by their roles in a SwiGLU.
_EXPERT_NAMES = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


@dataclasses.dataclass
class ModelArgs(llama.ModelArgs):
    # Defaults are transformers' MixtralConfig ones.
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = False
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    rope_parameters: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        apply_rope_parameters(self)


class DecoderLayer(llama.DecoderLayer):
    """Llama's block; the MoE lives at ``block_sparse_moe`` as in the checkpoints."""

    def __init__(self, args: ModelArgs):
        moe = SparseMoE(
            args.hidden_size,
            args.intermediate_size,
            args.num_local_experts,
            top_k=args.num_experts_per_tok,
            normalize_top_k=True,  # softmax over the chosen experts' logits
        )
        super().__init__(args, mlp=moe)
        self.block_sparse_moe = self.pop("mlp")

    @property
    def mlp(self) -> SparseMoE:  # type: ignore[override]
        # A read-only alias: the shared block code and sharding helpers address the
        # feed-forward as `mlp`, while the checkpoint names keep `block_sparse_moe`.
        return self.block_sparse_moe


class Model(llama.Model):
    model_type: ClassVar[str] = "mixtral"
    args: ModelArgs

    def build_layers(self, args: llama.ModelArgs) -> list[nn.Module]:
        assert isinstance(args, ModelArgs)
        return [DecoderLayer(args) for _ in range(args.num_hidden_layers)]

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        weights = super().sanitize(weights)
        # transformers >= 5 names the block `mlp` in memory; checkpoints use block_sparse_moe.
        weights = {
            (k.replace(".mlp.", ".block_sparse_moe.", 1) if k.startswith("model.layers.") else k): v
            for k, v in weights.items()
        }
        return stack_experts(
            weights, num_experts=self.args.num_local_experts, renames=_EXPERT_NAMES
        )

    def shard(self, group: mx.distributed.Group | None = None) -> None:
        group = group or mx.distributed.init()
        shard_attention_mlp(self.layers, group)  # attention; the MoE is sharded below
        for layer in self.layers:
            shard_sparse_moe(layer.mlp, group)
