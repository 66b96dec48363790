"""StarCoder2: Llama's attention (biased, windowed) with LayerNorms and a plain GELU MLP
(``c_fc`` / ``c_proj``, GPT-2's names, also used by ``gpt2.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear

from . import llama
from ._activations import activation
from .sharding import shard_attention_mlp


@dataclasses.dataclass
class ModelArgs(llama.ModelArgs):
    # Defaults are transformers' Starcoder2Config ones (its configs have no rms_norm_eps).
    rms_norm_eps: float = 1e-5
    vocab_size: int = 49152
    norm_epsilon: float = 1e-5
    use_bias: bool = True
    hidden_act: str = "gelu_pytorch_tanh"
    max_position_embeddings: int | None = 4096
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.rms_norm_eps = self.norm_epsilon
        self.attention_bias = self.use_bias  # every projection, o_proj included


class MLP(nn.Module):
    """``c_proj(act(c_fc(x)))`` with biases (StarCoder2 and GPT-2)."""

    def __init__(
        self, dim: int, hidden: int, *, act: Callable[[mx.array], mx.array], bias: bool = True
    ):
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, dim, bias=bias)
        self.act = act

    def __call__(self, x: mx.array) -> mx.array:
        return self.c_proj(self.act(self.c_fc(x)))


def shard_mlp(mlp: MLP, group: mx.distributed.Group) -> None:
    """Hidden units split across ranks; one all-reduce after ``c_proj``."""
    mlp.c_fc = shard_linear(mlp.c_fc, "all-to-sharded", group=group)
    mlp.c_proj = shard_linear(mlp.c_proj, "sharded-to-all", group=group)


class Model(llama.Model):
    model_type: ClassVar[str] = "starcoder2"
    args: ModelArgs

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.model.norm = nn.LayerNorm(args.hidden_size, eps=args.norm_epsilon)

    def build_layers(self, args: llama.ModelArgs) -> list[nn.Module]:
        assert isinstance(args, ModelArgs)
        layers: list[nn.Module] = []
        for _ in range(args.num_hidden_layers):
            mlp = MLP(
                args.hidden_size,
                args.intermediate_size,
                act=activation(args.hidden_act),
                bias=args.use_bias,
            )
            layer = llama.DecoderLayer(args, attn=llama.Attention(args), mlp=mlp)
            layer.input_layernorm = nn.LayerNorm(args.hidden_size, eps=args.norm_epsilon)
            layer.post_attention_layernorm = nn.LayerNorm(args.hidden_size, eps=args.norm_epsilon)
            layers.append(layer)
        return layers

    def shard(self, group: mx.distributed.Group | None = None) -> None:
        group = group or mx.distributed.init()
        shard_attention_mlp(self.layers, group)  # attention; the MLP's names are GPT-2's
        for layer in self.layers:
            shard_mlp(layer.mlp, group)
