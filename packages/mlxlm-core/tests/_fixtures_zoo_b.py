"""Tiny configs and helpers shared by the zoo B unit tests (test_models_zoo_b*.py)."""

from __future__ import annotations

import copy
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlxlm_core.models import get_model_classes

COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": 128,
    "max_position_embeddings": 256,
    "rope_theta": 10000.0,
}
CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2_moe": {
        **COMMON,
        "model_type": "qwen2_moe",
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 96,
        "norm_topk_prob": True,
        "mlp_only_layers": [1],
    },
    "olmo2": {**COMMON, "model_type": "olmo2"},
    "olmo3": {**COMMON, "model_type": "olmo3", "num_hidden_layers": 4, "sliding_window": 5},
    "granite": {
        **COMMON,
        "model_type": "granite",
        "embedding_multiplier": 12.0,
        "logits_scaling": 8.0,
        "residual_multiplier": 0.22,
        "attention_multiplier": 0.015625,
    },
    "minicpm": {
        **COMMON,
        "model_type": "minicpm",
        "scale_emb": 12.0,
        "scale_depth": 1.4,
        "dim_model_base": 16,
    },
    "internlm2": {**COMMON, "model_type": "internlm2", "bias": True},
    "internlm3": {
        **COMMON,
        "model_type": "internlm3",
        "head_dim": 16,
        "qkv_bias": True,  # o_proj and MLP unbiased (bias: False)
        "bias": False,
    },
    "exaone": {**COMMON, "model_type": "exaone", "attention_bias": True, "mlp_bias": True},
    "glm4": {**COMMON, "model_type": "glm4", "head_dim": 32},
    "glm4_moe": {
        **COMMON,
        "model_type": "glm4_moe",
        "head_dim": 32,
        "use_qk_norm": True,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "n_group": 2,
        "topk_group": 1,
    },
    "ernie4_5": {**COMMON, "model_type": "ernie4_5", "head_dim": 16, "use_bias": True},
    "smollm3": {**COMMON, "model_type": "smollm3", "no_rope_layer_interval": 2},
    "deepseek_v2": {
        **COMMON,
        "model_type": "deepseek_v2",
        "q_lora_rank": None,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 16,
        "n_routed_experts": 8,
        "n_shared_experts": 2,
        "num_experts_per_tok": 3,
        "moe_intermediate_size": 32,
        "first_k_dense_replace": 1,
        "topk_method": "group_limited_greedy",
        "n_group": 2,
        "topk_group": 1,
        "routed_scaling_factor": 16.0,
        "rope_scaling": {"type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.707},
    },
    "deepseek_v3": {
        **COMMON,
        "model_type": "deepseek_v3",
        "q_lora_rank": 32,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "first_k_dense_replace": 1,
        "n_group": 4,
        "topk_group": 2,
        "rope_scaling": {"type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    },
}
ARCHS = list(CONFIGS)


def build(name: str, *, seed: int = 0, **overrides: Any) -> nn.Module:
    config = {**copy.deepcopy(CONFIGS[name]), **overrides}
    model_cls, args_cls = get_model_classes(config["model_type"])
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    # Constant vectors (norms, biases) get random values: ones/zeros would hide misuse.
    params = [
        (k, v + 0.2 * mx.random.normal(v.shape) if v.ndim == 1 else v)
        for k, v in tree_flatten(model.parameters())
    ]
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    return model


def toks(shape: tuple[int, ...], seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, 128, size=shape))


def max_diff(a: mx.array, b: mx.array) -> float:
    return float(mx.max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32))).item())


def windows(model: nn.Module) -> list[int | None]:
    """Each layer's sliding window (Llama-derived stacks record them)."""
    stack = getattr(model, "model", None)
    return list(getattr(stack, "windows", None) or [None] * len(model.layers))


def rel_diff(a: mx.array, b: mx.array) -> float:
    return max_diff(a, b) / float(mx.max(mx.abs(b)).item())


def to_numpy(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32), dtype=np.float64)
