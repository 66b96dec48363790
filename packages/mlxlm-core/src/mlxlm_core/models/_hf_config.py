"""Small readers for Hugging Face config conventions shared by several architectures."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._errors import UnsupportedError


def apply_rope_parameters(args: Any) -> None:
    """Read transformers >= 5 ``rope_parameters`` into ``rope_theta``/``rope_scaling``.

    Newer configs nest the base and the scaling variant in one dict instead of the older
    top-level ``rope_theta`` and ``rope_scaling``; both spellings must load the same model.
    """
    params = getattr(args, "rope_parameters", None)
    if not params:
        return
    if params.get("rope_theta") is not None:
        args.rope_theta = float(params["rope_theta"])
    kind = params.get("rope_type") or params.get("type") or "default"
    if args.rope_scaling is None and kind != "default":
        args.rope_scaling = dict(params)


def uniform_sliding_window(
    *,
    use_sliding_window: bool,
    sliding_window: int | None,
    max_window_layers: int | None,
    layer_types: Sequence[str] | None,
    num_layers: int,
) -> int | None:
    """The one window every layer uses (Qwen-style flags), or None for full attention.

    Qwen configs carry a ``sliding_window`` that only applies when ``use_sliding_window``
    is set, and then only to layers from ``max_window_layers`` on. A mix of windowed and
    full layers is refused rather than silently run with the wrong masks.
    """
    if not use_sliding_window or sliding_window is None:
        return None
    if layer_types is None:
        first = num_layers if max_window_layers is None else max_window_layers
        layer_types = [
            "sliding_attention" if i >= first else "full_attention" for i in range(num_layers)
        ]
    sliding = [t == "sliding_attention" for t in layer_types]
    if not any(sliding):
        return None
    if all(sliding):
        return sliding_window
    raise UnsupportedError("checkpoints that mix sliding-window and full-attention layers")
