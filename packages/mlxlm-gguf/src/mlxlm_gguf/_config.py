"""GGUF metadata → a Hugging Face style `config.json` dictionary (import direction)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from mlxlm_core import CheckpointError, UnsupportedError

from ._arch import ArchSpec
from ._reader import GGUFFile

_HF_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}


def _required(f: GGUFFile, suffix: str) -> Any:
    value = f.arch_key(suffix)
    if value is None:
        raise CheckpointError(f"{f.path}: missing metadata key {f.architecture}.{suffix}")
    return value


def _one_value(f: GGUFFile, suffix: str, value: Any) -> int:
    """Some GGUF files store per-layer arrays; we support them only when uniform."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise UnsupportedError(f"per-layer {f.architecture}.{suffix} values are not supported")
        value = value[0]
    return int(value)


def fit_llama3_rope(
    factors: np.ndarray, *, base: float, dims: int
) -> dict[str, float | int | str] | None:
    """Recover Hugging Face's "llama3" rope parameters from llama.cpp's `rope_freqs`.

    llama.cpp stores one divisor per frequency instead of the four numbers HF uses. For a
    frequency of wavelength w the divisor is 1 (short wavelengths), `factor` (long ones)
    or, between the two, 1 / ((1 - s) / factor + s) with s = a / w - b, where
    a = L / (hi - lo) and b = lo / (hi - lo) for HF's original context L, low factor lo
    and high factor hi. HF's formula depends on (L, lo, hi) only through a and b, so we fit
    a and b on the middle band, fix lo = 1, and check the result reproduces every divisor.
    Returns None when the divisors do not follow that shape.
    """
    factors = np.asarray(factors, dtype=np.float64)
    wavelens = 2 * math.pi * base ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
    if factors.shape != wavelens.shape:
        return None
    factor = float(factors.max())
    if factor <= 1.0:
        return None
    middle = (factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4))
    if middle.sum() < 2:
        return None
    s = (1 / factors[middle] - 1 / factor) / (1 - 1 / factor)
    a, neg_b = np.polyfit(1 / wavelens[middle], s, 1)
    b = -neg_b
    if a <= 0 or b <= 0:
        return None
    params = {
        "rope_type": "llama3",
        "factor": float(np.float32(factor)),
        "low_freq_factor": 1.0,
        "high_freq_factor": float(round(1 + 1 / b, 4)),
        "original_max_position_embeddings": round(a / b),
    }
    if not np.allclose(llama3_rope_divisors(params, base=base, dims=dims), factors, rtol=1e-3):
        return None
    return params


def llama3_rope_divisors(params: dict[str, Any], *, base: float, dims: int) -> np.ndarray:
    """The per-frequency divisors HF's llama3 rope applies (used to verify a fit)."""
    factor = params["factor"]
    lo, hi = params["low_freq_factor"], params["high_freq_factor"]
    old = params["original_max_position_embeddings"]
    wavelens = 2 * math.pi * base ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
    smooth = (old / wavelens - lo) / (hi - lo)
    out = 1 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelens < old / hi, 1.0, out)
    return np.where(wavelens > old / lo, factor, out)


def _rope_scaling(
    f: GGUFFile, rope_freqs: np.ndarray | None, *, base: float, dims: int
) -> dict[str, Any] | None:
    kind = f.arch_key("rope.scaling.type")
    factor = f.arch_key("rope.scaling.factor")
    if kind is None and f.arch_key("rope.scale_linear") is not None:
        kind, factor = "linear", f.arch_key("rope.scale_linear")
    if rope_freqs is not None:
        fitted = fit_llama3_rope(rope_freqs, base=base, dims=dims)
        if fitted is None:
            raise UnsupportedError("rope_freqs tensor does not follow llama3 rope scaling")
        return fitted
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        params: dict[str, Any] = {"rope_type": "yarn", "factor": float(factor)}
        orig = f.arch_key("rope.scaling.original_context_length")
        if orig is not None:
            params["original_max_position_embeddings"] = int(orig)
        for suffix, key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if (value := f.arch_key(f"rope.scaling.{suffix}")) is not None:
                params[key] = float(value)
        return params
    raise UnsupportedError(f"rope scaling type {kind!r} is not supported")


def _moe_fields(f: GGUFFile, spec: ArchSpec) -> dict[str, Any]:
    experts = int(f.arch_key("expert_count", 0) or 0)
    used = _one_value(f, "expert_used_count", f.arch_key("expert_used_count", 0) or 0)
    if not 0 < used <= experts:
        raise CheckpointError(
            f"{f.path}: {experts} experts with {used} used per token is not a valid MoE"
        )
    if spec.model_type == "mixtral":
        return {"num_local_experts": experts, "num_experts_per_tok": used}
    ffn = f.arch_key("expert_feed_forward_length")
    if ffn is None:
        raise CheckpointError(f"{f.path}: missing {f.architecture}.expert_feed_forward_length")
    # llama.cpp's qwen3moe routes through every layer and always renormalizes the top-k.
    return {
        "num_experts": experts,
        "num_experts_per_tok": used,
        "moe_intermediate_size": _one_value(f, "expert_feed_forward_length", ffn),
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    }


def build_config(
    f: GGUFFile,
    *,
    spec: ArchSpec,
    tensor_names: set[str],
    vocab_size: int,
    rope_tables: dict[str, np.ndarray],
) -> dict[str, Any]:
    """The model part of config.json (quantization and import notes are added later).

    `rope_tables`: the rope tensors of the file (`rope_freqs`, `rope_factors_long/short`).
    """
    rope_freqs = rope_tables.get("rope_freqs.weight")
    hidden = int(_required(f, "embedding_length"))
    heads = _one_value(f, "attention.head_count", _required(f, "attention.head_count"))
    kv_heads = _one_value(
        f, "attention.head_count_kv", f.arch_key("attention.head_count_kv", heads)
    )
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
        raise CheckpointError(f"{f.path}: {heads} heads cannot share {kv_heads} KV heads")
    head_dim = int(f.arch_key("attention.key_length", hidden // heads))
    value_dim = int(f.arch_key("attention.value_length", head_dim))
    if value_dim != head_dim:
        raise UnsupportedError(f"key length {head_dim} != value length {value_dim}")
    rope_dims = int(f.arch_key("rope.dimension_count", head_dim))
    if rope_dims != head_dim and spec.model_type != "phi3":
        raise UnsupportedError(
            f"partial rotary embeddings ({rope_dims} of {head_dim}) are not supported"
        )
    rope_theta = float(f.arch_key("rope.freq_base", 10000.0))
    ffn = f.arch_key("feed_forward_length")
    if ffn is None and not spec.is_moe:
        raise CheckpointError(
            f"{f.path}: missing metadata key {f.architecture}.feed_forward_length"
        )
    config: dict[str, Any] = {
        "architectures": [_HF_CLASSES[spec.model_type]],
        "model_type": spec.model_type,
        "hidden_size": hidden,
        "num_hidden_layers": int(_required(f, "block_count")),
        "intermediate_size": _one_value(f, "feed_forward_length", ffn) if ffn is not None else 0,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(_required(f, "attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,
        "max_position_embeddings": int(f.arch_key("context_length", 2048)),
        "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    if spec.gguf_arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
        config["mlp_bias"] = "blk.0.ffn_up.bias" in tensor_names
    if spec.is_moe:
        config |= _moe_fields(f, spec)
    if config["num_hidden_layers"] <= 0 or hidden <= 0 or vocab_size <= 0:
        raise CheckpointError(f"{f.path}: non-positive model dimensions in the metadata")
    if spec.model_type.startswith("gemma"):
        config |= _gemma_fields(f, spec, config)
    elif spec.model_type == "phi3":
        config |= _phi3_fields(f, config, rope_dims=rope_dims, rope_tables=rope_tables)
    scaling = _rope_scaling(f, rope_freqs, base=rope_theta, dims=rope_dims)
    if scaling is not None and "rope_scaling" not in config:
        config["rope_scaling"] = scaling
    for key, name in (
        ("bos", "bos_token_id"),
        ("eos", "eos_token_id"),
        ("padding", "pad_token_id"),
    ):
        value = f.get(f"tokenizer.ggml.{key}_token_id")
        if value is not None:
            config[name] = int(value)
    return config


def _gemma_fields(f: GGUFFile, spec: ArchSpec, config: dict[str, Any]) -> dict[str, Any]:
    """Gemma settings llama.cpp implies rather than stores (see `_metadata._gemma`)."""
    out: dict[str, Any] = {"hidden_act": "gelu_pytorch_tanh"}
    if spec.model_type in ("gemma", "gemma2"):
        out["tie_word_embeddings"] = True  # llama.cpp reads the head from token_embd
    if spec.model_type == "gemma":
        return out
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    big = layers == (46 if spec.model_type == "gemma2" else 62)
    out["query_pre_attn_scalar"] = config["hidden_size"] // heads if big else config["head_dim"]
    final = f.arch_key("final_logit_softcapping")
    out["final_logit_softcapping"] = float(final) if final else None
    if spec.model_type == "gemma2":
        out["attn_logit_softcapping"] = float(f.arch_key("attn_logit_softcapping", 50.0))
    else:
        out["attn_logit_softcapping"] = None
        out["rope_local_base_freq"] = float(f.arch_key("rope.freq_base_swa", 10000.0))
    window = f.arch_key("attention.sliding_window", 4096 if spec.model_type == "gemma2" else None)
    if not window:
        out["sliding_window"] = None
        return out
    pattern = f.arch_key(
        "attention.sliding_window_pattern", 2 if spec.model_type == "gemma2" else 6
    )
    if isinstance(pattern, list):
        sliding = [bool(p) for p in pattern][:layers]
    else:
        n = int(pattern)
        sliding = [n == 0 or i % n < n - 1 for i in range(layers)]
    out["sliding_window"] = int(window)
    out["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
    return out


def _phi3_fields(
    f: GGUFFile, config: dict[str, Any], *, rope_dims: int, rope_tables: dict[str, np.ndarray]
) -> dict[str, Any]:
    out: dict[str, Any] = {"partial_rotary_factor": rope_dims / config["head_dim"]}
    long, short = (rope_tables.get(f"rope_factors_{k}.weight") for k in ("long", "short"))
    if long is not None and short is not None:
        orig = int(f.arch_key("rope.scaling.original_context_length", 4096))
        out["original_max_position_embeddings"] = orig
        out["rope_scaling"] = {
            "rope_type": "longrope",
            "long_factor": [float(x) for x in long],
            "short_factor": [float(x) for x in short],
            "original_max_position_embeddings": orig,
        }
        if (attn := f.arch_key("rope.scaling.attn_factor")) is not None:
            out["rope_scaling"]["attention_factor"] = float(attn)
    return out
