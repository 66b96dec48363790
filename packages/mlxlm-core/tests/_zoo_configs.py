"""Tiny configs of every architecture core implements, for its unit tests (pure data).

Three groups, kept as they were written: the first models (Llama, Mistral, Qwen, Mixtral),
zoo A (Gemma, Phi, StarCoder2, GPT-2, GPT-NeoX, Cohere) and zoo B (Qwen2-MoE, OLMo, Granite,
MiniCPM, InternLM, EXAONE, GLM, ERNIE, SmolLM3, DeepSeek). Each config keeps the features
that distinguish its family switched on. Below them, the few per-architecture settings of
the generic tests in test_models.py, each with the reason one value cannot serve all.
"""

from __future__ import annotations

from typing import Any

# -- Llama, Mistral, Qwen 2/3, Qwen3-MoE, Mixtral ---------------------------------------------

LLAMA_COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,  # quantized KV caches need groups of >= 32 along head_dim
    "rms_norm_eps": 1e-5,
    "vocab_size": 128,
    "rope_theta": 10000.0,
}
WINDOW = 6  # the sliding window of every windowed config below but OLMo 3's
CORE: dict[str, dict[str, Any]] = {
    "llama": {**LLAMA_COMMON, "model_type": "llama"},
    "mistral": {
        **LLAMA_COMMON,
        "model_type": "mistral",
        "sliding_window": WINDOW,
        "tie_word_embeddings": False,
    },
    "qwen2": {**LLAMA_COMMON, "model_type": "qwen2", "tie_word_embeddings": True},
    "qwen3": {**LLAMA_COMMON, "model_type": "qwen3"},
    "qwen3_moe": {
        **LLAMA_COMMON,
        "model_type": "qwen3_moe",
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
        "mlp_only_layers": [1],
        "moe_intermediate_size": 32,
    },
    "mixtral": {
        **LLAMA_COMMON,
        "model_type": "mixtral",
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
    },
}

# -- zoo A: Gemma, Phi, StarCoder2, GPT-2, GPT-NeoX, Cohere ------------------------------------

_A_COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "vocab_size": 128,
}
_A_LAYERNORM = {k: v for k, v in _A_COMMON.items() if k != "rms_norm_eps"}
ZOO_A: dict[str, dict[str, Any]] = {
    "gemma": {**_A_COMMON, "model_type": "gemma", "head_dim": 32},
    "gemma2": {
        **_A_COMMON,
        "model_type": "gemma2",
        "num_hidden_layers": 4,
        "head_dim": 32,
        "query_pre_attn_scalar": 24,
        "attn_logit_softcapping": 10.0,
        "final_logit_softcapping": 5.0,
        "sliding_window": WINDOW,
    },
    "gemma3_text": {
        **_A_COMMON,
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
        **_A_COMMON,
        "model_type": "phi3",
        "sliding_window": WINDOW,
        "max_position_embeddings": 4096,
    },
    "phi3_longrope": {
        **_A_COMMON,
        "model_type": "phi3",
        "partial_rotary_factor": 0.75,
        "max_position_embeddings": 512,
        "original_max_position_embeddings": 64,
        "rope_scaling": {"type": "su", "long_factor": [1, 2, 3, 4, 5, 6], "short_factor": [1] * 6},
    },
    "phimoe": {
        **_A_COMMON,
        "model_type": "phimoe",
        "intermediate_size": 64,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "router_jitter_noise": 0.25,
        "attention_bias": True,
        "lm_head_bias": True,
    },
    "starcoder2": {
        **_A_LAYERNORM,
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
        **_A_LAYERNORM,
        "model_type": "cohere",
        "logit_scale": 0.8333,
        "use_qk_norm": True,
    },
}

# -- zoo B: Qwen2-MoE, OLMo 2/3, Granite, MiniCPM, InternLM 2/3, EXAONE, GLM 4, ERNIE 4.5,
# SmolLM3, DeepSeek V2/V3 ----------------------------------------------------------------------

B_COMMON: dict[str, Any] = {
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
ZOO_B: dict[str, dict[str, Any]] = {
    "qwen2_moe": {
        **B_COMMON,
        "model_type": "qwen2_moe",
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 96,
        "norm_topk_prob": True,
        "mlp_only_layers": [1],
    },
    "olmo2": {**B_COMMON, "model_type": "olmo2"},
    "olmo3": {**B_COMMON, "model_type": "olmo3", "num_hidden_layers": 4, "sliding_window": 5},
    "granite": {
        **B_COMMON,
        "model_type": "granite",
        "embedding_multiplier": 12.0,
        "logits_scaling": 8.0,
        "residual_multiplier": 0.22,
        "attention_multiplier": 0.015625,
    },
    "minicpm": {
        **B_COMMON,
        "model_type": "minicpm",
        "scale_emb": 12.0,
        "scale_depth": 1.4,
        "dim_model_base": 16,
    },
    "internlm2": {**B_COMMON, "model_type": "internlm2", "bias": True},
    "internlm3": {
        **B_COMMON,
        "model_type": "internlm3",
        "head_dim": 16,
        "qkv_bias": True,  # o_proj and MLP unbiased (bias: False)
        "bias": False,
    },
    "exaone": {**B_COMMON, "model_type": "exaone", "attention_bias": True, "mlp_bias": True},
    "glm4": {**B_COMMON, "model_type": "glm4", "head_dim": 32},
    "glm4_moe": {
        **B_COMMON,
        "model_type": "glm4_moe",
        "head_dim": 32,
        "use_qk_norm": True,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "n_group": 2,
        "topk_group": 1,
    },
    "ernie4_5": {**B_COMMON, "model_type": "ernie4_5", "head_dim": 16, "use_bias": True},
    "smollm3": {**B_COMMON, "model_type": "smollm3", "no_rope_layer_interval": 2},
    "deepseek_v2": {
        **B_COMMON,
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
        **B_COMMON,
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

CONFIGS: dict[str, dict[str, Any]] = {**CORE, **ZOO_A, **ZOO_B}
ARCHS = list(CONFIGS)

# -- settings of the generic tests (test_models.py) that one value cannot serve ---------------

# Routers are scaled up before quantizing (decisive, as trained ones are, so that rounding
# does not swap experts): x10, but x3 for DeepSeek-V3, whose sigmoid scores x10 saturate
# into ties (and Mixtral x3 is not decisive enough: 5.6% off instead of 2.5%).
ROUTER_SCALE: dict[str, float] = {"deepseek_v3": 3.0}

# Overrides that leave one layer, windowed (WINDOW tokens), for the cropped-input test.
ONE_WINDOWED_LAYER: dict[str, dict[str, Any]] = {
    "mistral": {},
    "mixtral": {},
    "gemma2": {},
    "gemma3_text": {},
    "phi3": {},
    "starcoder2": {},
    "olmo3": {"layer_types": ["sliding_attention"]},
    "qwen2_moe": {"use_sliding_window": True, "max_window_layers": 0, "mlp_only_layers": []},
    "smollm3": {"use_sliding_window": True, "no_rope_layers": [0]},
}

# GLM-4.5's group-limited sigmoid routing over a random tiny router flips whole groups of
# experts when 8-bit keys move a score past a tie (on about a third of seeds, at any router
# scale: 10-46% off where the others stay under 1%): with 8-bit KV it is held to running,
# finite and of the right shape, not to the float logits.
KV_BITS_ROUTING_FLIPS: frozenset[str] = frozenset({"glm4_moe"})
