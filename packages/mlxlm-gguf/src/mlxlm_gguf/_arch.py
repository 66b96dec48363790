"""One table for both directions: which GGUF architecture each model type is, how tensors
are named on each side, and how llama.cpp lays out the rows of Q and K.

Import reads a GGUF name and asks for the Hugging Face one; export does the reverse with
the same dictionaries, so the two cannot drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from mlxlm_core import CheckpointError, UnsupportedError

# Block parts shared by every decoder here (GGUF part -> HF module under model.layers.N).
_COMMON = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# Gemma 2/3 put a norm before and after both the attention and the MLP.
_SANDWICH = _COMMON | {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Phi-3 keeps q/k/v and gate/up fused, as llama.cpp does.
_PHI3 = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_up": "mlp.gate_up_proj",
    "ffn_down": "mlp.down_proj",
}


def _moe(block: str) -> dict[str, str]:
    """Router and stacked experts, (E, out, in) on our side as in GGUF's `*_exps`."""
    return {
        "ffn_gate_inp": f"{block}.gate",
        "ffn_gate_exps": f"{block}.switch_mlp.gate_proj",
        "ffn_up_exps": f"{block}.switch_mlp.up_proj",
        "ffn_down_exps": f"{block}.switch_mlp.down_proj",
    }


GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# Tensors llama.cpp reads that are not parameters on our side (rope scaling tables).
NON_PARAMETERS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


@dataclass(frozen=True)
class ArchSpec:
    """How one of our model types is written as a llama.cpp architecture."""

    model_type: str
    gguf_arch: str
    # llama.cpp's "normal" rope rotates adjacent pairs (interleaved); its "neox" rope rotates
    # the two halves of a head as Hugging Face does. For interleaved architectures the
    # converter permutes Q/K rows so the same weights work with the other rope layout.
    rope_interleaved: bool
    blocks: Mapping[str, str]
    # Gemma stores RMSNorm scales as offsets from one; llama.cpp wants the scales themselves.
    norm_offset: float = 0.0
    _inverse: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_inverse", {v: k for k, v in self.blocks.items()})

    def is_norm(self, hf_path: str) -> bool:
        """Whether an HF parameter is an RMSNorm scale (what `norm_offset` applies to)."""
        return hf_path.endswith("norm.weight")

    @property
    def is_moe(self) -> bool:
        return "ffn_gate_exps" in self.blocks

    def hf_name(self, gguf_name: str) -> tuple[str, str]:
        """A GGUF tensor name as (HF module path, parameter), or UnsupportedError."""
        if m := _GGUF_BLOCK.match(gguf_name):
            layer, part, param = m.groups()
            if part in self.blocks:
                return f"model.layers.{layer}.{self.blocks[part]}", param
        elif (m := _GGUF_GLOBAL.match(gguf_name)) and m.group(1) in GLOBAL_NAMES:
            return GLOBAL_NAMES[m.group(1)], m.group(2)
        raise UnsupportedError(
            f"unexpected tensor {gguf_name!r} in a {self.gguf_arch} GGUF file "
            f"(read as {self.model_type})"
        )

    def gguf_name(self, hf_path: str) -> str:
        """An HF parameter path (``model.layers.3.self_attn.q_proj.weight``) in GGUF."""
        module, _, param = hf_path.rpartition(".")
        if m := _HF_BLOCK.match(module):
            layer, part = m.groups()
            if part in self._inverse:
                return f"blk.{layer}.{self._inverse[part]}.{param}"
        for gguf_part, hf_module in GLOBAL_NAMES.items():
            if module == hf_module:
                return f"{gguf_part}.{param}"
        raise UnsupportedError(
            f"{self.model_type} parameter {hf_path!r} has no llama.cpp {self.gguf_arch} tensor"
        )


_GGUF_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_GGUF_GLOBAL = re.compile(r"^([a-z_]+)\.(weight|bias)$")
_HF_BLOCK = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

ARCHS: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in (
        ArchSpec("llama", "llama", True, _COMMON),
        ArchSpec("mistral", "llama", True, _COMMON),
        ArchSpec("mixtral", "llama", True, _COMMON | _moe("block_sparse_moe")),
        ArchSpec("qwen2", "qwen2", False, _COMMON),
        ArchSpec("qwen3", "qwen3", False, _COMMON | _QK_NORM),
        ArchSpec("qwen3_moe", "qwen3moe", False, _COMMON | _QK_NORM | _moe("mlp")),
        ArchSpec("gemma", "gemma", False, _COMMON, norm_offset=1.0),
        ArchSpec("gemma2", "gemma2", False, _SANDWICH, norm_offset=1.0),
        ArchSpec("gemma3_text", "gemma3", False, _SANDWICH | _QK_NORM, norm_offset=1.0),
        ArchSpec("phi3", "phi3", False, _PHI3),
    )
}
GGUF_ARCHS = tuple(sorted({s.gguf_arch for s in ARCHS.values()}))


def spec_for_model_type(model_type: str) -> ArchSpec:
    spec = ARCHS.get(model_type)
    if spec is None:
        raise UnsupportedError(
            f"GGUF export of model type {model_type!r} is not supported "
            f"(supported: {', '.join(sorted(ARCHS))})"
        )
    return spec


def spec_for_gguf(arch: str, *, expert_count: int) -> ArchSpec:
    """Our model type for a GGUF file: llama with experts is Mixtral's layout."""
    if arch == "llama":
        return ARCHS["mixtral" if expert_count > 0 else "llama"]
    for spec in ARCHS.values():
        if spec.gguf_arch == arch:
            return spec
    raise UnsupportedError(
        f"GGUF architecture {arch or '(none)'!r} is not supported "
        f"(supported: {', '.join(GGUF_ARCHS)})"
    )


def qk_heads(part: str, *, n_heads: int, n_kv_heads: int) -> int | None:
    """How many rope heads a GGUF block part holds, for the parts whose rows are permuted."""
    return {"attn_q": n_heads, "attn_k": n_kv_heads}.get(part)


def permute_rows(a: np.ndarray, n_heads: int) -> np.ndarray:
    """Hugging Face row order of a Q or K projection -> llama.cpp's interleaved order.

    Within each head, row p*half + i moves to 2i + p: view the head's rows as (2, half) and
    transpose to (half, 2). Only whole rows move, so this applies unchanged to packed
    quantized weights, their scales and biases, and to bias vectors.
    """
    half = _half(a, n_heads)
    return a.reshape(n_heads, 2, half, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def unpermute_rows(a: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of :func:`permute_rows` (llama.cpp's order -> Hugging Face's)."""
    half = _half(a, n_heads)
    return a.reshape(n_heads, half, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def _half(a: np.ndarray, n_heads: int) -> int:
    rows = a.shape[0]
    if n_heads <= 0 or rows % (2 * n_heads):
        raise CheckpointError(f"cannot split {rows} rows into {n_heads} rope heads")
    return rows // n_heads // 2
