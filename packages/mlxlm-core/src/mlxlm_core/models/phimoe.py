"""Phi-3.5-MoE: Phi-3's attention (separate, biased projections), LayerNorms, and a sparse
MoE routed by "sparsemixer" instead of a softmax over the top-k.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn

from . import llama, mixtral, phi3
from .switch_layers import SparseMoE


@dataclasses.dataclass
class ModelArgs(phi3.ModelArgs):
    # Defaults are transformers' PhimoeConfig ones.
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int | None = 131072
    num_local_experts: int = 16
    num_experts_per_tok: int = 2
    router_jitter_noise: float = 0.01
    lm_head_bias: bool = False


def sparsemixer(logits: mx.array, *, top_k: int, jitter_eps: float) -> tuple[mx.array, mx.array]:
    """PhiMoE's routing at inference: ``(indices, weights)``, each ``(..., top_k)``.

    Choice i is the best expert not chosen yet. Its weight is its softmax probability
    among the remaining experts whose logit lies within a relative band of the best one,
    ``(best - logit) / max(|logit|, best) <= 2 * jitter_eps``; the others are masked out.
    The weights are not renormalised across the k choices.
    """
    neg_inf = mx.array(-mx.inf, dtype=logits.dtype)
    remaining = logits
    indices, weights = [], []
    for _ in range(top_k):
        best = remaining.max(axis=-1, keepdims=True)
        choice = mx.stop_gradient(mx.argmax(remaining, axis=-1, keepdims=True))
        outside = (best - logits) / mx.maximum(mx.abs(logits), best) > 2 * jitter_eps
        probs = mx.softmax(mx.where(outside, neg_inf, remaining), axis=-1, precise=True)
        weights.append(mx.take_along_axis(probs, choice, axis=-1))
        indices.append(choice)
        remaining = mx.put_along_axis(remaining, choice, neg_inf, axis=-1)
    return mx.concatenate(indices, axis=-1), mx.concatenate(weights, axis=-1)


class SparseMixerMoE(SparseMoE):
    """:class:`SparseMoE` (router ``gate``, experts ``switch_mlp``) with sparsemixer routing."""

    def __init__(self, dim: int, hidden: int, num_experts: int, *, top_k: int, jitter_eps: float):
        super().__init__(dim, hidden, num_experts, top_k=top_k, normalize_top_k=False)
        self.jitter_eps = jitter_eps

    def __call__(self, x: mx.array) -> mx.array:
        # Routing in float32, so low-precision weights do not flip the chosen experts.
        logits = self.gate(x).astype(mx.float32)
        indices, scores = sparsemixer(logits, top_k=self.top_k, jitter_eps=self.jitter_eps)
        y = self.switch_mlp(x, indices)
        y = (y * scores[..., None].astype(y.dtype)).sum(axis=-2)
        if self.group is not None:
            y = mx.distributed.all_sum(y, group=self.group)
        return y


class DecoderLayer(llama.DecoderLayer):
    """Llama's block with LayerNorms; the MoE lives at ``block_sparse_moe`` as in checkpoints."""

    def __init__(self, args: ModelArgs):
        moe = SparseMixerMoE(
            args.hidden_size,
            args.intermediate_size,
            args.num_local_experts,
            top_k=args.num_experts_per_tok,
            jitter_eps=args.router_jitter_noise,
        )
        super().__init__(args, mlp=moe)
        self.block_sparse_moe = self.pop("mlp")
        # transformers' PhimoeConfig names the LayerNorm epsilon rms_norm_eps.
        self.input_layernorm = nn.LayerNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(args.hidden_size, eps=args.rms_norm_eps)

    mlp = mixtral.DecoderLayer.mlp  # the read-only alias the shared code addresses


class Model(mixtral.Model):
    """Mixtral's checkpoint handling (w1/w2/w3 experts) and sharding, PhiMoE's layers."""

    model_type: ClassVar[str] = "phimoe"
    args: ModelArgs  # type: ignore[assignment]

    def __init__(self, args: ModelArgs):
        super().__init__(args)  # type: ignore[arg-type]
        self.model.norm = nn.LayerNorm(args.hidden_size, eps=args.rms_norm_eps)
        if not args.tie_word_embeddings and args.lm_head_bias:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=True)

    def build_layers(self, args: llama.ModelArgs) -> list[nn.Module]:
        assert isinstance(args, ModelArgs)
        return [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
