"""GPT-2: learned absolute positions, LayerNorms, fused ``c_attn`` and a GELU MLP.

Hugging Face stores GPT-2's projections as ``Conv1D`` matrices, ``(in, out)``: ``sanitize``
transposes them into linear layers' ``(out, in)`` and files them under ``model.`` (MLX-LM's
layout, so converted checkpoints load either way). Names already under ``model.`` are
taken as converted and left alone: a square ``c_proj`` could not be told apart by shape.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any, ClassVar

import mlx.core as mx
import mlx.nn as nn

from .._errors import ContextLengthError, InvalidArgumentError
from ..cache import KVCache
from ._activations import activation
from ._blocks import GlobalLayerCaches, run_layers, shard_heads
from .base import BaseModelArgs, attention, rope_offset
from .starcoder2 import MLP, shard_mlp

_CONV1D = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")
_BUFFERS = (".attn.bias", ".attn.masked_bias")


@dataclasses.dataclass
class ModelArgs(BaseModelArgs):
    # Defaults are transformers' GPT2Config ones.
    n_embd: int = 768
    n_head: int = 12
    n_layer: int = 12
    vocab_size: int = 50257
    n_positions: int = 1024
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        if args.n_embd % args.n_head:
            raise InvalidArgumentError(f"n_embd {args.n_embd} is not a multiple of n_head")
        self.n_heads = self.n_kv_heads = args.n_head
        self.head_dim = args.n_embd // args.n_head
        self.scale = self.head_dim**-0.5 if args.scale_attn_weights else 1.0
        if args.scale_attn_by_inverse_layer_idx:
            self.scale /= layer + 1
        self.c_attn = nn.Linear(args.n_embd, 3 * args.n_embd)
        self.c_proj = nn.Linear(args.n_embd, args.n_embd)

    def __call__(self, x: mx.array, mask: Any, cache: KVCache | None) -> mx.array:
        batch, length, _ = x.shape
        q, k, v = (
            t.reshape(batch, length, self.n_heads, -1).transpose(0, 2, 1, 3)
            for t in mx.split(self.c_attn(x), 3, axis=-1)
        )
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
        return self.c_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        hidden = args.n_inner or 4 * args.n_embd
        self.ln_1 = nn.LayerNorm(args.n_embd, eps=args.layer_norm_epsilon)
        self.attn = Attention(args, layer)
        self.ln_2 = nn.LayerNorm(args.n_embd, eps=args.layer_norm_epsilon)
        self.mlp = MLP(args.n_embd, hidden, act=activation(args.activation_function))

    def __call__(self, x: mx.array, mask: Any, cache: KVCache | None) -> mx.array:
        h = x + self.attn(self.ln_1(x), mask, cache)
        return h + self.mlp(self.ln_2(h))


class GPT2Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_positions = args.n_positions
        self.wte = nn.Embedding(args.vocab_size, args.n_embd)
        self.wpe = nn.Embedding(args.n_positions, args.n_embd)
        self.h = [Block(args, i) for i in range(args.n_layer)]
        self.ln_f = nn.LayerNorm(args.n_embd, eps=args.layer_norm_epsilon)

    def positions(self, length: int, cache: KVCache | None) -> mx.array:
        """Each row's absolute positions (padding slots clamp to 0; they are masked)."""
        end = (0 if cache is None else cache.offset) + length
        if end > self.n_positions:
            raise ContextLengthError(
                f"GPT-2 has {self.n_positions} learned positions; this needs {end}"
            )
        offset = rope_offset(cache)
        if isinstance(offset, int):
            return mx.arange(offset, offset + length)
        return mx.maximum(offset[:, None] + mx.arange(length), 0)

    def __call__(
        self,
        inputs: mx.array,
        cache: Sequence[KVCache] | None = None,
        input_embeddings: mx.array | None = None,
    ) -> mx.array:
        h = input_embeddings if input_embeddings is not None else self.wte(inputs)
        h = h + self.wpe(self.positions(h.shape[1], cache[0] if cache is not None else None))
        return self.ln_f(run_layers(self.h, h, cache))


class Model(GlobalLayerCaches, nn.Module):
    model_type: ClassVar[str] = "gpt2"

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = GPT2Model(args)

    def __call__(
        self,
        inputs: mx.array,
        cache: Sequence[KVCache] | None = None,
        input_embeddings: mx.array | None = None,
    ) -> mx.array:
        return self.model.wte.as_linear(self.model(inputs, cache, input_embeddings))

    @property
    def layers(self) -> list[Block]:
        return self.model.h

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        out: dict[str, mx.array] = {}
        for key, value in weights.items():
            if key.startswith("model."):  # already converted
                out[key] = value
                continue
            key = key.removeprefix("transformer.")
            if key.startswith("lm_head.") or key.endswith(_BUFFERS):  # tied head, mask buffers
                continue
            out[f"model.{key}"] = value.T if _CONV1D.fullmatch(key) else value
        return out

    def shard(self, group: mx.distributed.Group | None = None) -> None:
        group = group or mx.distributed.init()
        for block in self.layers:
            # q, k and v are split each on its own, so every rank keeps whole heads of each.
            shard_heads(
                block.attn, group, split_out=["c_attn"], split_in=["c_proj"], segments={"c_attn": 3}
            )
            shard_mlp(block.mlp, group)
