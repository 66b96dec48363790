"""EXAONE 3.0 / 3.5: a Llama-shaped decoder under GPT-2-style checkpoint names.

``transformer.wte``, ``transformer.h.N.{ln_1, attn.attention.{q,k,v,out}_proj, ln_2,
mlp.{c_fc_0 (gate), c_fc_1 (up), c_proj (down)}}``, ``transformer.ln_f``, ``lm_head``;
configs say ``num_layers`` and ``layer_norm_epsilon`` for Llama's layer count and RMS eps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar, Self

import mlx.core as mx
import mlx.nn as nn

from ..cache import KVCache
from . import llama
from ._blocks import GlobalLayerCaches, drop_unused, output_logits, run_layers, shard_heads
from .sharding import shard_projections

# EXAONE config key -> the Llama field it means.
_CONFIG_NAMES = {"num_layers": "num_hidden_layers", "layer_norm_epsilon": "rms_norm_eps"}


@dataclasses.dataclass
class ModelArgs(llama.ModelArgs):
    tie_word_embeddings: bool = False  # transformers' ExaoneConfig default

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> Self:
        params = dict(params)
        for theirs, ours in _CONFIG_NAMES.items():
            if theirs in params:
                params.setdefault(ours, params[theirs])
        return super().from_dict(params)


class SelfAttention(llama.AttentionBase):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        dim, head_dim, bias = args.hidden_size, self.head_dim, args.attention_bias
        self.q_proj = nn.Linear(dim, self.n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=bias)
        self.out_proj = nn.Linear(self.n_heads * head_dim, dim, bias=bias)

    def __call__(self, x: mx.array, mask: Any, cache: KVCache | None) -> mx.array:
        batch, length, _ = x.shape
        q = self.q_proj(x).reshape(batch, length, self.n_heads, -1)
        k = self.k_proj(x).reshape(batch, length, self.n_kv_heads, -1)
        v = self.v_proj(x).reshape(batch, length, self.n_kv_heads, -1)
        return self.out_proj(self.attend(q, k, v, mask, cache))


class AttentionWrapper(nn.Module):
    """Only there for the checkpoints' ``attn.attention`` nesting."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = SelfAttention(args)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, *, bias: bool):
        super().__init__()
        self.c_fc_0 = nn.Linear(dim, hidden, bias=bias)
        self.c_fc_1 = nn.Linear(dim, hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, dim, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.c_proj(nn.silu(self.c_fc_0(x)) * self.c_fc_1(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.ln_1 = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.attn = AttentionWrapper(args)
        self.ln_2 = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.mlp = MLP(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)

    def __call__(self, x: mx.array, mask: Any, cache: KVCache | None) -> mx.array:
        h = x + self.attn.attention(self.ln_1(x), mask, cache)
        return h + self.mlp(self.ln_2(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.wte = nn.Embedding(args.vocab_size, args.hidden_size)
        self.h = [Block(args) for _ in range(args.num_hidden_layers)]
        self.ln_f = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(
        self, inputs: mx.array, cache: Sequence[KVCache] | None, input_embeddings: mx.array | None
    ) -> mx.array:
        h = self.wte(inputs) if input_embeddings is None else input_embeddings
        return self.ln_f(run_layers(self.h, h, cache))


class Model(GlobalLayerCaches, nn.Module):
    model_type: ClassVar[str] = "exaone"

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.transformer = Transformer(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(
        self,
        inputs: mx.array,
        cache: Sequence[KVCache] | None = None,
        input_embeddings: mx.array | None = None,
    ) -> mx.array:
        h = self.transformer(inputs, cache, input_embeddings)
        return output_logits(h, self.transformer.wte, self.get("lm_head"))

    @property
    def layers(self) -> list[Block]:
        return self.transformer.h

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        tied = self.args.tie_word_embeddings
        return drop_unused(weights, buffers=(".inv_freq",), tied_head="lm_head." if tied else None)

    def shard(self, group: mx.distributed.Group | None = None) -> None:
        group = group or mx.distributed.init()
        for block in self.layers:
            split_out = ["q_proj", "k_proj", "v_proj"]
            shard_heads(block.attn.attention, group, split_out=split_out, split_in=["out_proj"])
            shard_projections(block.mlp, group, split_out=["c_fc_0", "c_fc_1"], split_in=["c_proj"])
