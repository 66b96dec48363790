"""GPT-NeoX (Pythia, GPT-NeoX-20B, RedPajama-INCITE, StableLM-alpha): attention and MLP in
parallel off one residual (``use_parallel_residual``), rope over the first ``rotary_pct`` of
each head, and one ``query_key_value`` projection laid out head by head
(``[q_0 k_0 v_0 q_1 k_1 v_1 ...]``).

Parameters live under ``model.`` as in MLX-LM (``model.h.N``, ``model.embed_in``,
``model.embed_out``); ``sanitize`` maps Hugging Face's ``gpt_neox.layers.N`` names there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import mlx.core as mx
import mlx.nn as nn

from .._errors import InvalidArgumentError
from ..cache import KVCache
from ._activations import activation
from ._blocks import GlobalLayerCaches, output_logits, run_layers, shard_heads
from ._hf_config import apply_rope_parameters
from .base import BaseModelArgs, attention, rope_offset
from .rope import make_rope
from .sharding import shard_projections

_BUFFERS = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")


@dataclasses.dataclass
class ModelArgs(BaseModelArgs):
    # Defaults are transformers' GPTNeoXConfig ones (older spellings of the rope fields).
    hidden_size: int = 6144
    num_hidden_layers: int = 44
    num_attention_heads: int = 64
    intermediate_size: int | None = None  # 4 * hidden_size
    vocab_size: int = 50432
    hidden_act: str = "gelu"
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    rotary_pct: float = 0.25
    rotary_emb_base: float = 10000.0
    rope_theta: float | None = None
    rope_scaling: dict[str, Any] | None = None
    rope_parameters: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.intermediate_size = self.intermediate_size or 4 * self.hidden_size
        # transformers >= 5 writes rope_parameters {rope_theta, partial_rotary_factor, ...}.
        apply_rope_parameters(self)
        if self.rope_theta is None:
            self.rope_theta = self.rotary_emb_base
        if self.rope_parameters and "partial_rotary_factor" in self.rope_parameters:
            self.rotary_pct = float(self.rope_parameters["partial_rotary_factor"])
        if self.hidden_size % self.num_attention_heads:
            raise InvalidArgumentError("hidden_size is not a multiple of num_attention_heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim = args.hidden_size
        self.n_heads = self.n_kv_heads = args.num_attention_heads
        self.head_dim = args.head_dim
        self.scale = self.head_dim**-0.5
        self.query_key_value = nn.Linear(dim, 3 * dim, bias=args.attention_bias)
        self.dense = nn.Linear(dim, dim, bias=args.attention_bias)
        assert args.rope_theta is not None
        self.rope = make_rope(
            int(self.head_dim * args.rotary_pct),
            base=args.rope_theta,
            scaling=args.rope_scaling,
            max_position_embeddings=args.max_position_embeddings,
        )

    def __call__(self, x: mx.array, mask: Any, cache: KVCache | None) -> mx.array:
        batch, length, _ = x.shape
        # Head-major layout: each head's q, k and v rows are adjacent.
        qkv = self.query_key_value(x).reshape(batch, length, self.n_heads, 3 * self.head_dim)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in mx.split(qkv, 3, axis=-1))
        offset = rope_offset(cache)
        q, k = self.rope(q, offset), self.rope(k, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
        return self.dense(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, *, act: Callable[[mx.array], mx.array]):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(dim, hidden)
        self.dense_4h_to_h = nn.Linear(hidden, dim)
        self.act = act

    def __call__(self, x: mx.array) -> mx.array:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class Layer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        assert args.intermediate_size is not None
        self.input_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.attention = Attention(args)
        self.mlp = MLP(args.hidden_size, args.intermediate_size, act=activation(args.hidden_act))
        self.parallel = args.use_parallel_residual

    def __call__(self, x: mx.array, mask: Any, cache: KVCache | None) -> mx.array:
        attn = self.attention(self.input_layernorm(x), mask, cache)
        if self.parallel:  # both branches read the block's input
            return x + attn + self.mlp(self.post_attention_layernorm(x))
        h = x + attn
        return h + self.mlp(self.post_attention_layernorm(h))


class GPTNeoXModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_in = nn.Embedding(args.vocab_size, args.hidden_size)
        self.h = [Layer(args) for _ in range(args.num_hidden_layers)]
        self.final_layer_norm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        if not args.tie_word_embeddings:
            self.embed_out = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(
        self,
        inputs: mx.array,
        cache: Sequence[KVCache] | None = None,
        input_embeddings: mx.array | None = None,
    ) -> mx.array:
        h = input_embeddings if input_embeddings is not None else self.embed_in(inputs)
        h = self.final_layer_norm(run_layers(self.h, h, cache))
        return output_logits(h, self.embed_in, self.get("embed_out"))


class Model(GlobalLayerCaches, nn.Module):
    model_type: ClassVar[str] = "gpt_neox"

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = GPTNeoXModel(args)

    def __call__(
        self,
        inputs: mx.array,
        cache: Sequence[KVCache] | None = None,
        input_embeddings: mx.array | None = None,
    ) -> mx.array:
        return self.model(inputs, cache, input_embeddings)

    @property
    def layers(self) -> list[Layer]:
        return self.model.h

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        out: dict[str, mx.array] = {}
        for key, value in weights.items():
            if key.endswith(_BUFFERS):  # masks and rope tables transformers saved
                continue
            if not key.startswith("model."):
                key = "model." + key.replace("gpt_neox.layers.", "h.").replace("gpt_neox.", "")
            out[key] = value
        if self.args.tie_word_embeddings:
            out = {k: v for k, v in out.items() if not k.startswith("model.embed_out.")}
        return out

    def shard(self, group: mx.distributed.Group | None = None) -> None:
        group = group or mx.distributed.init()
        for layer in self.layers:
            # Equal row blocks of the head-major query_key_value are whole heads.
            shard_heads(layer.attention, group, split_out=["query_key_value"], split_in=["dense"])
            shard_projections(
                layer.mlp, group, split_out=["dense_h_to_4h"], split_in=["dense_4h_to_h"]
            )
