"""InternLM2 / InternLM2.5: a Llama-shaped decoder with its own checkpoint names.

Queries, keys and values come from one fused ``wqkv`` whose rows are grouped per KV head:
for each KV head, its ``n_heads / n_kv_heads`` query heads, then its key, then its value.
Names follow the checkpoints (``tok_embeddings``, ``attention.wqkv``/``wo``,
``feed_forward.w1``/``w2``/``w3``, ``attention_norm``, ``ffn_norm``, ``output``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import mlx.core as mx
import mlx.nn as nn

from ..cache import KVCache
from . import llama
from ._blocks import GlobalLayerCaches, drop_unused, output_logits, run_layers, shard_heads
from .sharding import shard_projections


@dataclasses.dataclass
class ModelArgs(llama.ModelArgs):
    # Defaults are InternLM2's configuration code's.
    bias: bool = True
    tie_word_embeddings: bool = False


class Attention(llama.AttentionBase):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        dim, heads = args.hidden_size, self.n_heads + 2 * self.n_kv_heads
        self.wqkv = nn.Linear(dim, heads * self.head_dim, bias=args.bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, dim, bias=args.bias)

    def __call__(self, x: mx.array, mask: Any, cache: KVCache | None) -> mx.array:
        batch, length, _ = x.shape
        group = self.n_heads // self.n_kv_heads
        qkv = self.wqkv(x).reshape(batch, length, self.n_kv_heads, group + 2, self.head_dim)
        q = qkv[..., :group, :].reshape(batch, length, self.n_heads, self.head_dim)
        k, v = qkv[..., -2, :], qkv[..., -1, :]
        return self.wo(self.attend(q, k, v, mask, cache))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down

    def __call__(self, x: mx.array) -> mx.array:
        return self.w2(nn.silu(self.w1(x)) * self.w3(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.hidden_size, args.intermediate_size)
        self.attention_norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.ffn_norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: Any, cache: KVCache | None) -> mx.array:
        h = x + self.attention(self.attention_norm(x), mask, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class DecoderStack(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(
        self, inputs: mx.array, cache: Sequence[KVCache] | None, input_embeddings: mx.array | None
    ) -> mx.array:
        h = self.tok_embeddings(inputs) if input_embeddings is None else input_embeddings
        return self.norm(run_layers(self.layers, h, cache))


class Model(GlobalLayerCaches, nn.Module):
    model_type: ClassVar[str] = "internlm2"

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = DecoderStack(args)
        if not args.tie_word_embeddings:
            self.output = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(
        self,
        inputs: mx.array,
        cache: Sequence[KVCache] | None = None,
        input_embeddings: mx.array | None = None,
    ) -> mx.array:
        h = self.model(inputs, cache, input_embeddings)
        return output_logits(h, self.model.tok_embeddings, self.get("output"))

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        tied = self.args.tie_word_embeddings
        return drop_unused(weights, buffers=(".inv_freq",), tied_head="output." if tied else None)

    def shard(self, group: mx.distributed.Group | None = None) -> None:
        # wqkv's rows are grouped per KV head, so contiguous row blocks are whole groups.
        group = group or mx.distributed.init()
        for layer in self.layers:
            shard_heads(layer.attention, group, split_out=["wqkv"], split_in=["wo"])
            shard_projections(layer.feed_forward, group, split_out=["w1", "w3"], split_in=["w2"])
