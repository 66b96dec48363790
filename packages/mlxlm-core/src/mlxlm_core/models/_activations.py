"""Hugging Face activation names (``hidden_act``) mapped to MLX functions.

transformers spells the same function several ways: ``gelu_new``, ``gelu_fast``,
``gelu_pytorch_tanh`` are all the tanh approximation of GELU, while plain ``gelu`` is the
exact (erf) one. Getting this wrong moves logits by ~1e-3, so it is looked up, not guessed.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from .._errors import UnsupportedError

__all__ = ["activation"]

_ACTIVATIONS: dict[str, Callable[[mx.array], mx.array]] = {
    "gelu": nn.gelu,
    "gelu_python": nn.gelu,
    "gelu_new": nn.gelu_approx,
    "gelu_fast": nn.gelu_approx,
    "gelu_pytorch_tanh": nn.gelu_approx,
    "quick_gelu": nn.gelu_fast_approx,
    "silu": nn.silu,
    "swish": nn.silu,
    "relu": nn.relu,
}


def activation(name: str) -> Callable[[mx.array], mx.array]:
    """The MLX function for a transformers activation name; unknown names are refused."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise UnsupportedError(
            f"unsupported activation {name!r} (supported: {', '.join(sorted(_ACTIVATIONS))})"
        ) from None
