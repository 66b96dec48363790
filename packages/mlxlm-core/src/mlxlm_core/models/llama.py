"""Llama (also Mistral-style checkpoints and SmolLM): pre-norm decoder, GQA, SwiGLU MLP."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import mlx.core as mx
import mlx.nn as nn

from .._errors import UnsupportedError
from ..cache import CachePolicy, KVCache
from ._hf_config import apply_rope_parameters
from .base import BaseModelArgs, attention, default_caches, layer_masks, rope_offset
from .rope import make_rope
from .sharding import shard_attention_mlp


@dataclasses.dataclass
class ModelArgs(BaseModelArgs):
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    rms_norm_eps: float
    vocab_size: int
    head_dim: int | None = None
    num_key_value_heads: int | None = None
    max_position_embeddings: int | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    rope_traditional: bool = False
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = True
    sliding_window: int | None = None
    rope_parameters: dict[str, Any] | None = None
    layer_types: list[str] | None = None

    def __post_init__(self) -> None:
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        apply_rope_parameters(self)
        if self.layer_types and len(set(self.layer_types)) > 1:
            raise UnsupportedError("llama checkpoints that mix attention layer types")


class AttentionBase(nn.Module):
    """Heads, rope, cache and attention; subclasses own the projections.

    Checkpoints name and fuse their projections differently (``wqkv``, ``out_proj``, norms
    over whole projections); :meth:`attend` is what they all share.
    """

    def __init__(self, args: ModelArgs, *, rope_dims: int | None = None):
        super().__init__()
        head_dim = args.head_dim
        assert head_dim is not None and args.num_key_value_heads is not None
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.softcap: float | None = None  # attention logit soft-capping (Gemma 2)
        self.rope = make_rope(
            rope_dims or head_dim,  # rope_dims < head_dim: partial rotary (GLM)
            base=args.rope_theta,
            traditional=args.rope_traditional,
            scaling=args.rope_scaling,
            max_position_embeddings=args.max_position_embeddings,
        )

    def attend(
        self, q: mx.array, k: mx.array, v: mx.array, mask: Any, cache: KVCache | None
    ) -> mx.array:
        """``(B, L, heads, head_dim)`` queries/keys/values -> ``(B, L, heads * head_dim)``."""
        batch, length = q.shape[:2]
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        offset = rope_offset(cache)
        q, k = self.rope(q, offset), self.rope(k, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = attention(q, k, v, cache=cache, scale=self.scale, mask=mask, softcap=self.softcap)
        return out.transpose(0, 2, 1, 3).reshape(batch, length, -1)


class Attention(AttentionBase):
    def __init__(
        self,
        args: ModelArgs,
        *,
        qk_norm: bool = False,
        bias: bool | None = None,
        rope_dims: int | None = None,
    ):
        super().__init__(args, rope_dims=rope_dims)
        dim, head_dim = args.hidden_size, self.head_dim
        qkv_bias = args.attention_bias if bias is None else bias
        self.q_proj = nn.Linear(dim, self.n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * head_dim, dim, bias=args.attention_bias)
        if qk_norm:
            # nn.Module-typed: families swap in their own norms (Gemma's, Cohere's).
            self.q_norm: nn.Module = nn.RMSNorm(head_dim, eps=args.rms_norm_eps)
            self.k_norm: nn.Module = nn.RMSNorm(head_dim, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: Any, cache: KVCache | None) -> mx.array:
        batch, length, _ = x.shape
        q = self.q_proj(x).reshape(batch, length, self.n_heads, -1)
        k = self.k_proj(x).reshape(batch, length, self.n_kv_heads, -1)
        v = self.v_proj(x).reshape(batch, length, self.n_kv_heads, -1)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.o_proj(self.attend(q, k, v, mask, cache))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, *, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(
        self, args: ModelArgs, *, attn: nn.Module | None = None, mlp: nn.Module | None = None
    ):
        super().__init__()
        # `is None`, not `or`: MLX modules are dicts, and an empty one is falsy.
        self.self_attn = Attention(args) if attn is None else attn
        self.mlp = (
            MLP(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
            if mlp is None
            else mlp
        )
        self.input_layernorm: nn.Module = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm: nn.Module = nn.RMSNorm(
            args.hidden_size, eps=args.rms_norm_eps
        )

    def __call__(self, x: mx.array, mask: Any, cache: KVCache | None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderStack(nn.Module):
    """Embeddings, the blocks and the final norm (``model.*`` in Hugging Face names)."""

    def __init__(
        self,
        args: ModelArgs,
        layers: list[nn.Module],
        *,
        windows: Sequence[int | None] | None = None,
    ):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = layers
        self.norm: nn.Module = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        # Each layer's sliding window (None: global); a tuple, so never taken for a parameter.
        self.windows: tuple[int | None, ...] = (
            tuple(windows) if windows is not None else (args.sliding_window,) * len(layers)
        )

    def embed(self, inputs: mx.array, input_embeddings: mx.array | None) -> mx.array:
        """Token embeddings, or the caller's (a hook for models that scale them)."""
        return input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)

    def __call__(
        self,
        inputs: mx.array,
        cache: Sequence[KVCache] | None = None,
        input_embeddings: mx.array | None = None,
    ) -> mx.array:
        h = self.embed(inputs, input_embeddings)
        caches: Sequence[KVCache | None] = cache if cache is not None else [None] * len(self.layers)
        masks = layer_masks(h.shape[1], caches, self.windows)
        for layer, layer_cache, mask in zip(self.layers, caches, masks):
            h = layer(h, mask, layer_cache)
        return self.norm(h)


class Model(nn.Module):
    model_type: ClassVar[str] = "llama"

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = DecoderStack(args, self.build_layers(args), windows=self.layer_windows(args))
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def build_layers(self, args: ModelArgs) -> list[nn.Module]:
        return [DecoderLayer(args) for _ in range(args.num_hidden_layers)]

    def layer_windows(self, args: ModelArgs) -> list[int | None]:
        """Each layer's sliding window (None: global attention); one for all by default."""
        return [args.sliding_window] * args.num_hidden_layers

    def __call__(
        self,
        inputs: mx.array,
        cache: Sequence[KVCache] | None = None,
        input_embeddings: mx.array | None = None,
    ) -> mx.array:
        h = self.model(inputs, cache, input_embeddings)
        if "lm_head" in self:
            return self.lm_head(h)
        return self.model.embed_tokens.as_linear(h)

    @property
    def layers(self) -> list[nn.Module]:
        return self.model.layers

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
        return weights

    def make_cache(
        self,
        policy: CachePolicy,
        *,
        batch_size: int = 1,
        left_padding: Sequence[int] | None = None,
    ) -> list[KVCache]:
        return default_caches(
            len(self.layers),
            policy,
            batch_size=batch_size,
            left_padding=left_padding,
            windows=self.model.windows,
        )

    def shard(self, group: mx.distributed.Group | None = None) -> None:
        shard_attention_mlp(self.layers, group)
