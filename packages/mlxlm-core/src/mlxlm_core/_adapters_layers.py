"""LoRA and DoRA layers: a frozen base layer plus a trainable low-rank update.

Parameter names follow MLX-LM's adapter files so those files load here unchanged and ours
load there: the wrapped layer lives under ``linear`` (or ``embedding``), the factors are
``lora_a`` / ``lora_b`` and DoRA's magnitude vector is ``m``. Factor layouts are MLX-LM's
too: ``x @ lora_a @ lora_b`` for linear layers and embeddings, per-expert ``(E, r, in)`` /
``(E, out, r)`` for switch (MoE) layers.

Every layer can :meth:`AdapterLayer.fuse` itself into the plain layer it stands for, so a
trained adapter can be merged into the base weights for export or faster inference.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import mlx.core as mx
import mlx.nn as nn

from ._errors import InvalidArgumentError
from .models.switch_layers import QuantizedSwitchLinear, SwitchLinear

__all__ = [
    "AdapterLayer",
    "DoRAEmbedding",
    "DoRALinear",
    "LoRAEmbedding",
    "LoRALinear",
    "LoRASwitchLinear",
]

_QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)


def _is_quantized(layer: nn.Module) -> bool:
    return isinstance(layer, _QUANTIZED)


def _float_weight(layer: nn.Module) -> mx.array:
    """The layer's weight in its natural float layout, dequantized if packed."""
    if not _is_quantized(layer):
        return layer["weight"]
    return mx.dequantize(
        layer["weight"],
        layer["scales"],
        layer.get("biases"),
        group_size=layer.group_size,
        bits=layer.bits,
        mode=getattr(layer, "mode", "affine"),
    )


def _unpacked_dims(layer: nn.Module) -> tuple[int, ...]:
    """Shape of the float weight: packed uint32 columns hold ``32 // bits`` values each."""
    shape = tuple(layer["weight"].shape)
    if _is_quantized(layer):
        shape = (*shape[:-1], shape[-1] * 32 // layer.bits)
    return shape


class AdapterLayer(nn.Module):
    """A base layer (frozen in training by the caller) plus ``scale * A @ B``.

    Subclasses say which base layers they accept, under which attribute the base is kept,
    the factor shapes, how the dense update looks in the base weight's layout
    (:meth:`delta`) and how to build the plain layer for a fused weight.
    """

    wrapped: ClassVar[str] = "linear"
    accepts: ClassVar[tuple[type[nn.Module], ...]] = ()

    def __init__(
        self, base: nn.Module, *, rank: int = 8, scale: float = 20.0, dropout: float = 0.0
    ):
        super().__init__()
        if not isinstance(base, self.accepts):
            names = ", ".join(t.__name__ for t in self.accepts)
            raise InvalidArgumentError(
                f"{type(self).__name__} wraps {names}, not {type(base).__name__}"
            )
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise InvalidArgumentError(f"adapter rank must be a positive integer, got {rank!r}")
        if not 0.0 <= dropout < 1.0:
            raise InvalidArgumentError(f"adapter dropout must be in [0, 1), got {dropout!r}")
        setattr(self, self.wrapped, base)
        self.scale = float(scale)
        self.dropout_p = float(dropout)
        self.dropout = nn.Dropout(p=dropout)
        a_shape, b_shape, fan_in = self._factor_shapes(rank)
        # A starts random and B at zero, so a fresh adapter leaves the layer's output
        # unchanged while still receiving gradients through B.
        bound = 1.0 / math.sqrt(fan_in)
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=a_shape)
        self.lora_b = mx.zeros(b_shape)

    @classmethod
    def from_base(
        cls, layer: nn.Module, r: int = 8, dropout: float = 0.0, scale: float = 20.0
    ) -> AdapterLayer:
        """MLX-LM's constructor spelling (``r`` for the rank), for ported code."""
        return cls(layer, rank=r, scale=scale, dropout=dropout)

    @property
    def base(self) -> nn.Module:
        """The wrapped layer (``self.linear`` or ``self.embedding``)."""
        return self[self.wrapped]

    @property
    def rank(self) -> int:
        return self._rank_of(self["lora_a"], self["lora_b"])

    def base_weight(self) -> mx.array:
        """The wrapped layer's weight as floats (dequantized when packed)."""
        return _float_weight(self.base)

    # -- what subclasses define -------------------------------------------------------------

    def _factor_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...], int]:
        """``(lora_a shape, lora_b shape, fan-in used to scale A's initialisation)``."""
        raise NotImplementedError

    def _rank_of(self, lora_a: mx.array, lora_b: mx.array) -> int:
        return lora_a.shape[-1]

    def delta(self) -> mx.array:
        """The dense update ``scale * A @ B`` laid out like the base weight."""
        raise NotImplementedError

    def _plain(self, weight: mx.array) -> nn.Module:
        """A float layer of the base's kind carrying ``weight`` (and the base's bias)."""
        raise NotImplementedError

    def _requantized(self, plain: nn.Module) -> nn.Module:
        raise NotImplementedError

    # -- fusing --------------------------------------------------------------------------------

    def fused_weight(self) -> mx.array:
        """Base weight with the update merged, in the base weight's dtype."""
        weight = self.base_weight()
        return weight + self.delta().astype(weight.dtype)

    def fuse(self, *, requantize: bool = False) -> nn.Module:
        """The plain layer equivalent to this one (in eval mode).

        Returns a float layer; with ``requantize=True`` a quantized base comes back
        quantized again with its own group size, bits and mode (lossy, as any quantization).
        """
        plain = self._plain(self.fused_weight())
        if requantize and _is_quantized(self.base):
            plain = self._requantized(plain)
        return plain

    def _quant_args(self) -> dict[str, Any]:
        base = self.base
        return {
            "group_size": base.group_size,
            "bits": base.bits,
            "mode": getattr(base, "mode", "affine"),
        }

    def _extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale}, dropout={self.dropout_p}"


class _LinearAdapter(AdapterLayer):
    """Shared by LoRA and DoRA on ``nn.Linear`` / ``nn.QuantizedLinear``."""

    wrapped = "linear"
    accepts = (nn.Linear, nn.QuantizedLinear)

    def _factor_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...], int]:
        output_dims, input_dims = _unpacked_dims(self.base)
        return (input_dims, rank), (rank, output_dims), input_dims

    def _low_rank(self, x: mx.array) -> mx.array:
        return (self.dropout(x) @ self["lora_a"]) @ self["lora_b"]

    def delta(self) -> mx.array:
        return (self.scale * self["lora_b"].T) @ self["lora_a"].T

    def _plain(self, weight: mx.array) -> nn.Module:
        output_dims, input_dims = weight.shape
        has_bias = "bias" in self.base
        plain = nn.Linear(input_dims, output_dims, bias=has_bias)
        plain.weight = weight
        if has_bias:
            plain.bias = self.base["bias"]
        return plain.eval()

    def _requantized(self, plain: nn.Module) -> nn.Module:
        return nn.QuantizedLinear.from_linear(plain, **self._quant_args())


class _EmbeddingAdapter(AdapterLayer):
    """Shared by LoRA and DoRA on ``nn.Embedding`` / ``nn.QuantizedEmbedding``."""

    wrapped = "embedding"
    accepts = (nn.Embedding, nn.QuantizedEmbedding)

    def _factor_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...], int]:
        num_embeddings, dims = _unpacked_dims(self.base)
        return (num_embeddings, rank), (rank, dims), num_embeddings

    def delta(self) -> mx.array:
        return (self.scale * self["lora_a"]) @ self["lora_b"]

    def _plain(self, weight: mx.array) -> nn.Module:
        plain = nn.Embedding(*weight.shape)
        plain.weight = weight
        return plain.eval()

    def _requantized(self, plain: nn.Module) -> nn.Module:
        return nn.QuantizedEmbedding.from_embedding(plain, **self._quant_args())


class _DoRA:
    """Weight-decomposed LoRA: each row of the adapted weight is rescaled to norm ``m``.

    ``m`` starts as the base weight's row norms (so a fresh DoRA layer is also a no-op) and
    is learned with the factors. The norm of the adapted weight is treated as a constant in
    the backward pass, as the DoRA paper suggests and MLX-LM does.
    """

    def _init_magnitude(self) -> None:
        weight = self.base_weight()  # type: ignore[attr-defined]
        self.m = mx.linalg.norm(weight.astype(mx.float32), axis=1)

    def fused_weight(self) -> mx.array:
        weight = self.base_weight()  # type: ignore[attr-defined]
        adapted = weight + self.delta().astype(weight.dtype)  # type: ignore[attr-defined]
        norm_scale = self["m"] / mx.linalg.norm(adapted, axis=1)  # type: ignore[index]
        return (norm_scale[:, None] * adapted).astype(weight.dtype)

    def _row_scale(self, weight: mx.array) -> mx.array:
        """``m / ||W + delta||`` per row, held constant for gradients."""
        adapted = weight + self.delta()  # type: ignore[attr-defined]
        return self["m"] / mx.stop_gradient(mx.linalg.norm(adapted, axis=1))  # type: ignore[index]


class LoRALinear(_LinearAdapter):
    """``base(x) + scale * dropout(x) @ A @ B`` over a float or quantized linear layer."""

    def __call__(self, x: mx.array) -> mx.array:
        return self.base(x) + (self.scale * self._low_rank(x)).astype(x.dtype)


class DoRALinear(_DoRA, _LinearAdapter):
    """DoRA over a float or quantized linear layer (dequantized per call when packed)."""

    def __init__(
        self, base: nn.Module, *, rank: int = 8, scale: float = 20.0, dropout: float = 0.0
    ):
        super().__init__(base, rank=rank, scale=scale, dropout=dropout)
        self._init_magnitude()

    def __call__(self, x: mx.array) -> mx.array:
        weight = self.base_weight()
        out = x @ weight.T + (self.scale * self._low_rank(x)).astype(x.dtype)
        out = self._row_scale(weight).astype(x.dtype) * out
        if "bias" in self.base:
            out = out + self.base["bias"]
        return out


class LoRAEmbedding(_EmbeddingAdapter):
    """Embedding rows ``E[x] + scale * A[x] @ B``; ``as_linear`` serves tied output heads."""

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        z = self.dropout(self["lora_a"][x] @ self["lora_b"])
        return y + (self.scale * z).astype(y.dtype)

    def as_linear(self, x: mx.array) -> mx.array:
        y = self.base.as_linear(x)
        z = (self.dropout(x) @ self["lora_b"].T) @ self["lora_a"].T
        return y + (self.scale * z).astype(x.dtype)


class DoRAEmbedding(_DoRA, _EmbeddingAdapter):
    """DoRA over an embedding: each token's adapted row is rescaled to norm ``m[token]``."""

    def __init__(
        self, base: nn.Module, *, rank: int = 8, scale: float = 20.0, dropout: float = 0.0
    ):
        super().__init__(base, rank=rank, scale=scale, dropout=dropout)
        self._init_magnitude()

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        z = self.scale * self["lora_a"][x] @ self["lora_b"]
        out = y + self.dropout(z).astype(y.dtype)
        # Only the looked-up rows are needed, so their norms are taken here rather than
        # over the whole table.
        denom = mx.stop_gradient(mx.linalg.norm(y + z, axis=-1))
        return (self["m"][x] / denom)[..., None].astype(y.dtype) * out

    def as_linear(self, x: mx.array) -> mx.array:
        y = self.base.as_linear(x)
        z = (self.dropout(x) @ self["lora_b"].T) @ self["lora_a"].T
        out = y + (self.scale * z).astype(x.dtype)
        return self._row_scale(self.base_weight()).astype(x.dtype) * out


class LoRASwitchLinear(AdapterLayer):
    """LoRA on a mixture-of-experts :class:`SwitchLinear`: one ``(A, B)`` pair per expert."""

    wrapped = "linear"
    accepts = (SwitchLinear, QuantizedSwitchLinear)

    def _factor_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...], int]:
        num_experts, output_dims, input_dims = _unpacked_dims(self.base)
        return (num_experts, rank, input_dims), (num_experts, output_dims, rank), input_dims

    def _rank_of(self, lora_a: mx.array, lora_b: mx.array) -> int:
        return lora_a.shape[1]

    def __call__(self, x: mx.array, indices: mx.array, *, sorted_indices: bool = False) -> mx.array:
        y = self.base(x, indices, sorted_indices=sorted_indices)
        h, lora_a, lora_b = self.dropout(x), self["lora_a"], self["lora_b"]
        if mx.default_device() == mx.cpu:
            # MLX's CPU gather_mm only takes float32 (as in SwitchLinear).
            h, lora_a, lora_b = (t.astype(mx.float32) for t in (h, lora_a, lora_b))
        z = mx.gather_mm(
            h, lora_a.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices
        )
        z = mx.gather_mm(
            z, lora_b.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices
        )
        return y + (self.scale * z).astype(x.dtype)

    def delta(self) -> mx.array:
        return (self.scale * self["lora_b"]) @ self["lora_a"]

    def _plain(self, weight: mx.array) -> nn.Module:
        num_experts, output_dims, input_dims = weight.shape
        has_bias = "bias" in self.base
        plain = SwitchLinear(input_dims, output_dims, num_experts, bias=has_bias)
        plain.weight = weight
        if has_bias:
            plain.bias = self.base["bias"]
        return plain.eval()

    def _requantized(self, plain: nn.Module) -> nn.Module:
        return plain.to_quantized(**self._quant_args())
