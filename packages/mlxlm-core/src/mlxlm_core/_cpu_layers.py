"""CPU stand-ins for rope and RMS norm, whose MLX CPU path is a chain of small operations.

MLX's CPU backend has no kernel for ``mx.fast.rope`` or ``mx.fast.rms_norm``: each call
expands into its composed fallback (~29 graph nodes for a rope, ~11 for an RMS norm), and
MLX schedules every node from the Python thread, a few microseconds each. With the plane
kernel (:mod:`._quant_matvec`) doing the matrix work, a SmolLM2-135M decoding step was
~7,500 nodes, 1,740 of them its 60 ropes; scheduling them cost as much CPU as the arithmetic.

- :class:`SharedRope`: for one new token at an integer offset every layer applies the same
  rotation, so its tables (cosines, signed sines) are built once per step and thread and
  shared; a call is then a product with a fixed permutation matrix (rotate-half or
  rotate-pairs) and one compiled multiply-add: 2-4 nodes. Same formulas as MLX's fallback
  (frequencies ``exp(-i * log(base) / (dims / 2))`` or ``1 / freqs``), equal to it bit for bit.
  Other calls (prompts, per-row offsets, input scaling) keep ``mx.fast.rope``.
- :class:`CompiledRMSNorm`: ``mx.fast.rms_norm`` inside ``mx.compile``, so the fallback's
  elementwise operations run as one fused kernel around the reduction: 4 nodes.

The execution policy applies them on the CPU backend (not in the ``native`` weight mode,
which stays MLX-LM's execution) by switching the class of exact :class:`.models.rope.Rope`
and ``nn.RMSNorm`` instances in place: same objects, same parameters, same saving.
"""

from __future__ import annotations

import math
import threading

import mlx.core as mx
import mlx.nn as nn

from .models.rope import Rope

__all__ = ["CompiledRMSNorm", "SharedRope", "convert_cpu_layers"]

_local = threading.local()


def _rotate(x: mx.array, rotated: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    return x * cos + rotated * sin


_rotate_kernel = mx.compile(_rotate)


def _permutation(dims: int, width: int, traditional: bool, dtype: mx.Dtype) -> mx.array:
    """``x @ P`` swaps the rotated pairs of ``x`` (halves, or neighbours if traditional)."""
    key = (dims, width, traditional, dtype)
    cache: dict = _local.__dict__.setdefault("permutations", {})
    if key not in cache:
        half = dims // 2
        if traditional:
            source = mx.arange(dims).reshape(half, 2)[:, ::-1].reshape(-1)
        else:
            source = mx.concatenate([mx.arange(half, dims), mx.arange(0, half)])
        source = mx.concatenate([source, mx.arange(dims, width)])
        cache[key] = (mx.arange(width)[:, None] == source[None, :]).astype(dtype)
    return cache[key]


class SharedRope(Rope):
    """:class:`Rope` whose one-token, integer-offset calls share one step's tables."""

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        if not isinstance(offset, int) or x.shape[-2] != 1 or self.input_scale != 1.0:
            return super().__call__(x, offset)
        cos, sin = self._tables(offset, x.shape[-1], x.dtype)
        perm = _permutation(self.dims, x.shape[-1], self.traditional, x.dtype)
        return _rotate_kernel(x, x @ perm, cos, sin)

    def _tables(self, offset: int, width: int, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
        freqs = getattr(self, "_freqs", None)
        key = (self.dims, width, self.base, self.scale, self.traditional, offset, dtype)
        last = getattr(_local, "tables", None)
        # `freqs` is compared by identity and held by the entry, so its id is not reused.
        if last is not None and last[0] == key and last[1] is freqs:
            return last[2]
        half = self.dims // 2
        if freqs is None:
            assert self.base is not None
            inverse = mx.exp(mx.arange(0.0, -half, -1.0) * (math.log(self.base) / half))
        else:
            inverse = 1.0 / freqs
        # float32 position times float32 scale, as the fallback does (not a float64 product)
        theta = (mx.array(float(offset)) * mx.array(self.scale, dtype=mx.float32)) * inverse
        cos, sin = mx.cos(theta), mx.sin(theta)
        if self.traditional:
            cos_all = mx.stack([cos, cos], axis=-1).reshape(-1)
            sin_all = mx.stack([-sin, sin], axis=-1).reshape(-1)
        else:
            cos_all = mx.concatenate([cos, cos])
            sin_all = mx.concatenate([-sin, sin])
        if width > self.dims:  # partial rotary: the rest passes through (x * 1 + x * 0)
            cos_all = mx.concatenate([cos_all, mx.ones((width - self.dims,))])
            sin_all = mx.concatenate([sin_all, mx.zeros((width - self.dims,))])
        tables = (cos_all.astype(dtype), sin_all.astype(dtype))
        _local.tables = (key, freqs, tables)
        return tables


_norm_kernels: dict[float, object] = {}
_norm_lock = threading.Lock()


def _norm_kernel(eps: float):
    with _norm_lock:
        if eps not in _norm_kernels:
            _norm_kernels[eps] = mx.compile(lambda x, w: mx.fast.rms_norm(x, w, eps))
        return _norm_kernels[eps]


class CompiledRMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` whose CPU fallback runs fused (see the module docstring)."""

    def __call__(self, x: mx.array) -> mx.array:
        return _norm_kernel(self.eps)(x, self["weight"])  # type: ignore[operator]


_SWAPS: dict[type, type] = {Rope: SharedRope, nn.RMSNorm: CompiledRMSNorm}
_BASES = {swapped: base for base, swapped in _SWAPS.items()}


def convert_cpu_layers(model: nn.Module, *, enabled: bool) -> dict[str, int]:
    """Switch exact ``Rope`` / ``nn.RMSNorm`` instances to the CPU stand-ins (or back).

    Returns how many of each now run the stand-in. Subclasses defined elsewhere (dynamic
    NTK rope, other families' norms) are left alone.
    """
    counts = {"rope": 0, "rms_norm": 0}
    for module in model.modules():
        cls = type(module)
        if enabled and cls in _SWAPS:
            module.__class__ = _SWAPS[cls]
        elif not enabled and cls in _BASES:
            module.__class__ = _BASES[cls]
        if isinstance(module, SharedRope):
            counts["rope"] += 1
        elif isinstance(module, CompiledRMSNorm):
            counts["rms_norm"] += 1
    return counts
