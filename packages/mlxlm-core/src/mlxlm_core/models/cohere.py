"""Cohere Command-R / Command-R+: one bias-free LayerNorm feeding attention and MLP in
parallel, interleaved ("traditional") rope, output logits multiplied by ``logit_scale``, and
(Command-R+) a per-head LayerNorm on queries and keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import mlx.core as mx
import mlx.nn as nn

from ..cache import KVCache
from . import llama
from .sharding import shard_attention_mlp


@dataclasses.dataclass
class ModelArgs(llama.ModelArgs):
    # Defaults are transformers' CohereConfig ones (its configs have no rms_norm_eps).
    rms_norm_eps: float = 1e-5
    vocab_size: int = 256000
    layer_norm_eps: float = 1e-5
    layer_norm_bias: bool = False
    logit_scale: float = 0.0625
    use_qk_norm: bool = False
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.rms_norm_eps = self.layer_norm_eps
        self.rope_traditional = True  # Cohere rotates adjacent pairs, not halves


class HeadNorm(nn.Module):
    """Bias-free LayerNorm over ``head_dim`` with its own scale for every head."""

    def __init__(self, heads: int, dims: int, *, eps: float):
        super().__init__()
        self.weight = mx.ones((heads, dims))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:  # (B, L, heads, head_dim)
        return mx.fast.layer_norm(x, None, None, self.eps) * self.weight


class DecoderLayer(llama.DecoderLayer):
    """``x + attn(norm(x)) + mlp(norm(x))``: one norm, two branches in parallel."""

    def __init__(self, args: ModelArgs):
        attn = llama.Attention(args, qk_norm=args.use_qk_norm)
        if args.use_qk_norm:
            assert args.head_dim is not None and args.num_key_value_heads is not None
            eps = args.layer_norm_eps
            attn.q_norm = HeadNorm(args.num_attention_heads, args.head_dim, eps=eps)
            attn.k_norm = HeadNorm(args.num_key_value_heads, args.head_dim, eps=eps)
        super().__init__(args, attn=attn)
        self.input_layernorm = nn.LayerNorm(
            args.hidden_size, eps=args.layer_norm_eps, bias=args.layer_norm_bias
        )
        del self.post_attention_layernorm

    def __call__(self, x: mx.array, mask: Any, cache: KVCache | None) -> mx.array:
        h = self.input_layernorm(x)
        return x + self.self_attn(h, mask, cache) + self.mlp(h)


class Model(llama.Model):
    model_type: ClassVar[str] = "cohere"
    args: ModelArgs

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.model.norm = nn.LayerNorm(
            args.hidden_size, eps=args.layer_norm_eps, bias=args.layer_norm_bias
        )

    def build_layers(self, args: llama.ModelArgs) -> list[nn.Module]:
        assert isinstance(args, ModelArgs)
        return [DecoderLayer(args) for _ in range(args.num_hidden_layers)]

    def __call__(
        self,
        inputs: mx.array,
        cache: Sequence[KVCache] | None = None,
        input_embeddings: mx.array | None = None,
    ) -> mx.array:
        return super().__call__(inputs, cache, input_embeddings) * self.args.logit_scale

    def shard(self, group: mx.distributed.Group | None = None) -> None:
        group = group or mx.distributed.init()
        shard_attention_mlp(self.layers, group)
        rank = group.rank()
        for layer in self.layers:
            attn = layer.self_attn
            if "q_norm" in attn:  # keep the scales of this rank's heads
                q, kv = attn.n_heads, attn.n_kv_heads  # already per rank
                attn.q_norm.weight = attn.q_norm.weight[rank * q : (rank + 1) * q]
                attn.k_norm.weight = attn.k_norm.weight[rank * kv : (rank + 1) * kv]
