"""GGUF's 32-value blocks <-> MLX affine (weight, scales, biases) triples, both directions.

Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 each store 32 integers with a float16 scale `d` (and for
the `_1` kinds a float16 minimum `m`), so each block is one group-32 group of MLX's affine
quantization, ``w = scale * u + bias``:

    Q4_1 / Q5_1: u = q, scale = d, bias = m
    Q4_0 / Q5_0 / Q8_0: w = d * (u - k) with k = 8 / 16 / 128, so scale = d, bias = -k * d

An MLX triple with a larger group is the same thing with its scale repeated over several
blocks. Going from MLX to GGUF is exact whenever the integers fit the target's width (and,
for the symmetric kinds, the bias is ``-k * scale``); scales and biases are rounded to
float16. Anything else must be re-quantized, which callers report.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QType

GROUP = 32
# GGUF type -> (bits, symmetric offset k or None for the scale+minimum kinds)
BLOCK_KINDS: dict[QType, tuple[int, int | None]] = {
    QType.Q4_0: (4, 8),
    QType.Q4_1: (4, None),
    QType.Q5_0: (5, 16),
    QType.Q5_1: (5, None),
    QType.Q8_0: (8, 128),
}
_BLOCK_BYTES = {QType.Q4_0: 18, QType.Q4_1: 20, QType.Q5_0: 22, QType.Q5_1: 24, QType.Q8_0: 34}


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """(..., n) integers < 2**bits -> (..., n * bits / 32) uint32 in MLX's layout.

    MLX packs every width as one little-endian bit stream per row: value j occupies bits
    j*bits .. j*bits + bits - 1.
    """
    lead, n = values.shape[:-1], values.shape[-1]
    if bits == 8:
        return np.ascontiguousarray(values.astype(np.uint8)).view("<u4")
    if bits == 4:
        v = values.astype(np.uint8)
        return np.ascontiguousarray(v[..., 0::2] | (v[..., 1::2] << 4)).view("<u4")
    shifts = np.arange(bits, dtype=np.uint8)
    stream = ((values.astype(np.uint8)[..., None] >> shifts) & 1).reshape(*lead, n * bits)
    return np.ascontiguousarray(np.packbits(stream, axis=-1, bitorder="little")).view("<u4")


def unpack_bits(packed: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of :func:`pack_bits`: (..., words) uint32 -> (..., words * 32 / bits) uint8."""
    raw = np.ascontiguousarray(packed.astype("<u4", copy=False)).view(np.uint8)
    if bits == 8:
        return raw
    if bits == 4:
        return np.stack([raw & 0x0F, raw >> 4], axis=-1).reshape(*raw.shape[:-1], -1)
    stream = np.unpackbits(raw, axis=-1, bitorder="little")
    groups = stream.reshape(*raw.shape[:-1], -1, bits).astype(np.uint8)
    return (groups << np.arange(bits, dtype=np.uint8)).sum(axis=-1, dtype=np.uint8)


def _f16(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.astype(np.float16)).view(np.uint8).reshape(*x.shape, 2)


def blocks_to_affine(
    raw: np.ndarray, qtype: QType, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw GGUF bytes of a `shape` tensor -> (packed uint32, scales, biases), float32."""
    bits, offset = BLOCK_KINDS[qtype]
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    blocks = np.ascontiguousarray(raw).reshape(rows, -1, _BLOCK_BYTES[qtype])

    def half(start: int) -> np.ndarray:
        return blocks[..., start : start + 2].copy().view(np.float16)[..., 0].astype(np.float32)

    d = half(0)
    values: np.ndarray
    if qtype == QType.Q8_0:
        values = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    else:
        start = 2 if offset is not None else 4
        if bits == 5:
            high = np.unpackbits(blocks[..., start : start + 4], axis=-1, bitorder="little")
            start += 4
        qs = blocks[..., start : start + 16]
        # Byte i of a block holds element i (low nibble) and element i + 16 (high nibble).
        values = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
        if bits == 5:
            values = values | (high << 4)
    bias = -float(offset) * d if offset is not None else half(2)
    lead = shape[:-1]
    packed = pack_bits(values.reshape(rows, -1), bits)
    return packed.reshape(*lead, -1), d.reshape(*lead, -1), bias.reshape(*lead, -1)


def affine_to_blocks(
    values: np.ndarray, scales: np.ndarray, biases: np.ndarray, qtype: QType
) -> np.ndarray | None:
    """(rows, n) integers with group-32 scales/biases -> raw GGUF bytes, or None if inexact.

    `scales`/`biases` are (rows, n / 32): callers repeat a larger group's values first.
    """
    bits, offset = BLOCK_KINDS[qtype]
    if values.size and int(values.max()) >= 1 << bits:
        return None
    # A symmetric kind needs bias == -k * scale (to well within one grid step).
    if offset is not None and not np.all(np.abs(biases + offset * scales) <= 1e-3 * np.abs(scales)):
        return None
    if not (np.isfinite(scales).all() and np.isfinite(biases).all()):
        return None
    if np.abs(scales).max(initial=0) > 65504 or np.abs(biases).max(initial=0) > 65504:
        return None
    rows = values.shape[0]
    v = values.reshape(rows, -1, GROUP).astype(np.uint8)
    d = scales.reshape(rows, -1).astype(np.float32)
    parts = [_f16(d)]
    if qtype == QType.Q8_0:
        parts.append((v.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
        return np.concatenate(parts, axis=-1).reshape(rows, -1)
    if offset is None:
        parts.append(_f16(biases.reshape(rows, -1).astype(np.float32)))
    if bits == 5:
        parts.append(np.packbits((v >> 4) & 1, axis=-1, bitorder="little"))
    parts.append((v[..., :16] & 0x0F) | ((v[..., 16:] & 0x0F) << 4))
    return np.concatenate(parts, axis=-1).reshape(rows, -1)
