"""Model hyper-parameters -> the GGUF keys llama.cpp reads (export direction).

Everything llama.cpp's loader takes from the file for the architectures we write: sizes,
heads, head dimension, norm epsilon, rope base and scaling, context length, vocabulary
size and the expert counts. Models llama.cpp would run differently from us are refused
here, by name, rather than written and silently wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
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


def _rope_scaling(args: Any, spec: ArchSpec, head_dim: int, hp: HParams) -> None:
    scaling = _get(args, "rope_scaling")
    if not scaling:
        return
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default" or (kind == "longrope" and spec.model_type == "phi3"):
        return  # phi3's longrope is written by _phi3
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
        # llama.cpp reads no yarn betas for these architectures: it always uses 32 and 1.
        for key, default in (("beta_fast", 32.0), ("beta_slow", 1.0)):
            if scaling.get(key) is not None and float(scaling[key]) != default:
                raise UnsupportedError(
                    f"yarn {key}={scaling[key]}: llama.cpp's {spec.gguf_arch} always uses {default:g}"
                )
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
    _rope_scaling(args, spec, head_dim, hp)
    window = _get(args, "sliding_window")
    if window is not None and window < context and not spec.model_type.startswith("gemma"):
        hp.notes.append(
            f"sliding window {window}: llama.cpp's {spec.gguf_arch} attends to the whole "
            "context, so outputs differ once a sequence is longer than the window"
        )
    if spec.model_type in ("qwen2", "phi3") and heads * head_dim != hidden:
        raise UnsupportedError(
            f"llama.cpp's {spec.gguf_arch} needs heads * head_dim == hidden_size"
        )
    if spec.model_type.startswith("gemma"):
        _gemma(args, spec, hp, head_dim=head_dim, context=context)
    elif spec.model_type == "phi3":
        _phi3(args, hp)
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


def _activation(args: Any) -> str:
    name = getattr(args, "activation_name", None) or _get(args, "hidden_act", "silu")
    return str(name)


def _swa_pattern(args: Any) -> int:
    """llama.cpp's `sliding_window_pattern` n (layer i slides iff i % n < n - 1) for us."""
    sliding = [args.is_sliding(i) for i in range(int(args.num_hidden_layers))]
    if all(sliding):
        return 0
    for n in range(1, len(sliding) + 1):
        if sliding == [i % n < n - 1 for i in range(len(sliding))]:
            return n
    raise UnsupportedError(
        "this model's mix of sliding-window and global layers has no llama.cpp pattern"
    )


def _gemma(args: Any, spec: ArchSpec, hp: HParams, *, head_dim: int, context: int) -> None:
    if _activation(args) not in ("gelu_pytorch_tanh", "gelu_new"):
        raise UnsupportedError(
            f"llama.cpp's {spec.gguf_arch} uses tanh-approximated GELU, not {_activation(args)}"
        )
    if spec.model_type in ("gemma", "gemma2") and not args.tie_word_embeddings:
        raise UnsupportedError(f"llama.cpp's {spec.gguf_arch} always ties the output head")
    if spec.model_type == "gemma":
        return
    # llama.cpp scales queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 27B shapes
    # (46 layers for Gemma 2, 62 for Gemma 3); a model saying otherwise would run differently.
    big = int(args.num_hidden_layers) == (46 if spec.model_type == "gemma2" else 62)
    expected = args.hidden_size // args.num_attention_heads if big else head_dim
    if float(args.query_pre_attn_scalar) != float(expected):
        raise UnsupportedError(
            f"llama.cpp's {spec.gguf_arch} scales queries by 1/sqrt({expected}); this model "
            f"uses query_pre_attn_scalar={args.query_pre_attn_scalar}"
        )
    attn_cap, final_cap = args.attn_logit_softcapping, args.final_logit_softcapping
    if spec.model_type == "gemma2":
        if attn_cap is None or final_cap is None:
            raise UnsupportedError("llama.cpp's gemma2 always soft-caps attention and logits")
        hp.keys["attn_logit_softcapping"] = float(attn_cap)
    elif attn_cap is not None:
        raise UnsupportedError("llama.cpp's gemma3 has no attention soft-capping")
    if final_cap is not None:
        hp.keys["final_logit_softcapping"] = float(final_cap)
    window = _get(args, "sliding_window")
    if window is not None:
        hp.keys["attention.sliding_window"] = int(window)
        hp.keys["attention.sliding_window_pattern"] = _swa_pattern(args)
    elif spec.model_type == "gemma2":
        # llama.cpp's gemma2 always slides; a window as long as the context never binds.
        hp.keys["attention.sliding_window"] = context
    if spec.model_type == "gemma3_text":
        hp.keys["rope.freq_base_swa"] = float(args.rope_local_base_freq)
        exact = float(np.sqrt(np.float32(args.hidden_size)))
        rounded = float(np.array(mx.array(exact, dtype=mx.bfloat16).astype(mx.float32)))
        if rounded != exact:
            hp.notes.append(
                f"llama.cpp scales gemma3 embeddings by sqrt(hidden) = {exact:.6g}; this "
                f"model (as trained) by its bfloat16 rounding {rounded:.6g}"
            )


def _phi3(args: Any, hp: HParams) -> None:
    if _activation(args) != "silu":
        raise UnsupportedError(f"llama.cpp's phi3 uses SiLU, not {_activation(args)}")
    hp.keys["rope.dimension_count"] = int(args.rope_dims)
    scaling = args.rope_scaling
    if scaling and scaling.get("rope_type") == "longrope":
        hp.keys.pop("rope.scaling.type", None)
        orig = int(scaling["original_max_position_embeddings"])
        hp.keys["rope.scaling.original_context_length"] = orig
        factor = (args.max_position_embeddings or orig) / orig
        attn = scaling.get("attention_factor")
        if attn is None:
            attn = 1.0 if factor <= 1 else float(np.sqrt(1 + np.log(factor) / np.log(orig)))
        hp.keys["rope.scaling.attn_factor"] = float(attn)
        for kind in ("long", "short"):
            values = np.asarray(scaling[f"{kind}_factor"], dtype=np.float32)
            hp.extra_tensors[f"rope_factors_{kind}.weight"] = values
        hp.notes.append(
            "longrope: llama.cpp uses the short factors while the context fits the original "
            f"length ({orig}); mlxlm always uses the long ones"
        )
