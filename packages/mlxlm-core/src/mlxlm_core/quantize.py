"""Plain quantization: MLX's affine and micro-scaled float modes as module swaps.

Core owns what loading a quantized checkpoint needs (read the config, swap layers) and the
uniform quantization ``mlxlm convert -q`` does. Recipes and learned quantizers live in
mlxlm-quant, on top of these functions.

Config format (MLX-LM's): ``{"group_size": 64, "bits": 4, "mode": "affine",
"<module path>": {...overrides...} | false}`` under ``quantization`` in ``config.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from ._errors import UnsupportedError

__all__ = [
    "QUANT_MODES",
    "QuantSpec",
    "dequantize_model",
    "quantization_from_config",
    "quantize_model",
]

# mode -> (allowed bits, allowed group sizes, default group size)
QUANT_MODES: dict[str, tuple[tuple[int, ...], tuple[int, ...], int]] = {
    "affine": ((2, 3, 4, 5, 6, 8), (32, 64, 128), 64),
    "mxfp4": ((4,), (32,), 32),
    "nvfp4": ((4,), (16,), 16),
    "mxfp8": ((8,), (32,), 32),
}


@dataclass(frozen=True)
class QuantSpec:
    """How one layer is quantized."""

    bits: int
    group_size: int
    mode: str = "affine"

    def __post_init__(self) -> None:
        if self.mode not in QUANT_MODES:
            raise UnsupportedError(
                f"quantization mode {self.mode!r} is not supported "
                f"(supported: {', '.join(QUANT_MODES)})"
            )
        bits, groups, _ = QUANT_MODES[self.mode]
        if self.bits not in bits or self.group_size not in groups:
            raise UnsupportedError(
                f"{self.mode} quantization with bits={self.bits}, group_size={self.group_size} "
                f"is not supported (bits in {bits}, group sizes in {groups})"
            )

    def as_config(self) -> dict[str, Any]:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}


def quantization_from_config(config: dict[str, Any]) -> dict[str, Any] | None:
    """The MLX quantization block of a checkpoint config, validated, or None if float.

    Raises :class:`UnsupportedError` for quantization formats we do not implement, naming them.
    """
    quant = config.get("quantization")
    foreign = config.get("quantization_config")
    if quant is None and foreign is not None:
        method = foreign.get("quant_method") or foreign.get("quant_algo") or foreign.get("format")
        if method is not None or "bits" not in foreign:
            raise UnsupportedError(
                f"checkpoint quantization {method or 'unknown'!r} is not supported; "
                "mlxlm reads MLX quantization (affine, mxfp4, nvfp4, mxfp8)"
            )
        quant = foreign
    if quant is None:
        return None
    mode = quant.get("mode", "affine")
    bits = quant.get("bits")
    group = quant.get("group_size", QUANT_MODES.get(mode, ((), (), 64))[2])
    if bits is None:
        raise UnsupportedError(f"quantization config without 'bits': {quant}")
    QuantSpec(bits=int(bits), group_size=int(group), mode=mode)  # validates
    for value in quant.values():
        if isinstance(value, dict):
            QuantSpec(
                bits=int(value.get("bits", bits)),
                group_size=int(value.get("group_size", group)),
                mode=value.get("mode", "affine"),  # see _spec_for
            )
    return {**quant, "mode": mode, "group_size": group}


def _spec_for(path: str, quant: dict[str, Any]) -> dict[str, Any] | bool:
    override = quant.get(path)
    if override is False:
        return False
    base = {"group_size": quant["group_size"], "bits": quant["bits"], "mode": quant["mode"]}
    if isinstance(override, dict):
        # MLX-LM hands a per-layer dict to ``to_quantized`` as is, so a missing "mode" means
        # affine, not the model's mode (MLX-LM's mxfp4 MoE models keep 8-bit affine routers).
        picked = {k: override[k] for k in ("group_size", "bits", "mode") if k in override}
        return {**base, "mode": "affine", **picked}
    return base


def apply_checkpoint_quantization(
    model: nn.Module, quant: dict[str, Any], weights: dict[str, mx.array]
) -> None:
    """Swap in quantized layers wherever the checkpoint carries quantized weights."""

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        return _spec_for(path, quant)

    nn.quantize(model, class_predicate=predicate)


def quantize_model(
    model: nn.Module,
    *,
    bits: int = 4,
    group_size: int | None = None,
    mode: str = "affine",
    predicate: Callable[[str, nn.Module], bool | dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Quantize ``model`` in place; returns the config block to save with it.

    Layers whose input width is not a multiple of the group size stay in float. ``predicate``
    may refuse a layer (False) or override its spec (a dict with bits/group_size/mode).
    """
    spec = QuantSpec(
        bits=bits, group_size=group_size or QUANT_MODES.get(mode, ((), (), 64))[2], mode=mode
    )
    config: dict[str, Any] = spec.as_config()

    def choose(path: str, module: nn.Module) -> bool | dict[str, Any]:
        if not hasattr(module, "to_quantized"):
            return False
        weight = getattr(module, "weight", None)
        if weight is None or weight.shape[-1] % spec.group_size:
            return False
        decided = predicate(path, module) if predicate else True
        if decided is False:
            return False
        chosen = spec.as_config() if decided is True else {**spec.as_config(), **decided}
        if chosen != spec.as_config():
            QuantSpec(**chosen)
            config[path] = chosen
        return chosen

    nn.quantize(model, class_predicate=choose)
    return config


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantized linear/embedding by its float equivalent, in place."""
    swaps: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            weight = _dequantized_weight(module)
            bias = "bias" in module
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
            linear.weight = weight
            if bias:
                linear.bias = module.bias
            swaps.append((path, linear))
        elif isinstance(module, nn.QuantizedEmbedding):
            weight = _dequantized_weight(module)
            emb = nn.Embedding(*weight.shape)
            emb.weight = weight
            swaps.append((path, emb))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return model


def _dequantized_weight(module: nn.Module) -> mx.array:
    return mx.dequantize(
        module.weight,
        module.scales,
        module.get("biases"),
        group_size=module.group_size,
        bits=module.bits,
        mode=getattr(module, "mode", "affine"),
    )
