"""Model hyper-parameters -> the GGUF keys llama.cpp reads (export direction).

Everything llama.cpp's loader takes from the file for the architectures we write: sizes,
heads, head dimension, norm epsilon, rope base and scaling, context length, vocabulary
size and the expert counts. Models llama.cpp would run differently from us are refused
here, by name, rather than written and silently wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from mlxlm_core import UnsupportedError

from ._arch import ArchSpec
from ._config import llama3_rope_divisors


@dataclass
class HParams:
    keys: dict[str, Any]  # key suffix under the architecture prefix -> value
    extra_tensors: dict[str, np.ndarray] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    n_heads: int = 0
    n_kv_heads: int = 0


def _get(args: Any, name: str, default: Any = None) -> Any:
    value = getattr(args, name, default)
    return default if value is None else value


def _rope_scaling(args: Any, head_dim: int, hp: HParams) -> None:
    scaling = _get(args, "rope_scaling")
    if not scaling:
        return
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        hp.keys |= {"rope.scaling.type": "linear", "rope.scaling.factor": factor}
    elif kind == "llama3":
        # llama.cpp keeps Llama 3's scaling as a table of per-frequency divisors.
        params = {
            "factor": factor,
            "low_freq_factor": float(scaling.get("low_freq_factor", 1.0)),
            "high_freq_factor": float(scaling.get("high_freq_factor", 4.0)),
            "original_max_position_embeddings": int(
                scaling.get("original_max_position_embeddings", 8192)
            ),
        }
        divisors = llama3_rope_divisors(params, base=float(args.rope_theta), dims=head_dim)
        hp.extra_tensors["rope_freqs.weight"] = divisors.astype(np.float32)
    elif kind == "yarn":
        hp.keys |= {"rope.scaling.type": "yarn", "rope.scaling.factor": factor}
        if (orig := scaling.get("original_max_position_embeddings")) is not None:
            hp.keys["rope.scaling.original_context_length"] = int(orig)
        for hf_key, suffix in (("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow")):
            if scaling.get(hf_key) is not None:
                hp.keys[f"rope.scaling.{suffix}"] = float(scaling[hf_key])
        if scaling.get("mscale") not in (None, 1) or scaling.get("mscale_all_dim") not in (None, 0):
            raise UnsupportedError("yarn rope scaling with mscale settings has no GGUF form")
    else:
        raise UnsupportedError(f"rope scaling {kind!r} has no llama.cpp equivalent")


def hyperparameters(args: Any, spec: ArchSpec, *, vocab_size: int) -> HParams:
    """The `{arch}.*` keys (and rope tables) describing a model with these arguments."""
    heads = int(args.num_attention_heads)
    kv_heads = int(_get(args, "num_key_value_heads", heads))
    hidden = int(args.hidden_size)
    head_dim = int(_get(args, "head_dim", hidden // heads))
    context = int(_get(args, "max_position_embeddings", 2048))
    hp = HParams(keys={}, n_heads=heads, n_kv_heads=kv_heads)
    hp.keys |= {
        "context_length": context,
        "embedding_length": hidden,
        "block_count": int(args.num_hidden_layers),
        "feed_forward_length": int(args.intermediate_size),
        "attention.head_count": heads,
        "attention.head_count_kv": kv_heads,
        "attention.key_length": head_dim,
        "attention.value_length": head_dim,
        "attention.layer_norm_rms_epsilon": float(args.rms_norm_eps),
        "rope.dimension_count": head_dim,
        "rope.freq_base": float(_get(args, "rope_theta", 10000.0)),
        "vocab_size": vocab_size,
    }
    _rope_scaling(args, head_dim, hp)
    window = _get(args, "sliding_window")
    if window is not None and window < context:
        hp.notes.append(
            f"sliding window {window}: llama.cpp's {spec.gguf_arch} attends to the whole "
            "context, so outputs differ once a sequence is longer than the window"
        )
    if spec.model_type == "qwen2" and heads * head_dim != hidden:
        raise UnsupportedError("llama.cpp's qwen2 needs heads * head_dim == hidden_size")
    if spec.model_type == "mixtral":
        hp.keys |= {
            "expert_count": int(args.num_local_experts),
            "expert_used_count": int(args.num_experts_per_tok),
        }
    elif spec.model_type == "qwen3_moe":
        layers = int(args.num_hidden_layers)
        dense = [i for i in range(layers) if not args.is_sparse(i)]
        if dense:
            raise UnsupportedError(
                f"llama.cpp's qwen3moe has experts in every layer; layers {dense} are dense"
            )
        if not args.norm_topk_prob:
            raise UnsupportedError(
                "llama.cpp's qwen3moe always renormalizes the chosen experts' weights; "
                "this model has norm_topk_prob=false"
            )
        hp.keys |= {
            "expert_count": int(args.num_experts),
            "expert_used_count": int(args.num_experts_per_tok),
            "expert_feed_forward_length": int(args.moe_intermediate_size),
        }
    return hp
