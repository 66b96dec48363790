"""InternLM3: Llama with InternLM's own bias switches.

Its configs say ``qkv_bias`` for the query/key/value projections and ``bias`` for the
output projection and the MLP (transformers' spelling, ``attention_bias``/``mlp_bias``,
is read when those are absent). Rope scaling follows transformers (``dynamic`` is NTK).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import mlx.nn as nn

from . import llama


@dataclasses.dataclass
class ModelArgs(llama.ModelArgs):
    # Defaults are transformers' InternLM3Config ones.
    head_dim: int | None = 128
    tie_word_embeddings: bool = False
    bias: bool | None = None
    qkv_bias: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.qkv_bias is None:
            self.qkv_bias = self.attention_bias
        if self.bias is not None:
            self.attention_bias = self.mlp_bias = self.bias  # o_proj and MLP


class Model(llama.Model):
    model_type: ClassVar[str] = "internlm3"

    def build_layers(self, args: llama.ModelArgs) -> list[nn.Module]:
        assert isinstance(args, ModelArgs)
        return [
            llama.DecoderLayer(args, attn=llama.Attention(args, bias=args.qkv_bias))
            for _ in range(args.num_hidden_layers)
        ]
