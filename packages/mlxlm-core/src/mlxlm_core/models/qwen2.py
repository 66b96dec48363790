"""Qwen2 / Qwen2.5: Llama's block with biased query/key/value projections."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import mlx.nn as nn

from . import llama
from ._hf_config import apply_rope_parameters, uniform_sliding_window


@dataclasses.dataclass
class ModelArgs(llama.ModelArgs):
    # Defaults are transformers' Qwen2Config ones: saved configs omit fields left at default.
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    rope_parameters: dict[str, Any] | None = None
    use_sliding_window: bool = False
    max_window_layers: int = 28
    layer_types: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        apply_rope_parameters(self)
        # Qwen2 always biases q/k/v and never o_proj; it has no `attention_bias` switch.
        self.attention_bias = False
        # `sliding_window` is only a setting until `use_sliding_window` switches it on.
        self.sliding_window = uniform_sliding_window(
            use_sliding_window=self.use_sliding_window,
            sliding_window=self.sliding_window,
            max_window_layers=self.max_window_layers,
            layer_types=self.layer_types,
            num_layers=self.num_hidden_layers,
        )


class Model(llama.Model):
    model_type: ClassVar[str] = "qwen2"

    def build_layers(self, args: llama.ModelArgs) -> list[nn.Module]:
        return [
            llama.DecoderLayer(args, attn=llama.Attention(args, bias=True))
            for _ in range(args.num_hidden_layers)
        ]
