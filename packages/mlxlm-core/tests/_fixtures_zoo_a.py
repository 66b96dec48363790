"""Shared by the zoo A unit tests: tiny configs of every architecture and helpers.

Loaded by path (the tests run with --import-mode=importlib) and, by the two-rank sharding
test's worker processes, by module name from this directory.
"""

from __future__ import annotations

import copy
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlxlm_core.cache import make_prompt_cache
from mlxlm_core.models import get_model_classes

_COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "vocab_size": 128,
}
WINDOW = 6
CONFIGS: dict[str, dict[str, Any]] = {
    "gemma": {**_COMMON, "model_type": "gemma", "head_dim": 32},
    "gemma2": {
        **_COMMON,
        "model_type": "gemma2",
        "num_hidden_layers": 4,
        "head_dim": 32,
        "query_pre_attn_scalar": 24,
        "attn_logit_softcapping": 10.0,
        "final_logit_softcapping": 5.0,
        "sliding_window": WINDOW,
    },
    "gemma3_text": {
        **_COMMON,
        "model_type": "gemma3_text",
        "num_hidden_layers": 4,
        "head_dim": 32,
        "query_pre_attn_scalar": 24,
        "sliding_window": WINDOW,
        "sliding_window_pattern": 3,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
    },
    # Phi-3-mini-4k's shape: a window shorter than the context.
    "phi3": {
        **_COMMON,
        "model_type": "phi3",
        "sliding_window": WINDOW,
        "max_position_embeddings": 4096,
    },
    "phi3_longrope": {
        **_COMMON,
        "model_type": "phi3",
        "partial_rotary_factor": 0.75,
        "max_position_embeddings": 512,
        "original_max_position_embeddings": 64,
        "rope_scaling": {"type": "su", "long_factor": [1, 2, 3, 4, 5, 6], "short_factor": [1] * 6},
    },
    "phimoe": {
        **_COMMON,
        "model_type": "phimoe",
        "intermediate_size": 64,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "router_jitter_noise": 0.25,
        "attention_bias": True,
        "lm_head_bias": True,
    },
    "starcoder2": {
        **{k: v for k, v in _COMMON.items() if k != "rms_norm_eps"},
        "model_type": "starcoder2",
        "norm_epsilon": 1e-5,
        "sliding_window": WINDOW,
    },
    "gpt2": {
        "model_type": "gpt2",
        "n_embd": 64,
        "n_head": 4,
        "n_layer": 2,
        "n_positions": 64,
        "layer_norm_epsilon": 1e-5,
        "vocab_size": 128,
    },
    "gpt_neox": {
        "model_type": "gpt_neox",
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "vocab_size": 128,
        "rotary_pct": 0.5,
        "tie_word_embeddings": True,
    },
    "cohere": {
        **{k: v for k, v in _COMMON.items() if k != "rms_norm_eps"},
        "model_type": "cohere",
        "logit_scale": 0.8333,
        "use_qk_norm": True,
    },
}
ARCHS = list(CONFIGS)
SCALE = 4.0  # LoRA scale


def build(name: str, *, seed: int = 0, **overrides: Any) -> nn.Module:
    config = {**copy.deepcopy(CONFIGS[name]), **overrides}
    model_cls, args_cls = get_model_classes(config["model_type"])
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    # Random norms and biases: fresh ones (ones/zeros) would hide misplaced ones.
    params = []
    for key, value in tree_flatten(model.parameters()):
        if key.endswith(".bias") or "norm" in key or ".ln_" in key:
            value = mx.random.normal(value.shape) * 0.2 + (0.0 if key.endswith("bias") else 1.0)
        params.append((key, value))
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    return model


def windows(model: nn.Module) -> list[int | None]:
    return [getattr(c, "max_size", None) for c in make_prompt_cache(model)]


def toks(shape: tuple[int, ...], seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, 128, size=shape))


def max_diff(a: mx.array, b: mx.array) -> float:
    return float(mx.max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32))).item())


def model_args(name: str, **overrides: Any) -> Any:
    """The parsed ``ModelArgs`` of ``CONFIGS[name]`` with ``overrides``."""
    config = {**copy.deepcopy(CONFIGS[name]), **overrides}
    return get_model_classes(config["model_type"])[1].from_dict(config)
