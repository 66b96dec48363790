"""The CPU quantized products against MLX's own quantized kernel: the plane kernel for one
or two rows (mlxlm_core._quant_matvec) and the chunked dequantization for more
(mlxlm_core._quant_matmul, the section at the end).

MLX's ``quantized_matmul`` is the reference: for every supported bit width and group size,
chunked and whole matrices, the kernel must give the same product to float32 rounding. A
float64 numpy product of the dequantized weight checks both. Then whole models: the policy's
``quantized`` mode with the plane kernel must produce the logits the published ``mlx-lm``
computes on the same checkpoint (prompt and cached single-token steps), and greedy decoding
must pick the same tokens as ``native`` (MLX's kernels everywhere).
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlxlm_core import _quant_matmul as qmm
from mlxlm_core import _quant_matvec as qmv
from mlxlm_core import load, save
from mlxlm_core._policy import choose_policy
from mlxlm_core.cache import make_prompt_cache
from mlxlm_core.quantize import quantize_model

pytestmark = pytest.mark.skipif(
    choose_policy(weight_mode="quantized").matvec != "planes",
    reason="the plane kernel needs MLX's CPU backend with its JIT compiler (g++)",
)


def _packed(rows: int, cols: int, bits: int, group_size: int, seed: int):
    w = mx.random.normal((rows, cols), key=mx.random.key(seed))
    return mx.quantize(w, group_size=group_size, bits=bits)


def _ours(x, packed, bits, group_size):
    return qmv.quantized_matvec(x, qmv.plane_weights(*packed, bits=bits, group_size=group_size))


def _reference(x, packed, bits, group_size):
    return mx.quantized_matmul(x, *packed, transpose=True, group_size=group_size, bits=bits)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_matches_mlx_kernel(bits: int, group_size: int) -> None:
    rows, cols = 200, 512
    packed = _packed(rows, cols, bits, group_size, seed=bits * 1000 + group_size)
    x = mx.random.normal((1, 1, cols), key=mx.random.key(7))
    ours = _ours(x, packed, bits, group_size)
    ref = _reference(x, packed, bits, group_size)
    assert ours.shape == ref.shape == (1, 1, rows)
    scale = float(mx.abs(ref).max())
    assert float(mx.abs(ours - ref).max()) <= 2e-6 * scale
    # Both against float64: the dequantized weight times x.
    w64 = np.array(mx.dequantize(*packed, group_size=group_size, bits=bits), dtype=np.float64)
    exact = w64 @ np.array(x, dtype=np.float64).reshape(cols)
    assert np.allclose(np.array(ours).reshape(rows), exact, rtol=0, atol=2e-6 * scale)


def test_chunked_rows_equal_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """A matrix too large for one chunk is split by rows, including a short last chunk."""
    rows, cols, bits, gs = 3000, 256, 8, 32
    packed = _packed(rows, cols, bits, gs, seed=3)
    x = mx.random.normal((cols,), key=mx.random.key(4))
    whole = _ours(x, packed, bits, gs)
    monkeypatch.setattr(qmv, "WHOLE_BYTES", 4096)
    monkeypatch.setattr(qmv, "SPLIT_BYTES", 4 * 64 * 7)  # 7 rows per chunk: 429 chunks
    views = qmv.plane_weights(*packed, bits=bits, group_size=gs)
    assert len(views.chunks) == 429
    chunked = qmv.quantized_matvec(x, views)
    ref = _reference(x[None], packed, bits, gs)[0]
    assert chunked.shape == (rows,)
    assert float(mx.abs(chunked - whole).max()) <= 1e-6 * float(mx.abs(ref).max())
    assert float(mx.abs(chunked - ref).max()) <= 2e-6 * float(mx.abs(ref).max())


def test_inputs_shared_between_layers_and_not_confused() -> None:
    """Planes of an input are reused for the next layer given the same array, never another."""
    cols = 256
    a, b = _packed(64, cols, 4, 32, seed=10), _packed(96, cols, 4, 32, seed=11)
    c = _packed(48, cols, 4, 64, seed=14)  # same input, other group size: other group sums
    x = mx.random.normal((1, cols), key=mx.random.key(12))
    y = mx.random.normal((1, cols), key=mx.random.key(13))
    cases = [(x, a, 32), (x, b, 32), (x, c, 64), (y, a, 32), (x, a, 32)]
    outs = [_ours(v, m, 4, g) for v, m, g in cases]
    for ours, (v, m, g) in zip(outs, cases):
        ref = _reference(v, m, 4, g)
        assert float(mx.abs(ours - ref).max()) <= 2e-6 * float(mx.abs(ref).max())


@pytest.mark.parametrize("count", [2, 3, 7])
def test_several_rows_match_mlx_kernel(count: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A few rows (a small batch, speculative verification) in one pass of the graph."""
    rows, cols, bits, gs = 700, 256, 4, 32
    packed = _packed(rows, cols, bits, gs, seed=20 + count)
    x = mx.random.normal((count, 1, cols), key=mx.random.key(21))
    ref = _reference(x, packed, bits, gs)
    whole = _ours(x, packed, bits, gs)
    monkeypatch.setattr(qmv, "WHOLE_BYTES", 4096)
    monkeypatch.setattr(qmv, "SPLIT_BYTES", 4 * 64 * 50)  # chunks of 50 // count rows
    views = qmv.plane_weights(*packed, bits=bits, group_size=gs, inputs=count)
    assert len(views.chunks) == -(-rows // (50 // count))
    chunked = qmv.quantized_matvec(x, views)
    # A matrix of 1-4x WHOLE_BYTES of temporary goes in even chunks of at most that.
    monkeypatch.setattr(qmv, "WHOLE_BYTES", 256 * count * rows // 3 + 1)
    even = qmv.plane_weights(*packed, bits=bits, group_size=gs, inputs=count)
    assert [c[1].shape[0] for c in even.chunks] == [234, 234, 232]
    scale = float(mx.abs(ref).max())
    for ours in (whole, chunked, qmv.quantized_matvec(x, even)):
        assert ours.shape == ref.shape == (count, 1, rows)
        assert float(mx.abs(ours - ref).max()) <= 2e-6 * scale


def test_layer_routes_rows_and_matches_mlx(mixed_dir: Path) -> None:
    """Below PLANE_ROWS rows the plane kernel, up to WIDE_MAX_ROWS the chunked
    dequantization, more the whole layer dequantized: all equal MLX's kernel."""
    from mlxlm_core._policy_layers import PLANE_ROWS, WIDE_MAX_ROWS

    model, _ = load(mixed_dir)
    layer = model.model.layers[0].mlp.up_proj
    cols = layer.scales.shape[1] * layer.group_size
    for count in (1, PLANE_ROWS - 1, PLANE_ROWS, 7, 8, WIDE_MAX_ROWS, WIDE_MAX_ROWS + 1):
        x = mx.random.normal((1, count, cols), key=mx.random.key(count))
        ref = mx.quantized_matmul(
            x, layer.weight, layer.scales, layer.biases, transpose=True, group_size=32, bits=4
        )
        assert float(mx.abs(layer(x) - ref).max()) <= 2e-6 * float(mx.abs(ref).max())
    # Views were made per power-of-two row count for the plane kernel (1 and 2 here), and
    # once (key 0) for the chunked dequantization.
    assert sorted(layer._planes) == [0, 1, 2]


def test_unsupported_inputs_are_refused() -> None:
    x32 = mx.zeros((1, 256))
    scales = mx.zeros((4, 8))
    assert qmv.supports(x32, 4, 32, "affine", scales)
    assert not qmv.supports(x32, 3, 32, "affine", scales)  # 3-bit words straddle lanes
    assert not qmv.supports(x32, 4, 32, "mxfp4", scales)
    assert not qmv.supports(x32.astype(mx.float16), 4, 32, "affine", scales)
    assert not qmv.supports(x32, 4, 32, "affine", scales.astype(mx.bfloat16))


@pytest.fixture(scope="module")
def mixed_dir(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with 4-bit layers and an 8-bit embedding (the default model's layout)."""
    model, tokenizer, config = load(tiny, return_config=True)
    block = quantize_model(
        model,
        bits=4,
        group_size=32,
        predicate=lambda path, module: (
            {"bits": 8, "group_size": 32} if isinstance(module, nn.Embedding) else True
        ),
    )
    return save(
        tmp_path_factory.mktemp("mixed") / "q", model, tokenizer, {**config, "quantization": block}
    )


PROMPT = mx.array([[5, 17, 42, 8, 99, 3, 250, 7, 61, 12, 30, 44]])


def _logits(model: nn.Module, cache_factory) -> list[mx.array]:
    cache = cache_factory(model)
    outs = [model(PROMPT, cache=cache)[:, -1]]
    for token in (9, 77, 4, 123, 6):
        outs.append(model(mx.array([[token]]), cache=cache)[:, -1])
    mx.eval(outs)
    return outs


def test_model_logits_match_mlx_lm(mixed_dir: Path) -> None:
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    from mlx_lm.models.cache import make_prompt_cache as peer_cache

    ours, _ = load(mixed_dir, weight_mode="quantized")
    assert ours.policy.matvec == "planes"
    assert "matvec=planes" in ours.policy.describe()
    theirs, _ = mlx_lm_utils.load_model(mixed_dir)
    for a, b in zip(_logits(ours, make_prompt_cache), _logits(theirs, peer_cache)):
        scale = float(mx.abs(b).max())
        assert float(mx.abs(a - b).max()) <= 1e-5 * max(scale, 1.0)


@pytest.mark.parametrize("rows", [2, 3, 5])
def test_batched_logits_match_mlx_lm(mixed_dir: Path, rows: int) -> None:
    """Batched decoding steps (plane kernel for 2 rows, chunked dequantization from 3, on
    every 4-bit layer and the 8-bit output layer) against mlx-lm on the same inputs."""
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    from mlx_lm.models.cache import make_prompt_cache as peer_cache

    ours, _ = load(mixed_dir)
    theirs, _ = mlx_lm_utils.load_model(mixed_dir)
    prompts = mx.random.randint(0, 256, (rows, 9), key=mx.random.key(rows))
    steps = mx.random.randint(0, 256, (4, rows, 1), key=mx.random.key(rows + 1))
    results = []
    for model, cache_factory in ((ours, make_prompt_cache), (theirs, peer_cache)):
        cache = cache_factory(model)
        outs = [model(prompts, cache=cache)[:, -1]]
        outs += [model(step, cache=cache)[:, -1] for step in steps]
        mx.eval(outs)
        results.append(outs)
    for a, b in zip(*results):
        assert a.shape == (rows, b.shape[-1])
        assert float(mx.abs(a - b).max()) <= 1e-5 * max(float(mx.abs(b).max()), 1.0)


def test_greedy_tokens_match_native(mixed_dir: Path) -> None:
    from mlxlm_core import generate_step

    planes, _ = load(mixed_dir)  # auto: quantized with the plane kernel on this CPU
    native, _ = load(mixed_dir, weight_mode="native")
    assert planes.policy.weight_mode == "quantized" and planes.policy.matvec == "planes"
    prompt = PROMPT[0]
    ours = [t for t, _ in generate_step(prompt, planes, max_tokens=24)]
    ref = [t for t, _ in generate_step(prompt, native, max_tokens=24)]
    assert ours == ref


# --- chunked dequantization (_quant_matmul): odd and even row counts, whole and chunked
# matrices, against MLX's kernel and a float64 numpy product of the dequantized weight.


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("count", [2, 5, 33])
def test_chunked_dequantization_matches_mlx_kernel(bits: int, group_size: int, count: int) -> None:
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
def test_chunked_dequantization_in_row_chunks_equals_whole(
    count: int, monkeypatch: pytest.MonkeyPatch
) -> None:
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


def test_chunked_dequantization_shares_inputs_between_layers_only() -> None:
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
