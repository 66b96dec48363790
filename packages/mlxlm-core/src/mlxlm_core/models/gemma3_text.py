"""Gemma 3 (text): Gemma 2's block with Gemma RMSNorms on each query and key head, and
a repeating pattern of sliding-window layers (their own, smaller rope base) closed by one
global layer (the scaled rope of ``rope_theta``/``rope_scaling``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn

from .._errors import UnsupportedError
from . import gemma, gemma2, llama
from .rope import make_rope


@dataclasses.dataclass
class ModelArgs(gemma2.ModelArgs):
    # Defaults are transformers' Gemma3TextConfig ones.
    head_dim: int | None = 256
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float = 10_000.0
    query_pre_attn_scalar: float = 256.0
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = 4096
    sliding_window_pattern: int = 6
    use_bidirectional_attention: bool = False

    def __post_init__(self) -> None:
        self._read_rope_per_layer_type()
        super().__post_init__()
        if self.use_bidirectional_attention:
            raise UnsupportedError("bidirectional Gemma 3 (embedding models) is not a decoder")

    def _read_rope_per_layer_type(self) -> None:
        """transformers >= 5 nests one rope configuration per layer type."""
        params = self.rope_parameters or {}
        if "full_attention" not in params and "sliding_attention" not in params:
            return
        full = params.get("full_attention") or {}
        local = params.get("sliding_attention") or {}
        self.rope_parameters = None
        self.rope_theta = float(full.get("rope_theta", self.rope_theta))
        kind = full.get("rope_type") or full.get("type") or "default"
        if self.rope_scaling is None and kind != "default":
            self.rope_scaling = dict(full)
        self.rope_local_base_freq = float(local.get("rope_theta", self.rope_local_base_freq))

    def default_layer_types(self) -> list[str]:
        """``sliding_window_pattern - 1`` sliding layers, then a global one, repeated."""
        pattern = self.sliding_window_pattern
        return [
            "sliding_attention" if (i + 1) % pattern else "full_attention"
            for i in range(self.num_hidden_layers)
        ]


class Model(gemma2.Model):
    model_type: ClassVar[str] = "gemma3_text"
    args: ModelArgs

    def embed_scale(self, args: gemma.ModelArgs) -> float:
        # The checkpoints were trained with the scale rounded to bfloat16.
        return mx.array(args.hidden_size**0.5, dtype=mx.bfloat16).item()  # type: ignore[return-value]

    def build_layers(self, args: llama.ModelArgs) -> list[nn.Module]:
        assert isinstance(args, ModelArgs) and args.head_dim is not None
        assert args.layer_types is not None
        layers: list[nn.Module] = []
        for kind in args.layer_types:
            attn = gemma2.attention_layer(args, qk_norm=True)
            attn.q_norm = gemma.RMSNorm(args.head_dim, eps=args.rms_norm_eps)
            attn.k_norm = gemma.RMSNorm(args.head_dim, eps=args.rms_norm_eps)
            if kind == "sliding_attention":
                attn.rope = make_rope(args.head_dim, base=args.rope_local_base_freq)
            layers.append(gemma2.DecoderLayer(args, attn=attn))
        return layers
