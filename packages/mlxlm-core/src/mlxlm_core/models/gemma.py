"""Gemma: Llama's block with a GeGLU MLP, ``(1 + weight)`` RMSNorms, embeddings scaled by
``sqrt(hidden_size)`` and the output head tied to the embeddings.

Gemma 2 and Gemma 3 (``gemma2.py``, ``gemma3_text.py``) build on the pieces here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn

from . import llama
from ._activations import activation


@dataclasses.dataclass
class ModelArgs(llama.ModelArgs):
    # Defaults are transformers' GemmaConfig ones.
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    hidden_act: str = "gelu_pytorch_tanh"
    hidden_activation: str | None = None

    @property
    def activation_name(self) -> str:
        """The MLP activation as transformers resolves it.

        Gemma was trained with the tanh approximation of GELU; early configs say
        ``hidden_act: "gelu"`` for it, which transformers reads as the approximation. Only an
        explicit ``hidden_activation`` selects something else.
        """
        if self.hidden_activation is not None:
            return self.hidden_activation
        return "gelu_pytorch_tanh" if self.hidden_act == "gelu" else self.hidden_act


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: checkpoints store the scale as an offset from one."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, 1.0 + self.weight, self.eps)


class MLP(llama.MLP):
    """Llama's gated MLP with a GELU gate (GeGLU)."""

    def __init__(self, dim: int, hidden: int, *, act: Callable[[mx.array], mx.array]):
        super().__init__(dim, hidden)
        self.act = act

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderStack(llama.DecoderStack):
    """Llama's stack with a Gemma final norm and embeddings multiplied by ``embed_scale``."""

    def __init__(
        self,
        args: ModelArgs,
        layers: list[nn.Module],
        *,
        windows: Sequence[int | None] | None = None,
        embed_scale: float,
    ):
        super().__init__(args, layers, windows=windows)
        self.norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.embed_scale = embed_scale

    def embed(self, inputs: mx.array, input_embeddings: mx.array | None) -> mx.array:
        h = super().embed(inputs, input_embeddings)
        # The scale is taken in the activations' dtype, as the reference implementations do.
        return h * mx.array(self.embed_scale, dtype=h.dtype)


def gemma_layer(args: ModelArgs, *, attn: nn.Module | None = None) -> llama.DecoderLayer:
    """A Llama block with Gemma's MLP and norms (the shape of Gemma 1)."""
    mlp = MLP(args.hidden_size, args.intermediate_size, act=activation(args.activation_name))
    layer = llama.DecoderLayer(args, attn=attn, mlp=mlp)
    layer.input_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
    layer.post_attention_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
    return layer


class Model(llama.Model):
    model_type: ClassVar[str] = "gemma"
    args: ModelArgs

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        # Re-wrap the blocks in Gemma's stack (the stack built above is never evaluated).
        self.model = DecoderStack(
            args, self.model.layers, windows=self.model.windows, embed_scale=self.embed_scale(args)
        )

    def embed_scale(self, args: ModelArgs) -> float:
        return args.hidden_size**0.5

    def build_layers(self, args: llama.ModelArgs) -> list[nn.Module]:
        assert isinstance(args, ModelArgs)
        return [gemma_layer(args) for _ in range(args.num_hidden_layers)]

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        if not self.args.tie_word_embeddings and not any(k.startswith("lm_head.") for k in weights):
            # An untied config whose checkpoint omits the head: the head is the embedding.
            prefix = "model.embed_tokens."
            weights = dict(weights)
            for key in [k for k in weights if k.startswith(prefix)]:
                weights["lm_head." + key[len(prefix) :]] = weights[key]
        return super().sanitize(weights)
