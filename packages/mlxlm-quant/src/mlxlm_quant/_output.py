"""Writing a quantized model: MLX-LM's config block plus the recipe that produced it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlxlm_core import InvalidArgumentError, save

from ._dynamic import bits_per_weight
from ._recipe import QuantRecipe


def _flat(tree: Any) -> list[tuple[str, mx.array]]:
    return tree_flatten(tree)  # type: ignore[return-value]


__all__ = ["check_destination", "round_floats", "save_quantized"]

SAVE_DTYPES = ("float16", "bfloat16", "float32")


def check_destination(path: str | Path) -> Path:
    """Refuse an existing non-empty destination before any work is done."""
    dest = Path(path)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InvalidArgumentError(f"{dest} already exists; choose a new --mlx-path or remove it")
    return dest


def round_floats(model: nn.Module, dtype: str) -> None:
    """Round floating parameters to ``dtype`` and back, in place.

    The file stores ``dtype``; rounding the in-memory model the same way makes the model we
    return compute exactly what a reload of the file computes.
    """
    target = getattr(mx, dtype)
    changed = [
        (k, v.astype(target).astype(v.dtype))
        for k, v in _flat(model.parameters())
        if mx.issubdtype(v.dtype, mx.floating) and v.dtype != target
    ]
    if changed:
        model.update(tree_unflatten(changed))


def save_quantized(
    path: str | Path,
    model: nn.Module,
    tokenizer: Any,
    config: dict[str, Any],
    block: dict[str, Any],
    *,
    recipe: QuantRecipe,
    method: str,
    details: dict[str, Any] | None = None,
    dtype: str = "float16",
) -> Path:
    """Save ``model`` (already quantized) with ``config.json`` recording the recipe.

    ``quantization`` (and its transformers-style twin ``quantization_config``) is MLX-LM's
    block, which both loaders read; ``quantization_recipe`` records how it was made.
    """
    if dtype not in SAVE_DTYPES:
        raise InvalidArgumentError(f"--save-dtype must be one of {', '.join(SAVE_DTYPES)}")
    round_floats(model, dtype)
    config = dict(config)
    config["quantization"] = block
    config["quantization_config"] = block
    config["torch_dtype"] = dtype
    config["quantization_recipe"] = {
        "method": method,
        "recipe": recipe.as_dict(),
        "bits_per_weight": round(bits_per_weight(model), 4),
        **(details or {}),
    }
    try:
        return save(path, model, tokenizer, config, dtype=dtype)
    except (OSError, RuntimeError) as exc:  # MLX reports I/O failures as RuntimeError
        raise InvalidArgumentError(f"cannot write {path}: {exc}") from None
