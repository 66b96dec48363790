"""Qwen3: Llama's block with an RMSNorm on each query and key head, explicit ``head_dim``."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import mlx.nn as nn

from . import llama, qwen2


@dataclasses.dataclass
class ModelArgs(qwen2.ModelArgs):
    # transformers' Qwen3Config default; real configs always state it.
    head_dim: int | None = 128


class Model(llama.Model):
    model_type: ClassVar[str] = "qwen3"

    def build_layers(self, args: llama.ModelArgs) -> list[nn.Module]:
        return [
            llama.DecoderLayer(args, attn=llama.Attention(args, qk_norm=True))
            for _ in range(args.num_hidden_layers)
        ]
