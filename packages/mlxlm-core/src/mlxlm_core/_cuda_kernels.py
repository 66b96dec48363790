"""Matrix-vector kernels for one-row decoding on MLX's CUDA backend (``mx.fast.cuda_kernel``).

Why: decoding one token at a time is bound by how fast the weights stream from memory and,
on MLX's CUDA backend, by the host cost of every operation (~5 us each, measured on an
H200; a Llama-3.2-1B step is ~450 operations). These kernels stream the weights with
16-byte loads, many in flight per lane, optionally split each row's dot product over several
warps of a block, and fold the neighbouring elementwise work into the same launch:

- ``linear(x, w, norm=, residual=)``: ``residual + rms_norm(x, norm) @ w.T`` (both optional).
  The norm is fused by scaling each dot product afterwards by ``rsqrt(mean(x**2) + eps)``;
- ``swiglu(x, gate, up, norm=)``: ``silu(h @ gate.T) * (h @ up.T)`` in one pass;
- ``multi_linear(x, [wq, wk, wv], norm=, rope=)``: several projections of one input in one
  launch, one output each (the weights stay separate arrays: no concatenated copy), with
  rotary embeddings applied to the leading outputs in the epilogue.

Weights are bfloat16/float16 arrays or :class:`Q4` (MLX's affine 4-bit packing, as in
``nn.QuantizedLinear``). Accumulation is float32; activations and outputs keep ``x``'s dtype.
``x`` holds ``rows`` (<= :data:`MAX_ROWS`) rows of ``K`` features, ``K`` a multiple of 256
(1024 for 4-bit weights). The CUDA source is in :mod:`._cuda_kernel_source`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx

from ._cuda_kernel_source import HEADER, kernel_source

__all__ = [
    "MAX_ROWS",
    "Q4",
    "Rotary",
    "Tuning",
    "in_features",
    "linear",
    "multi_linear",
    "supported",
    "swiglu",
]

MAX_ROWS = 4  # activation rows one launch handles (decoding a batch of one has 1)
Q4_GROUPS = (32, 64, 128)


@dataclass(frozen=True)
class Tuning:
    """Launch shape.

    ``warps`` per block; ``rows_per_warp`` weight rows each warp accumulates; ``unroll``
    steps (16 bytes of weights per lane each) whose loads are all issued before any
    arithmetic; ``ksplit`` warps sharing one row group's dot products, each over a slice of
    ``K``, summed through shared memory (more loads in flight for matrices with few rows;
    lowered to a divisor of the number of steps when ``K`` is short).
    """

    warps: int = 4
    rows_per_warp: int = 2
    unroll: int = 8
    ksplit: int = 1


DEFAULT_TUNING = Tuning()


@dataclass(frozen=True)
class Q4:
    """A 4-bit affine-quantized weight: ``(N, K / 8)`` uint32 plus ``(N, K / group)`` scales
    and biases (``w = scale * q + bias``), as ``nn.QuantizedLinear`` stores it."""

    weight: mx.array
    scales: mx.array
    biases: mx.array
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.weight.shape[0], self.weight.shape[1] * 8)

    @property
    def dtype(self) -> mx.Dtype:
        return self.scales.dtype


Weight = mx.array | Q4


@dataclass(frozen=True)
class Rotary:
    """Rotary embedding applied by :func:`multi_linear` to its first ``count`` outputs.

    ``periods``: float32 ``(head_dim / 2,)``, the angle of pair ``j`` at position ``p`` being
    ``scale * p / periods[j]`` (what ``mx.fast.rope`` computes from ``base`` or ``freqs``);
    ``offset``: int32 ``(1,)`` array, the position of the (single) row. It should be made on
    the device (see ``_cuda_layers``): an array written by the host is migrated to the GPU
    when the kernel reads it, which once cost ~15 us per launch.
    """

    periods: mx.array
    offset: mx.array
    head_dim: int
    scale: float = 1.0
    traditional: bool = False
    count: int = 2


_kernels: dict[tuple, object] = {}

# Tests set this to NaN so that an output element the kernel fails to write shows up.
POISON: float | None = None


def in_features(w: Weight) -> int:
    return w.shape[1]


def supported(x: mx.array, *weights: Weight) -> bool:
    """Whether these kernels can take ``x @ w.T`` for every ``w`` (else use MLX's matmul)."""
    if x.dtype not in (mx.bfloat16, mx.float16) or not weights:
        return False
    k = in_features(weights[0])
    quant = isinstance(weights[0], Q4)
    if k % (1024 if quant else 256) or x.size % k or not 1 <= x.size // k <= MAX_ROWS:
        return False
    for w in weights:
        if isinstance(w, Q4) != quant or in_features(w) != k or w.dtype != x.dtype:
            return False
        if isinstance(w, Q4) and (w.group_size not in Q4_GROUPS or w.weight.dtype != mx.uint32):
            return False
    groups = {w.group_size for w in weights if isinstance(w, Q4)}
    return len(groups) <= 1


def _kernel(kind: str, n_weights: int, **options):
    """The compiled kernel for ``kernel_source(kind, n_weights, **options)``, made once."""
    key = (kind, n_weights, *sorted(options.items()))
    if key not in _kernels:
        names, outs, body = kernel_source(kind, n_weights, **options)
        # MLX's JIT cache is keyed by name: the name must tell every source apart.
        digest = hashlib.sha1(body.encode()).hexdigest()[:12]
        _kernels[key] = mx.fast.cuda_kernel(
            name=f"mlxlm_{kind}{n_weights}_{digest}",
            input_names=names,
            output_names=outs,
            source=body,
            header=HEADER,
        )
    return _kernels[key]


def _launch(
    kind: str,
    x: mx.array,
    weights: Sequence[Weight],
    *,
    norm: mx.array | None,
    eps: float,
    residual: mx.array | None,
    rope: Rotary | None,
    shapes: list[tuple[int, ...]],
    tune: Tuning,
    cache: tuple[mx.array, mx.array] | None = None,
) -> list[mx.array]:
    k = in_features(weights[0])
    rows = x.size // k
    n_out = [w.shape[0] for w in weights]
    per_warp = tune.rows_per_warp
    if any(n % per_warp for n in n_out):
        raise ValueError(f"output sizes {n_out} must be multiples of {per_warp}")
    if tune.warps % tune.ksplit:
        raise ValueError(f"ksplit {tune.ksplit} must divide {tune.warps} warps")
    if rope is not None and (per_warp != 2 or rows != 1):
        raise ValueError("rotary outputs need 2 rows per warp and a single input row")
    group = weights[0].group_size if isinstance(weights[0], Q4) else None
    steps = k // (1024 if group else 256)
    ksplit = math.gcd(tune.ksplit, steps)
    total = n_out[0] if kind == "swiglu" else sum(n_out)
    rope_key = (rope.traditional, rope.count, rope.scale) if rope is not None else None
    kernel = _kernel(
        kind,
        len(weights),
        quant_group=group,
        norm=norm is not None,
        residual=residual is not None,
        eps=float(eps) if norm is not None else 0.0,  # unused without a norm: one kernel
        rope=rope_key,
        cache_write=cache is not None,
    )
    inputs = [x]
    for w in weights:
        inputs += [w.weight, w.scales, w.biases] if isinstance(w, Q4) else [w]
    inputs += [norm] if norm is not None else []
    inputs += [residual] if residual is not None else []
    template: list[tuple[str, object]] = [
        ("T", x.dtype),
        ("K", k),
        ("M", rows),
        ("R", per_warp),
        ("N_TOTAL", total),
        ("WARPS", tune.warps),
        ("KS", ksplit),
        ("UNROLL", tune.unroll),
    ]
    if kind == "multi":
        template += [(f"N{i}", n) for i, n in enumerate(n_out)]
    if rope is not None:
        inputs += [rope.periods, rope.offset]
        template.append(("HD", rope.head_dim))
    if cache is not None:
        inputs += list(cache)
        shapes = shapes[:1]
    if group:
        template.append(("QG", group))
    groups = tune.warps // ksplit
    blocks = -(-(total // per_warp) // groups)
    return kernel(  # type: ignore[operator]
        inputs=inputs,
        template=template,
        grid=(blocks * tune.warps * 32, 1, 1),
        threadgroup=(tune.warps * 32, 1, 1),
        output_shapes=shapes,
        output_dtypes=[x.dtype] * len(shapes),
        init_value=POISON,
    )


def _out_shape(x: mx.array, k: int, n: int) -> tuple[int, ...]:
    return (*x.shape[:-1], n) if x.shape[-1] == k else (x.size // k, n)


def linear(
    x: mx.array,
    w: Weight,
    *,
    norm: mx.array | None = None,
    eps: float = 1e-5,
    residual: mx.array | None = None,
    tune: Tuning = DEFAULT_TUNING,
) -> mx.array:
    """``residual + rms_norm(x, norm, eps) @ w.T`` (norm and residual optional).

    ``x`` may be any contiguous array of ``rows * K`` elements (an attention output laid out
    as ``(1, heads, 1, head_dim)``, say); the result has the residual's shape if one is given.
    """
    shape = residual.shape if residual is not None else _out_shape(x, w.shape[1], w.shape[0])
    return _launch(
        "linear",
        x,
        [w],
        norm=norm,
        eps=eps,
        residual=residual,
        rope=None,
        shapes=[shape],
        tune=tune,
    )[0]


def swiglu(
    x: mx.array,
    gate: Weight,
    up: Weight,
    *,
    norm: mx.array | None = None,
    eps: float = 1e-5,
    tune: Tuning = DEFAULT_TUNING,
) -> mx.array:
    """``silu(h @ gate.T) * (h @ up.T)`` with ``h = rms_norm(x, norm, eps)`` (norm optional)."""
    if gate.shape != up.shape:
        raise ValueError(f"gate {gate.shape} and up {up.shape} differ")
    shape = _out_shape(x, gate.shape[1], gate.shape[0])
    return _launch(
        "swiglu",
        x,
        [gate, up],
        norm=norm,
        eps=eps,
        residual=None,
        rope=None,
        shapes=[shape],
        tune=tune,
    )[0]


def multi_linear(
    x: mx.array,
    weights: Sequence[Weight],
    *,
    norm: mx.array | None = None,
    eps: float = 1e-5,
    rope: Rotary | None = None,
    shapes: Sequence[tuple[int, ...]] | None = None,
    tune: Tuning = DEFAULT_TUNING,
    cache: tuple[mx.array, mx.array] | None = None,
) -> list[mx.array]:
    """``[h @ w.T for w in weights]`` with ``h = rms_norm(x, norm, eps)``, in one launch.

    ``rope`` rotates the first ``rope.count`` outputs (one input row only); ``shapes`` gives
    each output's shape (same sizes), e.g. ``(1, heads, 1, head_dim)`` for attention.

    ``cache``: ``(keys, values)`` buffers ``(1, kv_heads, capacity, head_dim)``, for q/k/v
    weights with rotary: the kernel writes k and v into them *in place* at slot
    ``rope.offset[0]`` and returns only ``[q]``. MLX knows nothing of that write, so the
    buffers must be row-contiguous (else MLX hands the kernel a copy) and referenced by
    nothing that expects them unchanged: ``KVCache.append_in_place`` gives such buffers.
    Reads of the new slot must depend on ``q`` (they do: attention takes it), which orders
    them after this launch.
    """
    if cache is not None and (rope is None or len(weights) != 3):
        raise ValueError("cache writes need q, k and v weights with rotary")
    k = in_features(weights[0])
    out_shapes = (
        list(shapes) if shapes is not None else [_out_shape(x, k, w.shape[0]) for w in weights]
    )
    return _launch(
        "multi",
        x,
        list(weights),
        norm=norm,
        eps=eps,
        residual=None,
        rope=rope,
        shapes=out_shapes,
        tune=tune,
        cache=cache,
    )
