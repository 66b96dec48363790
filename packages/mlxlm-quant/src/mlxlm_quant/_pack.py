"""Build MLX quantized layers from integer codes and chosen scales/biases.

Learned quantizers pick the codes themselves (GPTQ) or their scales (AWQ's clipping, DWQ),
so they cannot hand a float matrix to ``mx.quantize`` and let it choose again. MLX's affine
layout is a little-endian bit stream of ``bits``-wide codes in ``uint32`` words (for 2, 4 and
8 bits that is simply ``32 / bits`` codes per word); the unit tests check :func:`pack_codes`
against ``mx.quantize`` for every width.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlxlm_core.quantize import QuantSpec

__all__ = ["affine_params", "pack_codes", "quantized_from_codes", "round_trip"]


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """``(..., cols)`` integer codes in ``[0, 2**bits)`` → ``(..., cols * bits / 32)`` uint32."""
    *lead, cols = codes.shape
    if cols % 32:
        raise ValueError(f"cannot pack {cols} columns (need a multiple of 32)")
    chunks = codes.astype(np.uint64).reshape(*lead, cols // 32, 32)
    words = np.zeros((*lead, cols // 32, bits), dtype=np.uint64)
    low = np.uint64(0xFFFFFFFF)
    for j in range(32):
        offset = j * bits
        word, shift = divmod(offset, 32)
        value = chunks[..., j] << np.uint64(shift)
        words[..., word] |= value & low
        if shift + bits > 32:
            words[..., word + 1] |= value >> np.uint64(32)
    return words.reshape(*lead, cols // 32 * bits).astype(np.uint32)


def affine_params(w: mx.array, *, bits: int, group_size: int) -> tuple[mx.array, mx.array]:
    """MLX's own scales and biases for ``w`` (so our grids match ``mx.quantize``'s)."""
    _, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    return scales, biases


def quantized_from_codes(
    module: nn.Module,
    codes: np.ndarray,
    scales: mx.array,
    biases: mx.array,
    *,
    bits: int,
    group_size: int,
) -> nn.Module:
    """``module``'s quantized twin carrying exactly these codes, scales and biases."""
    layer = module.to_quantized(group_size=group_size, bits=bits)
    layer.weight = mx.array(pack_codes(codes, bits))
    layer.scales = scales.astype(mx.float32)
    layer.biases = biases.astype(mx.float32)
    return layer


def round_trip(w: mx.array, spec: QuantSpec) -> mx.array:
    """``w`` as a layer quantized with ``spec`` by rounding to nearest would compute with it."""
    q = mx.quantize(w, group_size=spec.group_size, bits=spec.bits, mode=spec.mode)
    return mx.dequantize(*q, group_size=spec.group_size, bits=spec.bits, mode=spec.mode)
