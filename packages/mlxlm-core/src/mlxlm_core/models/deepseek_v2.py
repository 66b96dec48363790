"""DeepSeek-V2 / V2-Lite / V2.5: latent attention (see :mod:`.mla`) and mixture-of-experts
blocks after the first ``first_k_dense_replace`` dense ones.

The router takes a softmax over the routed experts and keeps the top ``num_experts_per_tok``
(``topk_method="greedy"``), or first keeps only the ``topk_group`` expert groups whose best
expert scores highest (``"group_limited_greedy"``); kept weights are multiplied by
``routed_scaling_factor``. ``n_shared_experts`` always-on experts form one wider SwiGLU.
Routing runs in float32, as transformers does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace

from .._errors import UnsupportedError
from ..cache import CachePolicy, KVCache
from . import llama
from .mla import MultiHeadLatentAttention, shard_mla, split_kv_b_proj
from .sharding import shard_projections
from .switch_layers import SparseMoE, shard_sparse_moe, stack_experts


@dataclasses.dataclass
class ModelArgs(llama.ModelArgs):
    # Defaults are transformers' DeepseekV2Config ones.
    moe_intermediate_size: int = 1407
    n_routed_experts: int = 64
    n_shared_experts: int | None = 2
    num_experts_per_tok: int = 6
    routed_scaling_factor: float = 1.0
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    norm_topk_prob: bool = False
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    tie_word_embeddings: bool = False

    def is_sparse(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0


def limit_to_groups(
    scores: mx.array, group_scores: mx.array, keep: int, *, fill: float
) -> mx.array:
    """``scores`` (..., experts) with every expert outside the best ``keep`` groups set to
    ``fill``; ``group_scores`` is (..., groups, 1)."""
    groups = group_scores.shape[-2]
    if keep >= groups:
        return scores
    grouped = mx.unflatten(scores, -1, (groups, -1))
    worst = mx.argpartition(group_scores, kth=groups - keep - 1, axis=-2)[..., : groups - keep, :]
    grouped = mx.put_along_axis(
        grouped, mx.stop_gradient(worst), mx.array(fill, grouped.dtype), axis=-2
    )
    return mx.flatten(grouped, -2, -1)


def top_k(choice: mx.array, k: int) -> mx.array:
    return mx.stop_gradient(mx.argpartition(-choice, kth=k - 1, axis=-1)[..., :k])


class Router(nn.Module):
    """``gate.weight`` of the checkpoints; returns ``(expert indices, weights)`` per token."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        scale = args.hidden_size**-0.5
        self.weight = mx.random.uniform(-scale, scale, (args.n_routed_experts, args.hidden_size))
        self.top_k = args.num_experts_per_tok
        self.scaling = args.routed_scaling_factor
        self.grouped = args.topk_method == "group_limited_greedy"
        self.n_group, self.topk_group = args.n_group or 1, args.topk_group or 1

    def logits(self, x: mx.array) -> mx.array:
        return x.astype(mx.float32) @ self.weight.astype(mx.float32).T

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        scores = mx.softmax(self.logits(x), axis=-1, precise=True)
        choice = scores
        if self.grouped:
            best = mx.unflatten(scores, -1, (self.n_group, -1)).max(axis=-1, keepdims=True)
            choice = limit_to_groups(scores, best, self.topk_group, fill=0.0)
        indices = top_k(choice, self.top_k)
        return indices, mx.take_along_axis(choice, indices, axis=-1) * self.scaling


class MoE(SparseMoE):
    """Routed SwiGLU experts weighted by the router, plus the shared experts."""

    def __init__(self, args: ModelArgs, router: nn.Module):
        super().__init__(
            args.hidden_size,
            args.moe_intermediate_size,
            args.n_routed_experts,
            top_k=args.num_experts_per_tok,
            normalize_top_k=False,  # the router decides
        )
        self.gate = router  # type: ignore[assignment]  # not SparseMoE's plain Linear
        if args.n_shared_experts:
            hidden = args.moe_intermediate_size * args.n_shared_experts
            self.shared_experts = llama.MLP(args.hidden_size, hidden)

    def __call__(self, x: mx.array) -> mx.array:
        indices, weights = self.gate(x)
        y = self.switch_mlp(x, indices)
        y = (y * weights[..., None].astype(y.dtype)).sum(axis=-2)
        if "shared_experts" in self:
            y = y + self.shared_experts(x)
        if self.group is not None:  # sharded: every rank holds a slice of each expert
            y = mx.distributed.all_sum(y, group=self.group)
        return y


class Model(llama.Model):
    model_type: ClassVar[str] = "deepseek_v2"
    args: ModelArgs

    def make_router(self, args: ModelArgs) -> nn.Module:
        return Router(args)

    def rope_traditional(self, args: ModelArgs) -> bool:
        return True  # DeepSeek-V2 rotates interleaved pairs

    def build_layers(self, args: llama.ModelArgs) -> list[nn.Module]:
        assert isinstance(args, ModelArgs)
        layers: list[nn.Module] = []
        for i in range(args.num_hidden_layers):
            attn = MultiHeadLatentAttention(args, traditional=self.rope_traditional(args))
            mlp = MoE(args, self.make_router(args)) if args.is_sparse(i) else None
            layers.append(llama.DecoderLayer(args, attn=attn, mlp=mlp))
        return layers

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        args = self.args
        weights = super().sanitize(weights)
        # Blocks past num_hidden_layers are multi-token-prediction heads (DeepSeek-V3).
        weights = {
            k: v
            for k, v in weights.items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < args.num_hidden_layers
        }
        weights = stack_experts(weights, num_experts=args.n_routed_experts)
        return split_kv_b_proj(
            weights,
            heads=args.num_attention_heads,
            nope_dim=args.qk_nope_head_dim,
            v_dim=args.v_head_dim,
            kv_rank=args.kv_lora_rank,
        )

    def make_cache(
        self, policy: CachePolicy, *, batch_size: int = 1, left_padding: Sequence[int] | None = None
    ) -> list[KVCache]:
        if policy.kv_bits is not None and isinstance(
            self.layers[0].self_attn, MultiHeadLatentAttention
        ):
            raise UnsupportedError(
                f"kv_bits with {self.model_type}: its cache already holds a compressed latent"
            )
        return super().make_cache(policy, batch_size=batch_size, left_padding=left_padding)

    def shard(self, group: mx.distributed.Group | None = None) -> None:
        group = group or mx.distributed.init()
        for layer in self.layers:
            shard_mla(layer.self_attn, group)
            if isinstance(layer.mlp, MoE):
                shard_moe(layer.mlp, group)
            else:
                shard_projections(
                    layer.mlp, group, split_out=["gate_proj", "up_proj"], split_in=["down_proj"]
                )


def shard_moe(moe: MoE, group: mx.distributed.Group) -> None:
    """Slice every routed and shared expert's hidden dimension; one all-reduce sums all."""
    shard_sparse_moe(moe, group)
    if "shared_experts" in moe:  # in place: the MoE's own all-reduce completes it
        shared = moe.shared_experts
        shard_inplace(shared.gate_proj, "all-to-sharded", group=group)
        shard_inplace(shared.up_proj, "all-to-sharded", group=group)
        shard_inplace(shared.down_proj, "sharded-to-all", group=group)
