"""Products of several rows with affine-quantized weights on MLX's CPU backend: dequantize
in cache-sized chunks with compiled elementwise kernels, multiply with the BLAS.

Why: the plane kernel (:mod:`._quant_matvec`) makes one pass over the weights per input
row, so its cost grows with the rows of a batch; dequantizing once and handing the BLAS a
float matrix costs the same for 2 rows or 32. MLX's own ``mx.dequantize`` is a scalar loop
on CPU (~1 ns per 4-bit weight, ~3.5 ns per 8-bit one: ~95 ms for SmolLM2-135M's 8-bit
output layer), and an elementwise kernel that broadcasts a group's scale over its values
runs MLX's strided code path (~0.7 ns per weight). This module keeps every elementwise
kernel on the contiguous, vectorised path:

- the packed uint32 words are viewed as integers of four quantized values each (as the
  plane kernel does); a compiled kernel with four outputs turns them into four float
  "planes" ``W_p[n, j] = q_p[n, j] * scale[n, j]`` (``q_p[n, j]`` is value ``4j + p`` of
  row ``n``), the scale repeated over its group by one BLAS outer product beforehand
  (``scales`` as a column times a row of ones: a contiguous array one plane large);
- ``y = sum_p x_p @ W_p.T + group_sums(x) @ biases.T`` with ``x_p[j] = x[4j + p]``: four
  BLAS products chained by ``addmm`` onto the biases' share, which is itself a small product
  (``biases`` is ``rows x groups``), so biases are never repeated;
- a matrix goes in chunks of rows whose float planes take at most ``CHUNK_BYTES`` (the
  BLAS then reads them from the cache the kernel just wrote them to, and the temporaries in
  flight stay a few MB: peak memory is the packed weights' plus a few chunks).

Only the summation order differs from MLX's ``quantized_matmul`` (float32 rounding).
Used by :mod:`._policy_layers` for inputs of ``wide_rows`` or more rows on CPU
(batched decoding, prompt chunks); fewer rows take the plane kernel.
"""

from __future__ import annotations

import threading

import mlx.core as mx

from ._quant_matvec import _LANES, _VIEWS, PackedViews

__all__ = ["CHUNK_BYTES", "dequantized_matmul", "wide_weights"]


# Float planes per chunk, at most (4 bytes per weight). MLX allocates the outputs of the
# operations it has queued ahead of running them: about ten chunks are in flight. Measured
# on SmolLM2-135M's 8-bit output layer (4 / 32 rows): 1 MB chunks left 11 / 18 MB of
# temporaries, 4 MB ones 41 / 47 MB for the same time; in a 4-row decoding step 4 MB
# chunks saved ~5% of the CPU (fewer graph nodes) for twice the temporaries, 256 KB ones
# cost ~70% more.
CHUNK_BYTES = 1 << 20


def _dequant_kernel(bits: int):
    mask = (1 << bits) - 1

    def planes(words: mx.array, scales: mx.array):
        p0 = (words & mask).astype(mx.float32) * scales
        p1 = ((words >> bits) & mask).astype(mx.float32) * scales
        p2 = ((words >> (2 * bits)) & mask).astype(mx.float32) * scales
        p3 = (words >> (3 * bits)).astype(mx.float32) * scales  # top lane: no mask needed
        return p0, p1, p2, p3

    return mx.compile(planes)


_KERNELS = {bits: _dequant_kernel(bits) for bits in _VIEWS}
_local = threading.local()


def wide_weights(
    weight: mx.array, scales: mx.array, biases: mx.array, *, bits: int, group_size: int
) -> PackedViews:
    """Views of MLX's packed layout (uint32, ``transpose=True``) for
    :func:`dequantized_matmul`, chunked by rows: per chunk of ``m`` rows the words as
    ``(m, K / 4)``, the scales as a column ``(m * groups, 1)`` and the biases
    ``(m, groups)``."""
    rows, groups = scales.shape
    per_group = group_size // _LANES
    words = weight.view(_VIEWS[bits]).reshape(rows, groups * per_group)
    column = scales.reshape(rows * groups, 1)
    count = -(-rows * groups * group_size * 4 // CHUNK_BYTES)  # chunks of even size
    step = -(-rows // count)
    chunks = tuple(
        (words[i : i + step], column[i * groups : (i + step) * groups], biases[i : i + step])
        for i in range(0, rows, step)
    )
    return PackedViews(rows, bits, group_size, chunks, (weight, scales, biases))


def _inputs(x: mx.array, group_size: int) -> tuple[list[mx.array], mx.array]:
    """``x``'s rows as four transposed planes ``(K / 4, R)`` and transposed group sums
    ``(groups, R)``; memoised per thread for the last input, so layers fed the same array
    (q/k/v, gate/up) share them."""
    last = getattr(_local, "last", None)
    if last is not None and last[0] is x and last[1] == group_size:
        return last[2], last[3]
    cols = x.shape[-1]
    groups, lanes = cols // group_size, group_size // _LANES
    count = x.size // cols
    # grid[p, g, j, r] = x[r, g * group_size + 4j + p]
    grid = mx.contiguous(x.reshape(count, groups, lanes, _LANES).transpose(3, 1, 2, 0))
    sums = grid.sum(axis=(0, 2))
    flat = grid.reshape(_LANES, groups * lanes, count)
    planes = [flat[p] for p in range(_LANES)]  # sliced once, not per layer
    _local.last = (x, group_size, planes, sums)
    return planes, sums


def _ones(n: int) -> mx.array:
    """A row of ones ``(1, n)``: a column times it repeats each entry ``n`` times."""
    cache: dict[int, mx.array] = _local.__dict__.setdefault("ones", {})
    if n not in cache:
        cache[n] = mx.ones((1, n), dtype=mx.float32)
    return cache[n]


def dequantized_matmul(x: mx.array, weights: PackedViews) -> mx.array:
    """``x @ dequantize(weight, scales, biases).T`` for ``x`` of shape ``(..., K)``.

    ``weights`` comes from :func:`wide_weights`; the same inputs as the plane kernel are
    served (``_quant_matvec.supports``). Per chunk: an outer product, a reshape, the
    kernel and five BLAS products, whatever the number of rows; the product is built
    transposed, ``(rows, R)`` (``W_p @ x_p^T``), so no chunk needs a transposed view.
    (Wrapping this in ``mx.compile`` saved ~3% of a step's CPU: not worth a trace per
    layer shape and row count.)
    """
    planes, sums = _inputs(x, weights.group_size)
    kernel = _KERNELS[weights.bits]
    ones = _ones(weights.group_size // _LANES)
    parts = []
    for words, column, biases in weights.chunks:
        w = kernel(words, (column @ ones).reshape(words.shape))
        y = biases @ sums
        for p in range(_LANES):
            y = mx.addmm(y, w[p], planes[p])
        parts.append(y)
    y = parts[0] if len(parts) == 1 else mx.concatenate(parts)
    return y.T.reshape(*x.shape[:-1], weights.rows)
