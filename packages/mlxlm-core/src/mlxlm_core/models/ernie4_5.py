"""ERNIE 4.5 (dense: 0.3B): Llama with interleaved rope and one ``use_bias`` switch for every
attention and MLP projection."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from . import llama


@dataclasses.dataclass
class ModelArgs(llama.ModelArgs):
    # Defaults are transformers' Ernie4_5Config ones.
    head_dim: int | None = 128
    use_bias: bool = False
    rope_traditional: bool = True  # rotated pairs are interleaved
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.attention_bias = self.mlp_bias = self.use_bias


class Model(llama.Model):
    model_type: ClassVar[str] = "ernie4_5"
