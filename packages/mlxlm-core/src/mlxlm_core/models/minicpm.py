"""MiniCPM (1/2/4, dense): Llama with muP-style scaling.

Token embeddings are multiplied by ``scale_emb``, each block's sub-block outputs by
``scale_depth / sqrt(num_hidden_layers)``, and the final hidden state is divided by
``hidden_size / dim_model_base`` before the (usually tied) head.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn

from ..cache import KVCache
from . import granite, llama


@dataclasses.dataclass
class ModelArgs(llama.ModelArgs):
    # Defaults are MiniCPM's configuration code's; its checkpoints omit
    # tie_word_embeddings and are tied (transformers' default).
    scale_emb: float = 1.0
    scale_depth: float = 1.0
    dim_model_base: int = 1
    tie_word_embeddings: bool = True


class Model(llama.Model):
    model_type: ClassVar[str] = "minicpm"
    args: ModelArgs

    def build_layers(self, args: llama.ModelArgs) -> list[nn.Module]:
        assert isinstance(args, ModelArgs)
        scale = args.scale_depth / args.num_hidden_layers**0.5
        return [
            granite.DecoderLayer(args, residual_scale=scale) for _ in range(args.num_hidden_layers)
        ]

    def __call__(
        self,
        inputs: mx.array,
        cache: Sequence[KVCache] | None = None,
        input_embeddings: mx.array | None = None,
    ) -> mx.array:
        # Only looked-up embeddings are scaled, as in MiniCPM's own code.
        if input_embeddings is None:
            input_embeddings = self.model.embed_tokens(inputs) * self.args.scale_emb
        logits = super().__call__(inputs, cache, input_embeddings)
        # The head is linear and unbiased: dividing its input or its output is the same.
        return logits / (self.args.hidden_size / self.args.dim_model_base)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        if not self.args.tie_word_embeddings and "lm_head.weight" not in weights:
            # An untied config over a checkpoint without a head: the head is the embedding.
            weights = {**weights, "lm_head.weight": weights["model.embed_tokens.weight"]}
        return super().sanitize(weights)
