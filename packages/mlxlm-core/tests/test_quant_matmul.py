"""The chunked dequantization (mlxlm_core._quant_matmul) against MLX's own quantized kernel.

MLX's ``quantized_matmul`` is the reference: for every bit width and group size the plane
kernel supports, odd and even row counts, whole and chunked matrices, the product must be
the same to float32 rounding; a float64 numpy product of the dequantized weight checks both.
Layer routing (plane kernel / chunked / whole dequantization by row count) and whole models
against the published ``mlx-lm`` are in test_quant_matvec.py.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlxlm_core import _quant_matmul as qmm
from mlxlm_core._policy import choose_policy

pytestmark = pytest.mark.skipif(
    choose_policy(weight_mode="quantized").matvec != "planes",
    reason="the kernels need MLX's CPU backend with its JIT compiler (g++)",
)


def _packed(rows: int, cols: int, bits: int, group_size: int, seed: int):
    w = mx.random.normal((rows, cols), key=mx.random.key(seed))
    return mx.quantize(w, group_size=group_size, bits=bits)


def _reference(x, packed, bits, group_size):
    return mx.quantized_matmul(x, *packed, transpose=True, group_size=group_size, bits=bits)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("count", [2, 5, 33])
def test_matches_mlx_kernel(bits: int, group_size: int, count: int) -> None:
    rows, cols = 200, 512
    packed = _packed(rows, cols, bits, group_size, seed=bits * 1000 + group_size + count)
    x = mx.random.normal((count, 1, cols), key=mx.random.key(count))
    ours = qmm.dequantized_matmul(x, qmm.wide_weights(*packed, bits=bits, group_size=group_size))
    ref = _reference(x, packed, bits, group_size)
    assert ours.shape == ref.shape == (count, 1, rows)
    scale = float(mx.abs(ref).max())
    assert float(mx.abs(ours - ref).max()) <= 2e-6 * scale
    w64 = np.array(mx.dequantize(*packed, group_size=group_size, bits=bits), dtype=np.float64)
    exact = np.array(x, dtype=np.float64).reshape(count, cols) @ w64.T
    assert np.allclose(np.array(ours).reshape(count, rows), exact, rtol=0, atol=2e-6 * scale)


@pytest.mark.parametrize("count", [3, 8])
def test_chunked_rows_equal_whole(count: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A matrix larger than a chunk is split into even chunks of rows (the last shorter)."""
    rows, cols, bits, gs = 1000, 256, 8, 32
    packed = _packed(rows, cols, bits, gs, seed=3)
    x = mx.random.normal((count, cols), key=mx.random.key(4))
    whole = qmm.dequantized_matmul(x, qmm.wide_weights(*packed, bits=bits, group_size=gs))
    monkeypatch.setattr(qmm, "CHUNK_BYTES", 4 * cols * 7)  # 7 rows per chunk: 143 chunks
    views = qmm.wide_weights(*packed, bits=bits, group_size=gs)
    assert len(views.chunks) == 143 and sum(c[2].shape[0] for c in views.chunks) == rows
    chunked = qmm.dequantized_matmul(x, views)
    ref = _reference(x, packed, bits, gs)
    scale = float(mx.abs(ref).max())
    assert chunked.shape == whole.shape == (count, rows)
    assert float(mx.abs(chunked - whole).max()) <= 1e-6 * scale
    assert float(mx.abs(chunked - ref).max()) <= 2e-6 * scale


def test_inputs_shared_between_layers_and_not_confused() -> None:
    """An input's planes are reused for the next layer given the same array, never another."""
    cols = 256
    a, b = _packed(64, cols, 4, 32, seed=10), _packed(96, cols, 2, 32, seed=11)
    c = _packed(48, cols, 4, 64, seed=14)  # same input, other group size: other planes
    x = mx.random.normal((3, cols), key=mx.random.key(12))
    y = mx.random.normal((3, cols), key=mx.random.key(13))
    cases = [(x, a, 4, 32), (x, b, 2, 32), (x, c, 4, 64), (y, a, 4, 32), (x, a, 4, 32)]
    for v, m, bits, g in cases:
        ours = qmm.dequantized_matmul(v, qmm.wide_weights(*m, bits=bits, group_size=g))
        ref = _reference(v, m, bits, g)
        assert float(mx.abs(ours - ref).max()) <= 2e-6 * float(mx.abs(ref).max())
