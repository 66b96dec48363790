"""DeepSeek-V3 / R1 (also Kimi K2): DeepSeek-V2's blocks with sigmoid routing.

The router (``topk_method="noaux_tc"``) scores experts with a sigmoid; a learned
``e_score_correction_bias`` shifts the scores used to *choose* experts but not the weights
they get. Experts are chosen within the ``topk_group`` groups (of ``n_group``) whose two
best biased scores sum highest; the chosen weights are renormalised (``norm_topk_prob``)
and multiplied by ``routed_scaling_factor``. Rope pairs are interleaved unless
``rope_interleave`` is false. Multi-token-prediction blocks in checkpoints are dropped.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn

from . import deepseek_v2


@dataclasses.dataclass
class ModelArgs(deepseek_v2.ModelArgs):
    # Defaults are transformers' DeepseekV3Config ones.
    moe_intermediate_size: int = 2048
    n_routed_experts: int = 256
    n_shared_experts: int | None = 1
    num_experts_per_tok: int = 8
    routed_scaling_factor: float = 2.5
    topk_method: str = "noaux_tc"
    n_group: int | None = 8
    topk_group: int | None = 4
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 3
    rope_interleave: bool = True


class Router(deepseek_v2.Router):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.e_score_correction_bias = mx.zeros((args.n_routed_experts,))
        self.normalize = args.norm_topk_prob

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        scores = mx.sigmoid(self.logits(x))
        choice = scores + self.e_score_correction_bias.astype(mx.float32)
        if self.n_group > 1:
            grouped = mx.unflatten(choice, -1, (self.n_group, -1))
            best_two = mx.topk(grouped, 2, axis=-1).sum(axis=-1, keepdims=True)
            # Experts outside the kept groups can never be chosen (transformers: -inf).
            choice = deepseek_v2.limit_to_groups(
                choice, best_two, self.topk_group, fill=-float("inf")
            )
        indices = deepseek_v2.top_k(choice, self.top_k)
        weights = mx.take_along_axis(scores, indices, axis=-1)
        if self.normalize and self.top_k > 1:
            weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
        return indices, weights * self.scaling


class Model(deepseek_v2.Model):
    model_type: ClassVar[str] = "deepseek_v3"
    args: ModelArgs

    def make_router(self, args: deepseek_v2.ModelArgs) -> nn.Module:
        assert isinstance(args, ModelArgs)
        return Router(args)

    def rope_traditional(self, args: deepseek_v2.ModelArgs) -> bool:
        assert isinstance(args, ModelArgs)
        return args.rope_interleave
