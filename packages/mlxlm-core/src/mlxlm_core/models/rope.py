"""Rotary position embeddings: one module, with the scaling variants as frequency tables.

Hugging Face's ``rope_scaling`` (or ``rope_parameters``) picks the variant: ``default``,
``linear``, ``dynamic`` (NTK), ``llama3``, ``yarn`` and ``longrope``. Every variant ends in
``mx.fast.rope``; they differ only in the per-dimension frequencies and an input scale.
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .._errors import UnsupportedError

__all__ = ["Rope", "make_rope", "yarn_attention_scale"]

# DeepSeek configs spell yarn "deepseek_yarn"; the tables are the same.
_YARN_NAMES = ("yarn", "deepseek_yarn")


class Rope(nn.Module):
    """``mx.fast.rope`` with either a ``base`` or an explicit frequency table."""

    def __init__(
        self,
        dims: int,
        *,
        traditional: bool = False,
        base: float | None = 10000.0,
        scale: float = 1.0,
        freqs: mx.array | None = None,
        input_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.dims = dims
        self.traditional = traditional
        self.base = None if freqs is not None else base
        self.scale = scale
        self.input_scale = input_scale
        if freqs is not None:
            self._freqs = freqs  # leading underscore: not a parameter, never saved

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        if self.input_scale != 1.0:
            x = x.at[..., : self.dims].multiply(self.input_scale)
        return mx.fast.rope(
            x,
            self.dims,
            traditional=self.traditional,
            base=self.base,
            scale=self.scale,
            offset=offset,
            freqs=getattr(self, "_freqs", None),
        )


class DynamicNTKRope(Rope):
    """NTK-aware scaling whose base grows once the sequence passes the trained length."""

    def __init__(self, dims: int, *, traditional: bool, base: float, factor: float, max_len: int):
        super().__init__(dims, traditional=traditional, base=base)
        self.factor = factor
        self.max_len = max_len
        self.original_base = base

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        furthest = offset if isinstance(offset, int) else int(mx.max(offset).item())  # type: ignore[arg-type]
        last = x.shape[-2] + furthest
        seq_len = max(last, self.max_len)
        growth = (self.factor * seq_len / self.max_len) - (self.factor - 1)
        self.base = self.original_base * growth ** (self.dims / (self.dims - 2))
        return super().__call__(x, offset)


def _inverse_periods(dims: int, base: float) -> mx.array:
    """``base ** (2i / dims)``: the wavelength divisor of each rotated pair."""
    return base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)


def _llama3_freqs(dims: int, base: float, cfg: dict[str, Any]) -> mx.array:
    factor = cfg["factor"]
    low = cfg.get("low_freq_factor", 1.0)
    high = cfg.get("high_freq_factor", 4.0)
    old_len = cfg.get("original_max_position_embeddings", 8192)
    freqs = _inverse_periods(dims, base)
    wavelens = 2 * math.pi * freqs
    # Long wavelengths are stretched by `factor`, short ones kept, the middle interpolated.
    scaled = mx.where(wavelens > old_len / low, freqs * factor, freqs)
    middle = (wavelens > old_len / high) & (wavelens < old_len / low)
    smooth = (old_len / wavelens - low) / (high - low)
    return mx.where(middle, scaled / ((1 - smooth) / factor + smooth), scaled)


def _yarn(dims: int, base: float, cfg: dict[str, Any]) -> tuple[mx.array, float]:
    factor = cfg["factor"]
    old_len = cfg.get("original_max_position_embeddings", 4096)
    beta_fast, beta_slow = cfg.get("beta_fast", 32), cfg.get("beta_slow", 1)

    def correction_dim(rotations: float) -> float:
        return dims * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high: float = min(math.ceil(correction_dim(beta_slow)), dims - 1)
    if low == high:
        high += 0.001
    ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
    extrapolate = 1.0 - ramp
    periods = _inverse_periods(dims, base)
    interpolated = factor * periods
    freqs = (interpolated * periods) / (interpolated * extrapolate + periods * (1 - extrapolate))

    # An explicit attention_factor (transformers' name) overrides the mscale ratio.
    input_scale = cfg.get("attention_factor") or _yarn_mscale(
        factor, cfg.get("mscale", 1)
    ) / _yarn_mscale(factor, cfg.get("mscale_all_dim", 0))
    return freqs, input_scale


def _yarn_mscale(factor: float, m: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def yarn_attention_scale(scale: float, scaling: dict[str, Any] | None) -> float:
    """``scale`` times yarn's ``mscale_all_dim`` correction, squared (DeepSeek).

    Yarn splits its magnitude correction in two: the ``mscale / mscale_all_dim`` ratio goes
    on the rotated queries and keys (see :func:`make_rope`), and ``mscale_all_dim`` squared
    multiplies the softmax scale; other ropes leave the scale alone.
    """
    scaling = scaling or {}
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind not in _YARN_NAMES or not scaling.get("mscale_all_dim"):
        return scale
    return scale * _yarn_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2


def _longrope(dims: int, base: float, cfg: dict[str, Any], max_len: int) -> tuple[mx.array, float]:
    old_len = cfg["original_max_position_embeddings"]
    freqs = mx.array(cfg["long_factor"], dtype=mx.float32) * _inverse_periods(dims, base)
    factor = max_len / old_len
    scale = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(old_len))
    return freqs, cfg.get("long_mscale") or scale


def make_rope(
    dims: int,
    *,
    base: float,
    traditional: bool = False,
    scaling: dict[str, Any] | None = None,
    max_position_embeddings: int | None = None,
) -> Rope:
    """Build the rope a Hugging Face config asks for; unknown variants are refused."""
    kind = "default"
    if scaling:
        kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return Rope(dims, traditional=traditional, base=base)
    if kind == "linear":
        return Rope(dims, traditional=traditional, base=base, scale=1 / scaling["factor"])  # type: ignore[index]
    assert scaling is not None
    if kind == "dynamic":
        return DynamicNTKRope(
            dims,
            traditional=traditional,
            base=base,
            factor=scaling["factor"],
            max_len=max_position_embeddings or 2048,
        )
    if kind == "llama3":
        return Rope(dims, traditional=traditional, freqs=_llama3_freqs(dims, base, scaling))
    if kind in _YARN_NAMES:
        freqs, input_scale = _yarn(dims, base, scaling)
        return Rope(dims, traditional=traditional, freqs=freqs, input_scale=input_scale)
    if kind == "longrope":
        freqs, input_scale = _longrope(dims, base, scaling, max_position_embeddings or 131072)
        return Rope(dims, traditional=traditional, freqs=freqs, input_scale=input_scale)
    raise UnsupportedError(f"unsupported rope scaling type {kind!r}")
