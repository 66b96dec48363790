"""One entry point for every method: a recipe in, a quantized model and its config block out."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlxlm_core import InvalidArgumentError

from ._recipe import QuantRecipe

__all__ = ["quantize"]


def quantize(
    model: nn.Module,
    recipe: QuantRecipe,
    *,
    method: str = "rtn",
    tokens: mx.array | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    dwq_steps: int = 200,
    dwq_lr: float = 1e-5,
) -> dict[str, Any]:
    """Quantize ``model`` in place per ``recipe``; returns MLX-LM's config block.

    ``rtn`` rounds to nearest; ``awq``, ``gptq`` and ``dwq`` learn from calibration
    ``tokens`` (an ``(N, L)`` array, see :func:`calibration_windows`).
    """
    if method == "rtn":
        return recipe.apply(model)
    if tokens is None:
        raise InvalidArgumentError(f"{method} needs calibration tokens")
    if method == "awq":
        from ._awq import awq_quantize

        return awq_quantize(model, tokens, recipe, progress=progress)
    if method == "gptq":
        from ._gptq import gptq_quantize

        return gptq_quantize(model, tokens, recipe, progress=progress)
    if method == "dwq":
        from ._dwq import DWQConfig, dwq_quantize

        config = DWQConfig(steps=dwq_steps, learning_rate=dwq_lr)
        return dwq_quantize(model, tokens, recipe, config=config, progress=progress)
    raise InvalidArgumentError(f"unknown method {method!r} (known: rtn, awq, gptq, dwq)")
