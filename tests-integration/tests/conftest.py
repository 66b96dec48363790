"""Shared fixtures: tiny random configs and models of every supported architecture.

The configs are small enough to build and run in milliseconds (2 layers, hidden 64, 4 query
heads over 2 KV heads, vocabulary 128, 4 experts) but keep every feature that distinguishes
the architectures switched on: biases, q/k norms, an explicit ``head_dim`` that differs from
``hidden / heads``, untied heads, dense layers among sparse ones, a sliding window.
"""

from __future__ import annotations

# First, before anything imports mlx.core: mlxlm_core puts the optimised BLAS under MLX at
# import (mlxlm_core._blas), and the tests should run on what users get.
import mlxlm_core  # noqa: F401

# isort: split

import copy
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten, tree_unflatten


def _register_helper(name: str, path: Path) -> None:
    """Make a helper module importable by ``name`` from the test modules.

    ``--import-mode=importlib`` keeps test folders off ``sys.path``; this conftest is imported
    before any test module of the folder, so registering here is enough.
    """
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules[name])


_HERE = Path(__file__).parent
for _name in ("_launch", "_parity", "_gguf_reference"):
    _register_helper(_name, _HERE / f"{_name}.py")
# the GGUF package's tiny-model builders, shared with its own tests
_register_helper(
    "mlxlm_gguf_test_builders", _HERE.parents[1] / "packages/mlxlm-gguf/tests/_builders.py"
)


_COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": 128,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
}

# name -> Hugging Face style config.json contents.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {**_COMMON, "model_type": "llama", "tie_word_embeddings": True},
    "mistral": {
        **_COMMON,
        "model_type": "mistral",
        "tie_word_embeddings": False,
        "rope_theta": 1_000_000.0,
        "sliding_window": 4096,
    },
    "qwen2": {**_COMMON, "model_type": "qwen2", "tie_word_embeddings": True},
    "qwen2_untied": {**_COMMON, "model_type": "qwen2", "tie_word_embeddings": False},
    "qwen3": {
        **_COMMON,
        "model_type": "qwen3",
        "head_dim": 32,  # != hidden_size / heads: q_proj is wider than the residual
        "tie_word_embeddings": True,
    },
    "qwen3_moe": {
        **_COMMON,
        "model_type": "qwen3_moe",
        "head_dim": 16,
        "tie_word_embeddings": False,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [1],  # layer 1 stays a dense MLP
        "moe_intermediate_size": 32,
    },
    "qwen3_moe_norm": {
        **_COMMON,
        "model_type": "qwen3_moe",
        "head_dim": 16,
        "tie_word_embeddings": True,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
        "decoder_sparse_step": 2,  # only layer 1 is sparse
        "mlp_only_layers": [],
        "moe_intermediate_size": 64,
    },
    "mixtral": {
        **_COMMON,
        "model_type": "mixtral",
        "tie_word_embeddings": False,
        "rope_theta": 1_000_000.0,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
    },
    # Gemma 1 (MQA, head_dim != hidden / heads). mlx-lm runs Gemma 1 with the exact GELU,
    # which transformers only uses when `hidden_activation` says so explicitly.
    "gemma": {
        **_COMMON,
        "model_type": "gemma",
        "num_key_value_heads": 1,
        "head_dim": 32,
        "rms_norm_eps": 1e-6,
        "hidden_activation": "gelu",
    },
    # Gemma 2: caps small enough to bend the scores/logits; mlx-lm's gemma2 never windows,
    # so the window (layers 0 and 2) is wider than the sequences compared with it.
    "gemma2": {
        **_COMMON,
        "model_type": "gemma2",
        "num_hidden_layers": 4,
        "head_dim": 32,
        "rms_norm_eps": 1e-6,
        "query_pre_attn_scalar": 24,
        "attn_logit_softcapping": 10.0,
        "final_logit_softcapping": 5.0,
        "sliding_window": 32,
    },
    # Gemma 3: layers 0, 1, 3 slide over 6 tokens with the local rope base, layer 2 is
    # global with linear-scaled rope.
    "gemma3_text": {
        **_COMMON,
        "model_type": "gemma3_text",
        "num_hidden_layers": 4,
        "head_dim": 32,
        "rms_norm_eps": 1e-6,
        "query_pre_attn_scalar": 24,
        "sliding_window": 6,
        "sliding_window_pattern": 3,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
    },
    "phi3": {**_COMMON, "model_type": "phi3", "tie_word_embeddings": False},
    # Phi-4-mini's shape: rope over 3/4 of each head (12 of 16 dims), longrope factors
    # (a context 8x the original one), tied head.
    "phi3_longrope": {
        **_COMMON,
        "model_type": "phi3",
        "tie_word_embeddings": True,
        "partial_rotary_factor": 0.75,
        "max_position_embeddings": 512,
        "original_max_position_embeddings": 64,
        "rope_scaling": {
            "type": "longrope",
            "long_factor": [1.0, 1.3, 1.9, 2.8, 4.5, 7.0],
            "short_factor": [1.0, 1.0, 1.1, 1.2, 1.3, 1.5],
        },
    },
    # Phi-3.5-MoE's shape: biased attention and head, LayerNorms, longrope with mscale, and
    # a jitter band wide enough that the sparsemixer's masked softmax matters.
    "phimoe": {
        **_COMMON,
        "model_type": "phimoe",
        "intermediate_size": 64,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "router_jitter_noise": 0.25,
        "attention_bias": True,
        "lm_head_bias": True,
        "tie_word_embeddings": False,
        "max_position_embeddings": 512,
        "rope_scaling": {
            "type": "longrope",
            "long_factor": [1.0, 1.2, 1.5, 2.0, 2.6, 3.3, 4.4, 6.0],
            "short_factor": [1.0] * 8,
            "long_mscale": 1.25,
            "short_mscale": 1.25,
            "original_max_position_embeddings": 64,
        },
    },
    # StarCoder2 (its configs name the LayerNorm epsilon norm_epsilon). mlx-lm runs it with
    # the exact GELU and no window, so the config asks for both: `gelu`, a window longer
    # than the compared sequences.
    "starcoder2": {
        **{k: v for k, v in _COMMON.items() if k != "rms_norm_eps"},
        "model_type": "starcoder2",
        "norm_epsilon": 1e-5,
        "use_bias": True,
        "hidden_act": "gelu",
        "rope_theta": 100000.0,
        "sliding_window": 32,
        "tie_word_embeddings": True,
    },
    "gpt2": {
        "model_type": "gpt2",
        "n_embd": 64,
        "n_head": 4,
        "n_layer": 2,
        "n_positions": 128,
        "n_ctx": 128,
        "layer_norm_epsilon": 1e-5,
        "vocab_size": 128,
        "activation_function": "gelu_new",
    },
    # Pythia's shape (rope over a quarter of each head, parallel residual). Pythia says
    # `gelu` (exact); mlx-lm's gpt_neox always runs the tanh approximation, so ask for it.
    "gpt_neox": {
        "model_type": "gpt_neox",
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "intermediate_size": 256,
        "max_position_embeddings": 128,
        "layer_norm_eps": 1e-5,
        "vocab_size": 128,
        "rotary_emb_base": 10000,
        "rotary_pct": 0.25,
        "use_parallel_residual": True,
        "hidden_act": "gelu_new",
        "tie_word_embeddings": False,
    },
    "gpt_neox_sequential": {
        "model_type": "gpt_neox",
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "intermediate_size": 256,
        "max_position_embeddings": 128,
        "layer_norm_eps": 1e-5,
        "vocab_size": 128,
        "rotary_emb_base": 5000,
        "rotary_pct": 0.5,
        "use_parallel_residual": False,
        "hidden_act": "gelu_new",
        "tie_word_embeddings": False,
    },
    # Command-R (v01's 0.0625 logit scale) and Command-R+ (per-head q/k LayerNorms).
    "cohere": {
        **{k: v for k, v in _COMMON.items() if k != "rms_norm_eps"},
        "model_type": "cohere",
        "layer_norm_eps": 1e-5,
        "logit_scale": 0.0625,
        "use_qk_norm": False,
    },
    "cohere_qk_norm": {
        **{k: v for k, v in _COMMON.items() if k != "rms_norm_eps"},
        "model_type": "cohere",
        "layer_norm_eps": 1e-5,
        "logit_scale": 0.8333,
        "rope_theta": 75_000_000.0,
        "use_qk_norm": True,
    },
}

# Further families, each shaped like its real config (small widths, few layers).
_MORE_FAMILIES: dict[str, dict[str, Any]] = {
    "qwen2_moe": {
        **_COMMON,
        "model_type": "qwen2_moe",
        "tie_word_embeddings": False,
        "rope_theta": 1_000_000.0,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 96,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    },
    "olmo2": {
        **_COMMON,
        "model_type": "olmo2",
        "num_key_value_heads": 4,  # OLMo 2 uses full multi-head attention
        "rms_norm_eps": 1e-6,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
    },
    "granite": {
        **_COMMON,
        "model_type": "granite",
        "tie_word_embeddings": True,
        "rope_theta": 5_000_000.0,
        "attention_bias": False,
        "mlp_bias": False,
        # granite-3.1-2b's multipliers
        "embedding_multiplier": 12.0,
        "logits_scaling": 8.0,
        "residual_multiplier": 0.22,
        "attention_multiplier": 0.015625,
    },
    "minicpm": {
        **_COMMON,
        "model_type": "minicpm",
        "num_key_value_heads": 4,
        "tie_word_embeddings": False,
        "scale_emb": 12.0,
        "scale_depth": 1.4,
        "dim_model_base": 16,
    },
    "minicpm_tied": {
        **_COMMON,
        "model_type": "minicpm",
        "tie_word_embeddings": True,
        "scale_emb": 12.0,
        "scale_depth": 1.4,
        "dim_model_base": 16,
    },
    "internlm2": {
        **_COMMON,
        "model_type": "internlm2",
        "bias": True,  # real configs say False; True also checks where biases load
        "rope_theta": 1_000_000.0,
        # InternLM2.5's dynamic NTK rope; a short trained length so decoding passes it
        "rope_scaling": {"type": "dynamic", "factor": 2.0},
        "max_position_embeddings": 24,
        "tie_word_embeddings": False,
    },
    "exaone": {
        # EXAONE 3.5's own config keys (num_layers, layer_norm_epsilon), llama3 rope scaling
        **{k: v for k, v in _COMMON.items() if k not in ("num_hidden_layers", "rms_norm_eps")},
        "model_type": "exaone",
        "num_layers": 2,
        "layer_norm_epsilon": 1e-5,
        "rope_theta": 1_000_000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        "tie_word_embeddings": True,
    },
    "glm4": {
        **_COMMON,
        "model_type": "glm4",
        "head_dim": 32,  # GLM-4-9B-0414: head_dim 128 over hidden 4096 with 32 heads
        "attention_bias": True,
        "partial_rotary_factor": 0.5,
        "rms_norm_eps": 1e-5,
    },
    "ernie4_5": {
        **_COMMON,
        "model_type": "ernie4_5",
        "head_dim": 16,
        "use_bias": True,  # ERNIE-4.5-0.3B says False; True also checks where biases load
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
    },
    "smollm3": {
        **_COMMON,
        "model_type": "smollm3",
        "num_hidden_layers": 4,  # the fourth block is NoPE
        "rope_theta": 5_000_000.0,
        "no_rope_layer_interval": 4,
        "tie_word_embeddings": True,
    },
    "deepseek_v2": {
        # DeepSeek-V2-Lite's shape: no query compression, greedy routing, yarn rope
        **_COMMON,
        "model_type": "deepseek_v2",
        "num_key_value_heads": 4,
        "q_lora_rank": None,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 16,
        "n_routed_experts": 8,
        "n_shared_experts": 2,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "first_k_dense_replace": 1,
        "topk_method": "greedy",
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 1.0,
        "rope_scaling": {
            "type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
        "tie_word_embeddings": False,
    },
    "deepseek_v2_grouped": {
        # DeepSeek-V2's shape: compressed queries, group-limited routing, scaled weights;
        # mscale != mscale_all_dim so the rope's input scale is not 1
        **_COMMON,
        "model_type": "deepseek_v2",
        "num_key_value_heads": 4,
        "q_lora_rank": 32,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "n_routed_experts": 8,
        "n_shared_experts": 2,
        "num_experts_per_tok": 3,
        "moe_intermediate_size": 32,
        "first_k_dense_replace": 1,
        "topk_method": "group_limited_greedy",
        "n_group": 2,  # fewer kept groups than chosen experts: the limit binds
        "topk_group": 1,
        "routed_scaling_factor": 16.0,
        "rope_scaling": {
            "type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "mscale": 1.0,
            "mscale_all_dim": 0.707,
        },
        "tie_word_embeddings": False,
    },
    "deepseek_v3": {
        # DeepSeek-V3's shape: sigmoid routing with correction bias in 4 groups
        **_COMMON,
        "model_type": "deepseek_v3",
        "num_key_value_heads": 4,
        "q_lora_rank": 32,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 16,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "first_k_dense_replace": 1,
        "topk_method": "noaux_tc",
        "n_group": 4,
        "topk_group": 2,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "rope_scaling": {
            "type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        "tie_word_embeddings": False,
    },
    "internlm3": {
        **_COMMON,
        "model_type": "internlm3",
        "head_dim": 16,
        "bias": True,  # InternLM3-8B says False for both; True also checks where biases load
        "qkv_bias": True,
        "rope_theta": 50_000_000.0,
        "tie_word_embeddings": False,
    },
    "glm4_moe": {
        # GLM-4.5's shape: partial rope, q/k norms, sigmoid-routed experts + a shared one
        **_COMMON,
        "model_type": "glm4_moe",
        "head_dim": 32,
        "partial_rotary_factor": 0.5,
        "use_qk_norm": True,
        "attention_bias": True,
        "rope_scaling": None,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "first_k_dense_replace": 1,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "tie_word_embeddings": False,
    },
    "olmo3": {
        # OLMo 3's layout: three sliding-window blocks, then a full one with yarn rope
        **_COMMON,
        "model_type": "olmo3",
        "num_hidden_layers": 4,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-6,
        "rope_theta": 500000.0,
        "sliding_window": 6,
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 64,
            "beta_fast": 32,
            "beta_slow": 1,
        },
        "tie_word_embeddings": False,
    },
}
TINY_CONFIGS.update(_MORE_FAMILIES)


def randomize(model: nn.Module, *, seed: int) -> nn.Module:
    """Give norms and biases random values too, so a dropped or misplaced one shows.

    Fresh modules have unit norms and zero biases, which would hide a norm applied to the
    wrong axis or a bias never loaded. Matrices keep their fan-in scaled initialisation.
    """
    mx.random.seed(seed)
    params = []
    for name, value in tree_flatten(model.parameters()):
        if name.endswith("norm.weight"):
            value = 1.0 + 0.2 * mx.random.normal(value.shape)
        elif name.endswith(".bias"):
            value = 0.2 * mx.random.normal(value.shape)
        else:
            value = mx.random.normal(value.shape) * mx.std(value) if value.ndim > 1 else value
        params.append((name, value.astype(mx.float32)))
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    return model


def build_tiny(name: str, *, seed: int = 0) -> nn.Module:
    """Our model for ``TINY_CONFIGS[name]``, float32, with random parameters."""
    from mlxlm_core.models import get_model_classes

    config = copy.deepcopy(TINY_CONFIGS[name])
    model_cls, args_cls = get_model_classes(config["model_type"])
    return randomize(model_cls(args_cls.from_dict(config)), seed=seed)


@pytest.fixture(scope="session")
def tiny_config() -> Callable[[str], dict[str, Any]]:
    """``tiny_config(name)``: a fresh copy of a tiny config dict."""
    return lambda name: copy.deepcopy(TINY_CONFIGS[name])


@pytest.fixture(scope="session")
def tiny_model() -> Callable[..., nn.Module]:
    """``tiny_model(name, seed=0)``: our float32 model with random parameters."""
    return build_tiny
