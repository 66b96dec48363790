"""Architectures, one module per Hugging Face ``model_type``.

Public: :func:`get_model_classes` resolves a ``model_type`` to its ``(Model, ModelArgs)``
pair, :data:`SUPPORTED_MODEL_TYPES` lists what is available, and :class:`LanguageModel` is
the contract each architecture implements.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from .._errors import UnsupportedError
from .base import BaseModelArgs, LanguageModel

__all__ = ["SUPPORTED_MODEL_TYPES", "BaseModelArgs", "LanguageModel", "get_model_classes"]

# model_type -> module implementing it. Several types share one implementation when the
# checkpoints differ only in configuration.
_MODULES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3_moe",
    "mixtral": "mixtral",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3_text",
    "phi3": "phi3",
    "phimoe": "phimoe",
    "starcoder2": "starcoder2",
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
    "cohere": "cohere",
    "qwen2_moe": "qwen2_moe",
    "olmo2": "olmo2",
    "granite": "granite",
    "minicpm": "minicpm",
    "internlm2": "internlm2",
    "exaone": "exaone",
    "glm4": "glm4",
    "ernie4_5": "ernie4_5",
    "smollm3": "smollm3",
    "deepseek_v2": "deepseek_v2",
    "deepseek_v3": "deepseek_v3",
    "kimi_k2": "deepseek_v3",
    "internlm3": "internlm3",
    "glm4_moe": "glm4_moe",
    "olmo3": "olmo3",
}


SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_MODULES))


def get_model_classes(model_type: str) -> tuple[type[Any], type[BaseModelArgs]]:
    """``(Model, ModelArgs)`` for ``model_type``, or a one-line error naming near matches."""
    module = _MODULES.get(model_type)
    if module is None:
        near = difflib.get_close_matches(model_type, SUPPORTED_MODEL_TYPES, n=3, cutoff=0.4)
        hint = f"; nearest supported: {', '.join(near)}" if near else ""
        raise UnsupportedError(
            f"model_type {model_type!r} is not supported{hint} "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    mod = importlib.import_module(f"{__name__}.{module}")
    return mod.Model, mod.ModelArgs
