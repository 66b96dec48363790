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

import mlx.core as mx

__all__ = ["SPLIT_BYTES", "WHOLE_BYTES", "quantized_matvec", "supports"]

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


def _ones(n: int) -> mx.array:
    cache: dict[int, mx.array] = _local.__dict__.setdefault("ones", {})
    if n not in cache:
        cache[n] = mx.ones((n,), dtype=mx.float32)
    return cache[n]


def _planes(x: mx.array, group_size: int) -> tuple[list[mx.array], mx.array]:
    """``x`` (one row) as four contiguous planes and its per-group sums; memoised per thread."""
    last = getattr(_local, "last", None)
    if last is not None and last[0] is x and last[1] == group_size:
        return last[2], last[3]
    k = x.shape[-1]
    row = x.reshape(k)
    # Reshaping the transposed view copies it: each plane becomes a contiguous row.
    grid = row.reshape(k // _LANES, _LANES).T.reshape(_LANES, k // _LANES)
    planes = [grid[p] for p in range(_LANES)]
    sums = row.reshape(k // group_size, group_size).sum(axis=-1)
    _local.last = (x, group_size, planes, sums)
    return planes, sums


def quantized_matvec(
    x: mx.array,
    weight: mx.array,
    scales: mx.array,
    biases: mx.array,
    *,
    bits: int,
    group_size: int,
) -> mx.array:
    """``x @ dequantize(weight, scales, biases).T`` for one row ``x`` of shape ``(..., K)``.

    ``weight`` is MLX's packed uint32 layout (``transpose=True``); see :func:`supports`.
    """
    rows = weight.shape[0]
    groups = x.shape[-1] // group_size
    words = weight.view(_VIEWS[bits])
    planes, sums = _planes(x, group_size)
    per_group = group_size // _LANES
    kernel = _KERNELS[bits]
    row_bytes = 4 * words.shape[1]
    chunk = rows if rows * row_bytes <= WHOLE_BYTES else max(1, SPLIT_BYTES // row_bytes)
    parts = []
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        n = stop - start
        part = words if n == rows else words[start:stop]
        products = kernel(part, *planes)
        t = (products.reshape(n * groups, per_group) @ _ones(per_group)).reshape(n, groups)
        if n != rows:
            scale_part, bias_part = scales[start:stop], biases[start:stop]
        else:
            scale_part, bias_part = scales, biases
        parts.append(_finish_kernel(t, scale_part, bias_part, sums).sum(axis=-1))
    y = parts[0] if len(parts) == 1 else mx.concatenate(parts)
    return y.reshape(*x.shape[:-1], rows)
