"""One-row products with affine-quantized weights on MLX's CPU backend, from MLX operations.

Why: MLX's Linux CPU wheel runs ``quantized_matmul`` as a scalar loop (~3 GFLOP/s, ~0.6 ns
per weight on one core of BENCHMARKS.md's machine), and decoding one sequence is little
else. Its compiled elementwise kernels (``mx.compile`` builds them with g++ -O3, which
vectorises contiguous loops) and the BLAS under it (:mod:`._blas`) run near memory speed,
so the same product written with them is 3-4x faster, with the packed weights as they are:

    y[n] = sum_g scale[n, g] * (sum_{k in g} q[n, k] x[k])  +  bias[n, g] * sum_{k in g} x[k]

- The packed uint32 words are read through a view as integers holding four quantized values
  each (uint8 for 2-bit, uint16 for 4-bit, uint32 for 8-bit weights), and ``x`` is
  rearranged once into four contiguous "planes" (``x_p[j] = x[4j + p]``); one compiled
  kernel then computes ``P[n, j] = sum_p q_p[n, j] * x_p[j]`` in one pass over the weights.
- A BLAS matrix-vector product against ones sums ``P`` within each quantization group
  (``T``: rows x groups), and ``T * scale + bias * group_sums(x)`` summed over groups is
  ``y``. Only the summation order differs from MLX's kernel (float32 rounding, ~1e-6).
- ``P`` is the only sizeable temporary (4 bytes per four weights). Large matrices (a tied
  output layer) go in chunks of rows so that MLX, which allocates the outputs of the
  operations it has queued ahead of running them, never holds more than a few MB of them.
- Layers reading the same input (q/k/v, gate/up) share its planes: the last input's planes
  are kept per thread and reused while the same array object comes back.

Used for single-row inputs by :mod:`._policy_layers` when the execution policy says
``matvec="planes"``; other bit widths, modes and dtypes keep MLX's kernel.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import mlx.core as mx

__all__ = [
    "SPLIT_BYTES",
    "WHOLE_BYTES",
    "PackedViews",
    "plane_weights",
    "quantized_matvec",
    "supports",
]

# The packed weights viewed as integers of four quantized values each, per bit width.
_VIEWS = {2: mx.uint8, 4: mx.uint16, 8: mx.uint32}
_LANES = 4

# The temporary P takes 4 bytes per row per four weights. A matrix whose P would exceed
# WHOLE_BYTES (a layer of a small model: ~0.9 MB) goes in chunks of rows of SPLIT_BYTES
# each. MLX allocates the outputs of the operations it has queued but not run (~25 such
# chunks), so the chunk size bounds that: measured on SmolLM2-135M's 49152-row output
# layer, 1 MB chunks left 24 MB of temporaries in flight, 256 KB ones 6 MB (the layers'
# own ~4 MB floor) for ~2% more CPU per token, 128 KB ones 4 MB for ~12% more.
WHOLE_BYTES = 1 << 20
SPLIT_BYTES = 256 << 10


def _plane_kernel(bits: int):
    mask = (1 << bits) - 1

    def products(words: mx.array, x0: mx.array, x1: mx.array, x2: mx.array, x3: mx.array):
        # The top lane needs no mask: the shift leaves only its bits.
        p0 = (words & mask).astype(mx.float32) * x0
        p1 = ((words >> bits) & mask).astype(mx.float32) * x1
        p2 = ((words >> (2 * bits)) & mask).astype(mx.float32) * x2
        p3 = (words >> (3 * bits)).astype(mx.float32) * x3
        return (p0 + p1) + (p2 + p3)

    return mx.compile(products)


def _finish(t: mx.array, scales: mx.array, biases: mx.array, sums: mx.array) -> mx.array:
    return t * scales + biases * sums


_KERNELS = {bits: _plane_kernel(bits) for bits in _VIEWS}
_finish_kernel = mx.compile(_finish)
_local = threading.local()


def supports(x: mx.array, bits: int, group_size: int, mode: str, scales: mx.array) -> bool:
    """Whether :func:`quantized_matvec` serves this input and layer (else use MLX's kernel)."""
    return (
        mode == "affine"
        and bits in _VIEWS
        and group_size % _LANES == 0
        and x.dtype == mx.float32
        and scales.dtype == mx.float32
        and x.shape[-1] % group_size == 0
    )


@dataclass(frozen=True)
class PackedViews:
    """A layer's packed weights as one of the CPU kernels reads them: views, no copy.

    ``chunks`` holds one ``(words, scales, biases)`` triple per chunk of rows, shaped as the
    function that made it says (:func:`plane_weights` here, ``_quant_matmul.wide_weights``);
    ``source`` the arrays they view, so a caller can tell when the layer's weights were
    replaced.
    """

    rows: int
    bits: int
    group_size: int
    chunks: tuple[tuple[mx.array, mx.array, mx.array], ...]
    source: tuple[mx.array, mx.array, mx.array]


def plane_weights(
    weight: mx.array,
    scales: mx.array,
    biases: mx.array,
    *,
    bits: int,
    group_size: int,
    inputs: int = 1,
) -> PackedViews:
    """Views of MLX's packed layout (uint32, ``transpose=True``) for :func:`quantized_matvec`,
    chunked for calls with up to ``inputs`` rows (the temporary grows with them): per chunk
    the words as ``(rows, groups, words per group)``, the scales and biases ``(rows, groups)``.
    """
    rows, groups = scales.shape
    words = weight.view(_VIEWS[bits]).reshape(rows, groups, group_size // _LANES)
    row_bytes = 4 * words.shape[1] * words.shape[2] * inputs
    total = rows * row_bytes
    if total <= WHOLE_BYTES:
        step = rows
    elif inputs > 1 and total <= 4 * WHOLE_BYTES:
        # Two or more rows: a layer of 1-4 MB of P goes in even chunks of at most
        # WHOLE_BYTES; for two rows, SmolLM2's 1536-row layers (1.8 MB) in seven 256 KB
        # chunks cost ~25% more per layer (graph nodes) than in two.
        step = -(-rows // -(-total // WHOLE_BYTES))
    else:
        step = max(1, SPLIT_BYTES // row_bytes)
    chunks = tuple(
        (words[i : i + step], scales[i : i + step], biases[i : i + step])
        if step < rows
        else (words, scales, biases)
        for i in range(0, rows, step)
    )
    return PackedViews(rows, bits, group_size, chunks, (weight, scales, biases))


def _planes(x: mx.array, group_size: int) -> tuple[list[mx.array], mx.array]:
    """``x``'s rows as four planes and their group sums; memoised per thread for the last
    input, so layers fed the same array share them.

    One row: planes ``(1, groups, group_size / 4)``, sums ``(groups,)``. ``R`` rows: planes
    ``(R, 1, groups, group_size / 4)`` (broadcast against a layer's rows), sums
    ``(R, 1, groups)``.
    """
    last = getattr(_local, "last", None)
    if last is not None and last[0] is x and last[1] == group_size:
        return last[2], last[3]
    groups, lanes = x.shape[-1] // group_size, group_size // _LANES
    rows = x.size // x.shape[-1]
    # Made contiguous: x[4j + p] is plane p, position j.
    if rows == 1:
        grid = mx.contiguous(x.reshape(groups, lanes, _LANES).transpose(2, 0, 1))
        sums = grid.sum(axis=(0, 2))
    else:
        grid = mx.contiguous(x.reshape(rows, 1, groups, lanes, _LANES).transpose(4, 0, 1, 2, 3))
        sums = grid.sum(axis=(0, 4))
    planes = [grid[p] if rows > 1 else grid[p : p + 1] for p in range(_LANES)]
    _local.last = (x, group_size, planes, sums)
    return planes, sums


def _ones(n: int) -> mx.array:
    """A column of ones (n, 1): a matrix-vector product against it sums rows."""
    cache: dict[int, mx.array] = _local.__dict__.setdefault("ones", {})
    if n not in cache:
        cache[n] = mx.ones((n, 1), dtype=mx.float32)
    return cache[n]


def quantized_matvec(x: mx.array, weights: PackedViews) -> mx.array:
    """``x @ dequantize(weight, scales, biases).T`` for a few rows ``x`` of shape ``(..., K)``.

    ``weights`` comes from :func:`plane_weights`; see :func:`supports` for what is served.
    The kernel's work and temporary grow with the number of rows (one pass per row), the
    graph does not: six nodes per chunk for one row, seven for several (MLX schedules every
    node from the Python thread, a few microseconds each, hence 2-D matmuls against column
    vectors: no expand/squeeze nodes).
    """
    planes, sums = _planes(x, weights.group_size)
    kernel = _KERNELS[weights.bits]
    per_group = weights.group_size // _LANES
    ones = _ones(per_group)
    groups_ones = _ones(sums.shape[-1])
    count = x.size // x.shape[-1]
    parts = []
    for words, scales, biases in weights.chunks:
        rows, groups = scales.shape
        products = kernel(words, *planes).reshape(count * rows * groups, per_group)
        t = (products @ ones).reshape(count, rows, groups) if count > 1 else (products @ ones)
        if count == 1:
            t = t.reshape(rows, groups)  # sums within each group
            parts.append(_finish_kernel(t, scales, biases, sums) @ groups_ones)  # (rows, 1)
        else:
            done = _finish_kernel(t, scales, biases, sums).reshape(count * rows, groups)
            parts.append((done @ groups_ones).reshape(count, rows))
    if count == 1:
        y = parts[0] if len(parts) == 1 else mx.concatenate(parts)
    else:
        y = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)
    return y.reshape(*x.shape[:-1], weights.rows)
