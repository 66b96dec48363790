"""SmolLM3: Llama where every ``no_rope_layer_interval``-th block attends without rope.

``no_rope_layers[i]`` is 1 where block i uses rope and 0 where it does not (NoPE). When
``use_sliding_window`` is set, the blocks ``layer_types`` marks ``sliding_attention`` (the
NoPE ones, by default) attend within ``sliding_window``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn

from . import llama


@dataclasses.dataclass
class ModelArgs(llama.ModelArgs):
    # Defaults are transformers' SmolLM3Config ones.
    no_rope_layers: list[int] | None = None
    no_rope_layer_interval: int = 4
    use_sliding_window: bool = False

    def __post_init__(self) -> None:
        # Mixed layer types are per-layer windows here (see Model.layer_windows), which
        # Llama's own reading refuses; hide them from it.
        layer_types, self.layer_types = self.layer_types, None
        super().__post_init__()
        self.layer_types = layer_types
        if self.no_rope_layers is None:
            interval = self.no_rope_layer_interval
            self.no_rope_layers = [
                int((i + 1) % interval != 0) for i in range(self.num_hidden_layers)
            ]

    def window(self, layer: int) -> int | None:
        """Block ``layer``'s sliding window (None: full attention), as transformers reads it."""
        if not self.use_sliding_window or self.sliding_window is None:
            return None
        assert self.no_rope_layers is not None
        if self.layer_types is not None:
            sliding = self.layer_types[layer] == "sliding_attention"
        else:
            sliding = not self.no_rope_layers[layer]
        return self.sliding_window if sliding else None


class NoRope(nn.Module):
    """Positions pass through untouched (a NoPE block)."""

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        return x


class Model(llama.Model):
    model_type: ClassVar[str] = "smollm3"

    def build_layers(self, args: llama.ModelArgs) -> list[nn.Module]:
        assert isinstance(args, ModelArgs) and args.no_rope_layers is not None
        layers = super().build_layers(args)
        for layer, use_rope in zip(layers, args.no_rope_layers, strict=True):
            if not use_rope:
                layer.self_attn.rope = NoRope()
        return layers

    def layer_windows(self, args: llama.ModelArgs) -> list[int | None]:
        assert isinstance(args, ModelArgs)
        return [args.window(i) for i in range(args.num_hidden_layers)]
