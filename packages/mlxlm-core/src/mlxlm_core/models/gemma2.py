"""Gemma 2: Gemma with sandwich norms, soft-capped attention and output logits, a query
scale of ``query_pre_attn_scalar ** -0.5``, and sliding-window layers alternating with
global ones (each layer gets the cache and mask of its own window).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import mlx.core as mx
import mlx.nn as nn

from ..cache import KVCache
from . import gemma, llama
from ._activations import activation


@dataclasses.dataclass
class ModelArgs(gemma.ModelArgs):
    # Defaults are transformers' Gemma2Config ones.
    query_pre_attn_scalar: float = 256.0
    attn_logit_softcapping: float | None = 50.0
    final_logit_softcapping: float | None = 30.0
    sliding_window: int | None = 4096
    layer_types: list[str] | None = None

    def __post_init__(self) -> None:
        # Mixed layer types are the point here; keep them away from Llama's refusal.
        types, self.layer_types = self.layer_types, None
        super().__post_init__()
        self.layer_types = types or self.default_layer_types()
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError("layer_types must name one attention type per layer")

    def default_layer_types(self) -> list[str]:
        """Even layers slide, odd ones attend globally."""
        return [
            "sliding_attention" if (i + 1) % 2 else "full_attention"
            for i in range(self.num_hidden_layers)
        ]

    def is_sliding(self, layer: int) -> bool:
        assert self.layer_types is not None
        return self.sliding_window is not None and self.layer_types[layer] == "sliding_attention"


def add_residual(x: mx.array, y: mx.array) -> mx.array:
    """``x + y``, clipped to the float16 range in float16 (Gemma's activations overflow it)."""
    if x.dtype != mx.float16:
        return x + y
    bound = mx.finfo(mx.float16).max
    return mx.clip(x.astype(mx.float32) + y.astype(mx.float32), -bound, bound).astype(mx.float16)


class DecoderLayer(llama.DecoderLayer):
    """Gemma's block with a norm before and after both the attention and the MLP."""

    def __init__(self, args: ModelArgs, *, attn: nn.Module):
        dim, eps = args.hidden_size, args.rms_norm_eps
        mlp = gemma.MLP(dim, args.intermediate_size, act=activation(args.activation_name))
        super().__init__(args, attn=attn, mlp=mlp)
        self.input_layernorm = gemma.RMSNorm(dim, eps=eps)
        self.post_attention_layernorm = gemma.RMSNorm(dim, eps=eps)
        self.pre_feedforward_layernorm = gemma.RMSNorm(dim, eps=eps)
        self.post_feedforward_layernorm = gemma.RMSNorm(dim, eps=eps)

    def __call__(self, x: mx.array, mask: Any, cache: KVCache | None) -> mx.array:
        r = self.self_attn(self.input_layernorm(x), mask, cache)
        h = add_residual(x, self.post_attention_layernorm(r))
        r = self.mlp(self.pre_feedforward_layernorm(h))
        return add_residual(h, self.post_feedforward_layernorm(r))


def attention_layer(args: ModelArgs, *, qk_norm: bool = False) -> llama.Attention:
    """Llama's attention with Gemma 2's query scale and logit soft-capping."""
    attn = llama.Attention(args, qk_norm=qk_norm)
    attn.scale = args.query_pre_attn_scalar**-0.5
    attn.softcap = args.attn_logit_softcapping
    return attn


class Model(gemma.Model):
    model_type: ClassVar[str] = "gemma2"
    args: ModelArgs

    def build_layers(self, args: llama.ModelArgs) -> list[nn.Module]:
        assert isinstance(args, ModelArgs)
        return [
            DecoderLayer(args, attn=attention_layer(args)) for _ in range(args.num_hidden_layers)
        ]

    def layer_windows(self, args: llama.ModelArgs) -> list[int | None]:
        assert isinstance(args, ModelArgs)
        return [
            args.sliding_window if args.is_sliding(i) else None
            for i in range(args.num_hidden_layers)
        ]

    def __call__(
        self,
        inputs: mx.array,
        cache: Sequence[KVCache] | None = None,
        input_embeddings: mx.array | None = None,
    ) -> mx.array:
        logits = super().__call__(inputs, cache, input_embeddings)
        cap = self.args.final_logit_softcapping
        if cap is None:
            return logits
        return mx.tanh(logits / cap) * cap
