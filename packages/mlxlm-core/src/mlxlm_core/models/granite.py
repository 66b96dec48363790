"""Granite (IBM Granite 3.x dense): Llama with four scalar multipliers from muP training.

Embeddings are multiplied by ``embedding_multiplier``, each block's attention and MLP
outputs by ``residual_multiplier`` before they join the residual, the attention softmax
uses ``attention_multiplier`` as its scale, and logits are divided by ``logits_scaling``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import mlx.core as mx
import mlx.nn as nn

from ..cache import KVCache
from . import llama


@dataclasses.dataclass
class ModelArgs(llama.ModelArgs):
    # Defaults are transformers' GraniteConfig ones.
    tie_word_embeddings: bool = False
    embedding_multiplier: float = 1.0
    logits_scaling: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float = 1.0


class DecoderLayer(llama.DecoderLayer):
    """Llama's block with the sub-block outputs scaled before the residual sum (also
    MiniCPM's ``scale_depth / sqrt(num_layers)``)."""

    def __init__(
        self,
        args: llama.ModelArgs,
        *,
        residual_scale: float,
        attn: nn.Module | None = None,
        mlp: nn.Module | None = None,
    ):
        super().__init__(args, attn=attn, mlp=mlp)
        self.residual_scale = residual_scale

    def __call__(self, x: mx.array, mask: Any, cache: KVCache | None) -> mx.array:
        h = x + self.residual_scale * self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.residual_scale * self.mlp(self.post_attention_layernorm(h))


class Model(llama.Model):
    model_type: ClassVar[str] = "granite"
    args: ModelArgs

    def build_layers(self, args: llama.ModelArgs) -> list[nn.Module]:
        assert isinstance(args, ModelArgs)
        layers: list[nn.Module] = []
        for _ in range(args.num_hidden_layers):
            attn = llama.Attention(args)
            attn.scale = args.attention_multiplier
            layers.append(DecoderLayer(args, residual_scale=args.residual_multiplier, attn=attn))
        return layers

    def __call__(
        self,
        inputs: mx.array,
        cache: Sequence[KVCache] | None = None,
        input_embeddings: mx.array | None = None,
    ) -> mx.array:
        # transformers scales caller-provided embeddings too.
        h = self.model.embed_tokens(inputs) if input_embeddings is None else input_embeddings
        logits = super().__call__(inputs, cache, h * self.args.embedding_multiplier)
        return logits / self.args.logits_scaling
