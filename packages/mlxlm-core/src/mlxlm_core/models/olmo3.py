"""OLMo 3: OLMo 2's blocks, three of every four attending within a sliding window.

``layer_types`` marks each block ``sliding_attention`` or ``full_attention`` (by default
every fourth is full). Sliding blocks use plain rope; only the full ones apply the long-
context scaling (``rope_scaling``). Configs written by transformers 5 nest the rope per
layer type (``rope_parameters = {"full_attention": {...}, "sliding_attention": {...}}``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import mlx.nn as nn

from . import llama, olmo2
from .rope import make_rope


@dataclasses.dataclass
class ModelArgs(olmo2.ModelArgs):
    # Defaults are transformers' Olmo3Config ones.
    sliding_window: int | None = 4096
    sliding_rope_theta: float | None = None  # set from per-type rope_parameters

    def __post_init__(self) -> None:
        per_type = self.rope_parameters or {}
        if "full_attention" in per_type or "sliding_attention" in per_type:
            full: dict[str, Any] = per_type.get("full_attention") or {}
            sliding: dict[str, Any] = per_type.get("sliding_attention") or {}
            self.rope_parameters = full  # what Llama's reading understands
            self.sliding_rope_theta = sliding.get("rope_theta")
        # Mixed layer types are per-layer windows here; Llama's own reading refuses them.
        layer_types, self.layer_types = self.layer_types, None
        super().__post_init__()
        self.layer_types = layer_types or [
            "full_attention" if (i + 1) % 4 == 0 else "sliding_attention"
            for i in range(self.num_hidden_layers)
        ]
        if self.sliding_rope_theta is None:
            self.sliding_rope_theta = self.rope_theta

    def sliding(self, layer: int) -> bool:
        assert self.layer_types is not None
        return self.layer_types[layer] == "sliding_attention"


class Model(olmo2.Model):
    model_type: ClassVar[str] = "olmo3"

    def build_layers(self, args: llama.ModelArgs) -> list[nn.Module]:
        assert isinstance(args, ModelArgs) and args.sliding_rope_theta is not None
        layers = super().build_layers(args)
        for i, layer in enumerate(layers):
            if args.sliding(i):
                attn: Any = layer.self_attn
                attn.rope = make_rope(attn.head_dim, base=args.sliding_rope_theta)
        return layers

    def layer_windows(self, args: llama.ModelArgs) -> list[int | None]:
        assert isinstance(args, ModelArgs)
        window = args.sliding_window
        return [window if args.sliding(i) else None for i in range(args.num_hidden_layers)]
