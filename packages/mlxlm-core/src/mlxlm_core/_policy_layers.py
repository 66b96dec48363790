"""Quantized layers whose matmul follows the execution policy (see :mod:`._policy`).

They are ``nn.QuantizedLinear`` / ``nn.QuantizedEmbedding`` in every respect that other code
sees (``isinstance``, parameters, saving, adapters, fusing): the packed weight, scales and
biases stay the parameters. Only the product changes, in one of these ways:

- a *dense copy*: a float weight kept beside the packed one, under an ``_``-prefixed key so
  MLX never treats it as a parameter (it is not saved, trained or counted as one). Every
  product is then a float matmul, which an optimised BLAS runs 5-20x faster on CPU than
  MLX's quantized kernels;
- *dequantize on the fly*: when the input has at least ``dequantize_rows`` rows (a prompt
  chunk, a batch), the layer's weight is dequantized for this call only and multiplied as
  float (with the kernels below: more than ``WIDE_MAX_ROWS`` rows, prompt chunks; without
  them, from ``dequantize_rows`` rows). Memory stays that of the packed weights plus one
  layer's float weight;
- *plane kernel* for inputs of fewer than ``PLANE_ROWS`` rows (``matvec=True``): decoding
  one sequence or two. :func:`._quant_matvec.quantized_matvec` uses MLX's compiled
  elementwise kernels and the BLAS instead of MLX's scalar quantized kernel (3-4x faster
  on CPU for one row), on the packed weights as they are;
- *chunked dequantization* for ``PLANE_ROWS`` to ``WIDE_MAX_ROWS`` rows (``matvec=True``):
  batched decoding, speculative verification. :func:`._quant_matmul.dequantized_matmul`
  dequantizes ~1 MB of rows at a time with contiguous compiled kernels (4-5x faster than
  ``mx.dequantize`` on CPU) into the BLAS, so temporaries stay a few MB.

A dense copy goes stale if the packed weight is replaced (``load_weights``, ``update``): each
call checks that the arrays it was made from are still the layer's, and rebuilds otherwise.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ._quant_matmul import dequantized_matmul, wide_weights
from ._quant_matvec import PackedViews, plane_weights, quantized_matvec, supports

__all__ = [
    "PolicyQuantizedEmbedding",
    "PolicyQuantizedLinear",
    "convert_quantized_layers",
    "dense_bytes",
    "dense_copies",
]


def _dequantized(layer: nn.Module) -> mx.array:
    return mx.dequantize(
        layer["weight"],
        layer["scales"],
        layer.get("biases"),
        group_size=layer.group_size,
        bits=layer.bits,
        mode=layer.mode,
    )


def _rows(x: mx.array) -> int:
    rows = 1
    for d in x.shape[:-1]:
        rows *= d
    return rows


class _PolicyMixin:
    """Shared state: an optional dense copy, the row threshold for dequantizing and whether
    single rows take the plane kernel."""

    _dequantize_rows: int | None = None
    _matvec: bool = False

    def configure(self, *, dense: bool, dequantize_rows: int | None, matvec: bool = False) -> None:
        self._dequantize_rows = dequantize_rows
        self._matvec = matvec
        if dense:
            if self.dense_weight() is None:  # made once; rebuilt only if the weight changed
                self._refresh()
        else:
            self.pop("_dense", None)  # type: ignore[attr-defined]
            self.pop("_dense_of", None)  # type: ignore[attr-defined]

    def _refresh(self) -> mx.array:
        source = (self["weight"], self["scales"])  # type: ignore[index]
        self._dense = _dequantized(self)  # type: ignore[arg-type]
        self._dense_of = source
        return self._dense

    def dense_weight(self) -> mx.array | None:
        """The float copy if this layer keeps one (rebuilt if the packed weight changed)."""
        if "_dense" not in self:  # type: ignore[operator]
            return None
        weight, scales = self._dense_of
        if weight is not self["weight"] or scales is not self["scales"]:  # type: ignore[index]
            return self._refresh()
        return self._dense

    def _float_weight(self, x: mx.array) -> mx.array | None:
        dense = self.dense_weight()
        if dense is not None:
            return dense
        if self._dequantize_rows is not None and _rows(x) >= self._dequantize_rows:
            return _dequantized(self)  # type: ignore[arg-type]
        return None

    def _plane_product(self, x: mx.array) -> mx.array | None:
        """``x`` times the packed weights without dequantizing the layer whole, or None where
        that does not apply (no plane kernel, a dense copy, an unsupported layer, more than
        ``WIDE_MAX_ROWS`` rows): the plane kernel below ``PLANE_ROWS`` rows, else
        :func:`._quant_matmul.dequantized_matmul` (chunked dequantization into the BLAS)."""
        rows = _rows(x)
        if not self._matvec or rows > WIDE_MAX_ROWS or "biases" not in self:  # type: ignore[operator]
            return None
        if self.dense_weight() is not None:
            return None
        bits, group_size = self.bits, self.group_size  # type: ignore[attr-defined]
        mode = getattr(self, "mode", "affine")
        source = (self["weight"], self["scales"], self["biases"])  # type: ignore[index]
        if not supports(x, bits, group_size, mode, source[1]):
            return None
        # Views of the packed weights (no memory), made once and remade if the weights were
        # replaced: for the plane kernel per power-of-two row count (its chunks shrink as
        # rows grow), key 0 for the chunked dequantization.
        bucket = 1 << (rows - 1).bit_length() if rows < PLANE_ROWS else 0
        views: dict[int, PackedViews] = getattr(self, "_planes", None) or {}
        made = views.get(bucket)
        if made is None or not _same(made.source, source):
            if bucket:
                made = plane_weights(*source, bits=bits, group_size=group_size, inputs=bucket)
            else:
                made = wide_weights(*source, bits=bits, group_size=group_size)
            views = {k: v for k, v in views.items() if _same(v.source, source)}
            views[bucket] = made
            object.__setattr__(self, "_planes", views)
        return quantized_matvec(x, made) if bucket else dequantized_matmul(x, made)


def _same(a: tuple[mx.array, ...], b: tuple[mx.array, ...]) -> bool:
    return all(x is y for x, y in zip(a, b))


class PolicyQuantizedLinear(_PolicyMixin, nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        y = self._plane_product(x)
        if y is not None:
            return y + self["bias"] if "bias" in self else y
        weight = self._float_weight(x)
        if weight is None:
            return super().__call__(x)
        if "bias" in self:
            return mx.addmm(self["bias"], x, weight.T)
        return x @ weight.T


class PolicyQuantizedEmbedding(_PolicyMixin, nn.QuantizedEmbedding):
    def __call__(self, x: mx.array) -> mx.array:
        dense = self.dense_weight()
        return super().__call__(x) if dense is None else dense[x]

    def as_linear(self, x: mx.array) -> mx.array:
        y = self._plane_product(x)
        if y is not None:
            return y
        weight = self._float_weight(x)
        return super().as_linear(x) if weight is None else x @ weight.T


# How the packed weights multiply an input, by its rows (when the plane kernel applies):
# fewer than PLANE_ROWS take the plane kernel, whose cost grows with the rows; up to
# WIDE_MAX_ROWS dequantize chunk by chunk into the BLAS (_quant_matmul: nearly the same cost
# for 2 rows or 32); more (prompt chunks) dequantize the layer whole (one larger GEMM).
# Both kernels cost in proportion to the weights, so the crossover (2-3 rows) is the same
# for every layer of SmolLM2-135M. tools/bench_matvec.py --rows (OpenBLAS, load 1.3, CPU ms for
# 2 / 3 / 4 / 8 / 32 rows): a 1536x576 4-bit layer 0.38 / 0.64 / 0.79 / 1.60 / - with the
# plane kernel, 0.37 / 0.44 / 0.42 / 0.41 / 0.77 chunked, 0.97-1.38 dequantized whole;
# 192x576: 0.05 / 0.07 / 0.09 / 0.16 / - against 0.06 / 0.07 / 0.06 / 0.06 / 0.11; the 8-bit
# 49152x576 output layer 14.7 / 25.4 / 29.1 / 61.9 / - against 15.2 / 17.0 / 15.2 / 18.3 /
# 30.6, 85-104 whole. At 128 rows the two dequantizations cost about the same, at 512 the
# whole one a little less for 4-bit layers.
PLANE_ROWS = 3
WIDE_MAX_ROWS = 128

_SWAPS: dict[type, type] = {
    nn.QuantizedLinear: PolicyQuantizedLinear,
    nn.QuantizedEmbedding: PolicyQuantizedEmbedding,
}
_BASES = {policy: base for base, policy in _SWAPS.items()}


def convert_quantized_layers(
    model: nn.Module, *, dense: bool, dequantize_rows: int | None, matvec: bool = False
) -> list[nn.Module]:
    """Give every plain quantized linear/embedding the policy's matmul; returns them.

    The class of each layer is switched in place (same object, same parameters), so
    references held elsewhere (adapters wrapping a layer) stay valid. Subclasses that other
    code defined are left alone: their ``__call__`` may do something this one would not.

    With neither a dense copy nor on-the-fly dequantizing (the "native" mode) the layers go
    back to MLX's own classes: the policy's ``__call__`` would only add Python work per call,
    which cost ~15% of a 4-bit batch-1 decode step on CUDA (a host-bound loop), and the
    fused CUDA blocks (:mod:`._cuda_layers`) take exactly ``nn.QuantizedLinear``.
    """
    native = not dense and dequantize_rows is None and not matvec
    layers: list[nn.Module] = []
    for module in model.modules():
        cls = type(module)
        if cls in _SWAPS and not native:
            module.__class__ = _SWAPS[cls]
        if isinstance(module, _PolicyMixin):
            module.configure(dense=dense, dequantize_rows=dequantize_rows, matvec=matvec)
            if native:
                module.__class__ = _BASES[type(module)]
                continue
            layers.append(module)  # type: ignore[arg-type]
    return layers


def dense_copies(model: nn.Module) -> list[mx.array]:
    """The dense copies the model's layers keep (to evaluate with the parameters)."""
    copies = []
    for module in model.modules():
        if isinstance(module, _PolicyMixin):
            dense = module.dense_weight()
            if dense is not None:
                copies.append(dense)
    return copies


def dense_bytes(model: nn.Module, itemsize: int) -> int:
    """Bytes a dense copy of every plain quantized layer's weight would take."""
    total = 0
    for module in model.modules():
        if type(module) in _SWAPS or isinstance(module, _PolicyMixin):
            rows = module["weight"].shape[0]
            cols = module["scales"].shape[-1] * module.group_size
            total += rows * cols * itemsize
    return total
