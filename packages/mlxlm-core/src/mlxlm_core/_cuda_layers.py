"""Fused one-row decoding for llama-style blocks on CUDA (see :mod:`._cuda_kernels`).

A pre-norm block with separate q/k/v projections and a SwiGLU MLP runs as 4 launches of
ours plus MLX's rope, cache update and attention, instead of ~20 MLX kernels:

    q, k, v = rms_norm(x) @ [Wq, Wk, Wv].T           one launch, norm fused
    h       = x + attend(q, k, v) @ Wo.T              residual fused
    g       = silu(rms_norm(h) @ Wg.T) * (.. @ Wu.T)  one launch, norm fused
    out     = h + g @ Wd.T                            residual fused

Only one-row inputs take this path (decoding a batch of one); prompts
and larger batches run the block's own code (MLX's matmuls are right for them).

Eligible blocks are switched in place to a subclass (same object, same parameters), as
:mod:`._policy_layers` does for quantized layers. A block qualifies only if it is exactly the
llama block (no subclass that may compute something else), with plain ``nn.Linear``
projections without bias, ``nn.RMSNorm`` norms and a SwiGLU MLP; the projection checks are
repeated on every call, since adapters can replace a projection after loading.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from . import _cuda_kernels as ck
from .models import llama
from .models.base import attention, rope_offset
from .models.rope import Rope

__all__ = ["DEFAULT_TUNINGS", "FusedDecoderLayer", "Tunings", "convert_decode_layers", "eligible"]


def _plain_linear(module: Any) -> bool:
    return type(module) is nn.Linear and "bias" not in module


def _plain_norm(module: Any) -> bool:
    return type(module) is nn.RMSNorm


def eligible(layer: nn.Module) -> bool:
    """Whether ``layer`` is a block whose computation the fused path reproduces."""
    if type(layer) not in (llama.DecoderLayer, FusedDecoderLayer):
        return False
    attn, mlp = layer.get("self_attn"), layer.get("mlp")
    if type(attn) is not llama.Attention or type(mlp) is not llama.MLP:
        return False
    if "q_norm" in attn or getattr(attn, "softcap", None) is not None:
        return False
    rope = attn.get("rope")
    if type(rope) is not Rope or rope.dims != attn.head_dim or rope.input_scale != 1.0:
        return False  # other ropes keep state between calls (dynamic NTK) or scale inputs
    projections = (
        attn.q_proj,
        attn.k_proj,
        attn.v_proj,
        attn.o_proj,
        mlp.gate_proj,
        mlp.up_proj,
        mlp.down_proj,
    )
    return all(map(_plain_linear, projections)) and all(
        map(_plain_norm, (layer.input_layernorm, layer.post_attention_layernorm))
    )


# Device times on an H200 (ncu, tools/cuda_lab.py sweepncu): 8 warps, two rows each, the
# dot products split over 4 warps won for every shape but gate/up, which reads two matrices.
_SPLIT = ck.Tuning(warps=8, rows_per_warp=2, ksplit=4)
_GATE_UP = ck.Tuning(warps=4, rows_per_warp=1)


@dataclass(frozen=True)
class Tunings:
    """Launch shapes per projection (see :class:`._cuda_kernels.Tuning`)."""

    qkv: ck.Tuning = _SPLIT
    o: ck.Tuning = _SPLIT
    gate_up: ck.Tuning = _GATE_UP
    down: ck.Tuning = _SPLIT


DEFAULT_TUNINGS = Tunings()

_offsets: dict[int, mx.array] = {}  # the latest rope offset as an array, shared by all layers


def _offset_array(offset: int | mx.array) -> mx.array:
    """Rope offsets enter the compiled functions as arrays: a Python int would retrace them."""
    if isinstance(offset, mx.array):
        return offset.reshape(-1)[:1].astype(mx.int32)
    if offset not in _offsets:
        _offsets.clear()
        _offsets[offset] = mx.array([offset], dtype=mx.int32)
    return _offsets[offset]


def _periods(rope: Rope) -> mx.array:
    """Per pair, the position divisor of its angle (what ``mx.fast.rope`` uses)."""
    freqs = getattr(rope, "_freqs", None)
    if freqs is not None:
        return freqs.astype(mx.float32)
    assert rope.base is not None
    return rope.base ** (mx.arange(0, rope.dims, 2, dtype=mx.float32) / rope.dims)


class FusedDecoderLayer(llama.DecoderLayer):
    """``llama.DecoderLayer`` whose one-row calls run the fused kernels.

    The work before attention (norm, q/k/v, rope) and after it (o projection, norm, MLP,
    residuals) are each one ``mx.compile``d function, so a step costs two compiled calls, the
    cache update and the attention kernel in Python instead of ~25 op constructions; the
    kernels' own Python wrappers run only when a function is traced.
    """

    _tunings: Tunings = DEFAULT_TUNINGS
    _compiled: _Parts | None = None
    _checked: tuple = ()  # (key, verdict) of the last eligibility check

    def _check(self, x: mx.array, modules: Sequence[Any], weights: Sequence[mx.array]) -> bool:
        if type(self["self_attn"]["rope"]) is not Rope:
            return False
        if not all(map(_plain_linear, modules[:7])) or not all(map(_plain_norm, modules[7:])):
            return False  # an adapter replaced a projection after loading
        if not ck.supported(x, *weights[:3]) or not ck.supported(x, *weights[4:6]):
            return False
        o, down = weights[3], weights[6]
        if o.shape[1] % ck.CHUNK or down.shape[1] % ck.CHUNK:
            return False
        return all(w.dtype == x.dtype for w in weights)

    def _functions(self) -> _Parts:
        if self._compiled is None:
            # object.__setattr__: an nn.Module would file a container value as a child.
            object.__setattr__(self, "_compiled", _compile_parts(self, self._tunings))
        return self._compiled  # type: ignore[return-value]

    def __call__(self, x: mx.array, mask: Any, cache: Any) -> mx.array:
        if x.size != x.shape[-1] or (x.dtype != mx.bfloat16 and x.dtype != mx.float16):
            # One row only: the rotary epilogue and the output layouts assume it.
            return super().__call__(x, mask, cache)
        attn, mlp = self["self_attn"], self["mlp"]
        modules = (
            attn["q_proj"],
            attn["k_proj"],
            attn["v_proj"],
            attn["o_proj"],
            mlp["gate_proj"],
            mlp["up_proj"],
            mlp["down_proj"],
            self["input_layernorm"],
            self["post_attention_layernorm"],
        )
        weights = [m.get("weight") for m in modules]
        # The full check runs only when a module, a weight or the input's type changed: it is
        # ~10% of a step's host time, and the step is bound by host time.
        key = (x.shape, x.dtype, *map(id, modules), *map(id, weights))
        if not self._checked or self._checked[0] != key:
            ok = all(w is not None for w in weights) and self._check(x, modules, weights)  # type: ignore[arg-type]
            object.__setattr__(self, "_checked", (key, ok))
        if not self._checked[1]:
            return super().__call__(x, mask, cache)
        parts = self._functions()
        wq, wk, wv, wo, wg, wu, wd, n1, n2 = weights
        q, k, v = parts.before(x, n1, wq, wk, wv, _offset_array(rope_offset(cache)))
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = attention(q, k, v, cache=cache, scale=attn.scale, mask=mask)
        return parts.after(out, x, wo, n2, wg, wu, wd)


_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class _Parts:
    before: Any  # (x, norm, wq, wk, wv, offset) -> roped q, k and v, (B, heads, L, D)
    after: Any  # (attention out, x, wo, norm, wg, wu, wd) -> the block's output


def _compile_parts(layer: FusedDecoderLayer, tunings: Tunings) -> _Parts:
    attn = layer["self_attn"]
    rope = attn["rope"]
    heads, kv_heads, dim = attn.n_heads, attn.n_kv_heads, attn.head_dim
    eps1, eps2 = layer["input_layernorm"].eps, layer["post_attention_layernorm"].eps
    periods = _periods(rope)
    shapes = [(1, heads, 1, dim), (1, kv_heads, 1, dim), (1, kv_heads, 1, dim)]

    def before(x, norm, wq, wk, wv, offset):
        rotary = ck.Rotary(periods, offset, dim, scale=rope.scale, traditional=rope.traditional)
        q, k, v = ck.multi_linear(
            x, [wq, wk, wv], norm=norm, eps=eps1, rope=rotary, shapes=shapes, tune=tunings.qkv
        )
        return q, k, v

    def after(out, x, wo, norm, wg, wu, wd):
        # ``out`` is (1, heads, 1, head_dim): for one row, the same memory as (1, 1, hidden).
        h = ck.linear(out, wo, residual=x, tune=tunings.o)
        g = ck.swiglu(h, wg, wu, norm=norm, eps=eps2, tune=tunings.gate_up)
        return ck.linear(g, wd, residual=h, tune=tunings.down)

    return _Parts(mx.compile(before), mx.compile(after))


def convert_decode_layers(
    model: nn.Module,
    *,
    enabled: bool,
    tunings: Tunings | None = None,
) -> int:
    """Switch eligible blocks to the fused path (or back when not ``enabled``); returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is FusedDecoderLayer and not enabled:
            module.__class__ = llama.DecoderLayer
        elif enabled and eligible(module):
            module.__class__ = FusedDecoderLayer
            object.__setattr__(module, "_compiled", None)
            object.__setattr__(module, "_checked", ())
            if tunings is not None:
                module._tunings = tunings
            count += 1
    return count
