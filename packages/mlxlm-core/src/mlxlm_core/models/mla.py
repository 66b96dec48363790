"""Multi-head latent attention (DeepSeek-V2/V3, Kimi K2): the cache holds a compressed latent.

Keys and values come from one low-rank latent per token (``kv_lora_rank`` wide, normed)
plus a small rope-carrying key shared by all heads (``qk_rope_head_dim``). The cache stores
only those two, so a token costs ``kv_lora_rank + qk_rope_head_dim`` numbers per layer
instead of ``heads * (key + value dims)``.

Checkpoints hold the latent's up-projection as one ``kv_b_proj`` (per head: the no-rope key
rows, then the value rows). :func:`split_kv_b_proj` cuts it into two per-head matrices,
``embed_q`` and ``unembed_out`` (MLX-LM's names, so its converted checkpoints load), which
attention uses in either order:

- prefill (many queries): expand the cached latent into per-head keys and values;
- decode (one query): fold ``embed_q`` into the query and ``unembed_out`` into the output,
  attending over the latent itself, which never gets expanded.

The rope part of the scores enters the fused attention kernel as its additive mask, with
the causal/padding mask folded in.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear

from .._errors import InvalidArgumentError, UnsupportedError
from ..cache import KVCache
from .base import rope_offset
from .rope import make_rope, yarn_attention_scale
from .switch_layers import _MODE_DEFAULTS

__all__ = [
    "MultiHeadLatentAttention",
    "MultiLinear",
    "QuantizedMultiLinear",
    "shard_mla",
    "split_kv_b_proj",
]


class MultiLinear(nn.Module):
    """One ``(out, in)`` matrix per head; ``x`` is ``(..., heads, L, in)``.

    ``transpose=False`` applies the transposed matrices (``in`` -> ``out`` swapped), which
    is how one stored matrix serves both the expansion and the folding direction.
    """

    def __init__(self, input_dims: int, output_dims: int, num_heads: int):
        super().__init__()
        scale = input_dims**-0.5
        self.weight = mx.random.uniform(-scale, scale, (num_heads, output_dims, input_dims))

    def __call__(self, x: mx.array, *, transpose: bool = True) -> mx.array:
        return x @ (self.weight.swapaxes(-1, -2) if transpose else self.weight)

    def to_quantized(
        self,
        group_size: int | None = None,
        bits: int | None = None,
        mode: str = "affine",
        quantize_input: bool = False,
    ) -> QuantizedMultiLinear:
        """The quantized twin of this layer (what ``nn.quantize`` calls)."""
        if quantize_input:
            raise InvalidArgumentError("per-head layers do not support activation quantization")
        layer = QuantizedMultiLinear(
            *self.weight.shape, group_size=group_size, bits=bits, mode=mode
        )
        layer.set_weight(self.weight)
        return layer


class QuantizedMultiLinear(nn.Module):
    """:class:`MultiLinear` with packed weights (``weight``/``scales``/``biases``)."""

    def __init__(
        self,
        num_heads: int,
        output_dims: int,
        input_dims: int,
        *,
        group_size: int | None = None,
        bits: int | None = None,
        mode: str = "affine",
    ):
        super().__init__()
        if mode not in _MODE_DEFAULTS:
            raise InvalidArgumentError(f"unknown quantization mode {mode!r}")
        default_group, default_bits = _MODE_DEFAULTS[mode]
        self.group_size = group_size or default_group
        self.bits = bits or default_bits
        self.mode = mode
        self.set_weight(mx.zeros((num_heads, output_dims, input_dims)))

    def set_weight(self, weight: mx.array) -> None:
        packed, scales, *biases = mx.quantize(weight, self.group_size, self.bits, mode=self.mode)
        self.weight, self.scales = packed, scales
        if biases:
            self.biases = biases[0]
        self.freeze()

    def __call__(self, x: mx.array, *, transpose: bool = True) -> mx.array:
        return mx.quantized_matmul(
            x,
            self["weight"],
            self["scales"],
            self.get("biases"),
            transpose=transpose,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        )


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek attention; ``args`` is a DeepSeek-V2/V3 ``ModelArgs``."""

    def __init__(self, args: Any, *, traditional: bool):
        super().__init__()
        dim, heads = args.hidden_size, args.num_attention_heads
        self.n_heads = heads
        self.nope_dim, self.rope_dim = args.qk_nope_head_dim, args.qk_rope_head_dim
        self.v_dim, self.kv_rank = args.v_head_dim, args.kv_lora_rank
        q_dim = self.nope_dim + self.rope_dim
        self.scale = yarn_attention_scale(q_dim**-0.5, args.rope_scaling)
        bias = args.attention_bias
        if args.q_lora_rank is None:
            self.q_proj = nn.Linear(dim, heads * q_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(dim, args.q_lora_rank, bias=bias)
            self.q_a_layernorm = nn.RMSNorm(args.q_lora_rank, eps=1e-6)
            self.q_b_proj = nn.Linear(args.q_lora_rank, heads * q_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(dim, self.kv_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = nn.RMSNorm(self.kv_rank, eps=1e-6)
        self.embed_q = MultiLinear(self.nope_dim, self.kv_rank, heads)
        self.unembed_out = MultiLinear(self.kv_rank, self.v_dim, heads)
        self.o_proj = nn.Linear(heads * self.v_dim, dim, bias=bias)
        self.rope = make_rope(
            self.rope_dim,
            base=args.rope_theta,
            traditional=traditional,
            scaling=args.rope_scaling,
            max_position_embeddings=args.max_position_embeddings,
        )

    def __call__(self, x: mx.array, mask: Any, cache: KVCache | None) -> mx.array:
        batch, length, _ = x.shape
        if "q_proj" in self:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.reshape(batch, length, self.n_heads, -1).transpose(0, 2, 1, 3)
        q_nope, q_pe = mx.split(q, [self.nope_dim], axis=-1)
        latent, k_pe = mx.split(self.kv_a_proj_with_mqa(x), [self.kv_rank], axis=-1)
        latent = mx.expand_dims(self.kv_a_layernorm(latent), 1)  # (B, 1, L, rank)
        k_pe = mx.expand_dims(k_pe, 1)  # (B, 1, L, rope): one key shared by every head
        offset = rope_offset(cache)
        q_pe, k_pe = self.rope(q_pe, offset), self.rope(k_pe, offset)
        if cache is not None:
            latent, k_pe = cache.update_and_fetch(latent, k_pe)
        # The rope half of the scores, with the causal/padding mask folded in, is the
        # additive mask of the no-rope half's attention.
        scores_pe = (q_pe * self.scale) @ k_pe.swapaxes(-1, -2)
        allowed = _boolean_mask(mask, length, k_pe.shape[2])
        if allowed is not None:
            scores_pe = mx.where(allowed, scores_pe, mx.finfo(scores_pe.dtype).min)
        if length == 1:
            q_latent = self.embed_q(q_nope)  # (B, H, 1, rank)
            out = mx.fast.scaled_dot_product_attention(
                q_latent, latent, latent, scale=self.scale, mask=scores_pe
            )
            out = self.unembed_out(out)
        else:
            keys = self.embed_q(latent, transpose=False)  # (B, H, T, nope)
            values = self.unembed_out(latent)  # (B, H, T, v)
            out = mx.fast.scaled_dot_product_attention(
                q_nope, keys, values, scale=self.scale, mask=scores_pe
            )
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


def _boolean_mask(mask: Any, length: int, total: int) -> mx.array | None:
    """The cache's mask as booleans over ``total`` keys (None: attend to everything)."""
    if isinstance(mask, str):  # "causal": the queries are the last `length` positions
        return mx.arange(total - length, total)[:, None] >= mx.arange(total)[None]
    return mask


def split_kv_b_proj(
    weights: dict[str, mx.array], *, heads: int, nope_dim: int, v_dim: int, kv_rank: int
) -> dict[str, mx.array]:
    """Replace every ``<attn>.kv_b_proj`` by ``<attn>.embed_q`` and ``<attn>.unembed_out``.

    An affine-quantized ``kv_b_proj`` (an MLX conversion) is dequantized, split, and each
    part quantized again with the same bits and group size.
    """
    out = dict(weights)
    for key in [k for k in weights if k.endswith(".kv_b_proj.weight")]:
        prefix = key.removesuffix(".kv_b_proj.weight")
        weight = out.pop(key)
        scales = out.pop(f"{prefix}.kv_b_proj.scales", None)
        biases = out.pop(f"{prefix}.kv_b_proj.biases", None)
        quant: tuple[int, int] | None = None
        if scales is not None:
            if biases is None:
                raise UnsupportedError(
                    f"{prefix}.kv_b_proj: only affine quantization can be split per head"
                )
            bits = weight.shape[-1] * 32 // kv_rank
            group = kv_rank // scales.shape[-1]
            weight = mx.dequantize(weight, scales, biases, group_size=group, bits=bits)
            quant = (group, bits)
        per_head = weight.reshape(heads, nope_dim + v_dim, kv_rank)
        parts = {
            "embed_q": mx.contiguous(per_head[:, :nope_dim].swapaxes(1, 2)),  # (H, rank, nope)
            "unembed_out": mx.contiguous(per_head[:, nope_dim:]),  # (H, v, rank)
        }
        for name, part in parts.items():
            if quant is None:
                out[f"{prefix}.{name}.weight"] = part
                continue
            packed, part_scales, part_biases = mx.quantize(part, quant[0], quant[1])
            out[f"{prefix}.{name}.weight"] = packed
            out[f"{prefix}.{name}.scales"] = part_scales
            out[f"{prefix}.{name}.biases"] = part_biases
    return out


def shard_mla(attn: MultiHeadLatentAttention, group: mx.distributed.Group) -> None:
    """Give each rank whole heads; the latent projections stay replicated (they are small
    and every head reads the same latent), and o_proj's partial outputs are all-reduced."""
    size, rank = group.size(), group.rank()
    if attn.n_heads % size:
        raise InvalidArgumentError(f"{attn.n_heads} heads cannot be split over {size} ranks")
    name = "q_proj" if "q_proj" in attn else "q_b_proj"
    setattr(attn, name, shard_linear(getattr(attn, name), "all-to-sharded", group=group))
    attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
    attn.n_heads //= size
    heads = slice(rank * attn.n_heads, (rank + 1) * attn.n_heads)
    for layer in (attn.embed_q, attn.unembed_out):
        layer.update({k: v[heads] for k, v in layer.parameters().items()})
