"""Getting a model ready to train: adapters in, everything else frozen, checkpointing on.

The adapter layers themselves are core's (:mod:`mlxlm_core.adapters`); what is training-only
lives here: which parameters are trainable, and gradient checkpointing.

Gradient checkpointing is switched on per block *instance*: each chosen block is moved to a
subclass of its own class whose ``__call__`` recomputes the block in the backward pass
(``mx.checkpoint``). Other instances of the class, other models in the process, and the
class itself are untouched (MLX-LM replaces ``type(layer).__call__`` for the whole process),
and :func:`disable_grad_checkpoint` puts the instances back.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlxlm_core import InvalidArgumentError, UnsupportedError
from mlxlm_core.adapters import (
    ADAPTER_PARAMETER_NAMES,
    AdapterConfig,
    AdapterLayer,
    apply_lora_layers,
)

__all__ = [
    "count_parameters",
    "disable_grad_checkpoint",
    "enable_grad_checkpoint",
    "prepare_model",
]

_CHECKPOINTED: dict[type, type] = {}


def _quantized(module: nn.Module) -> bool:
    return "scales" in module and isinstance(module.get("weight"), mx.array)


def prepare_model(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Freeze ``model`` and make the part that ``config`` trains trainable, in place.

    ``lora`` / ``dora``: adapters on the last ``num_layers`` blocks (core's layers and
    selection rules, so the result is MLX-LM's layout); only their factors (and DoRA's
    magnitudes) train — on a quantized base this is QLoRA. ``full``: every float
    parameter of the last ``num_layers`` blocks trains; a quantized base is refused.
    """
    blocks = getattr(model, "layers", None)
    if blocks is None:
        raise UnsupportedError(f"{type(model).__name__} has no .layers to fine-tune")
    if config.num_layers > len(blocks):
        raise InvalidArgumentError(
            f"num_layers is {config.num_layers} but the model has {len(blocks)} blocks"
        )
    model.freeze()
    if config.fine_tune_type == "full":
        chosen = list(blocks)[-max(config.num_layers, 0) :]
        if any(_quantized(m) for block in chosen for _, m in block.named_modules()):
            raise UnsupportedError(
                "full fine-tuning needs float weights; this model is quantized "
                "(use LoRA/DoRA, which train on quantized bases, or a float model)"
            )
        for block in chosen:
            block.unfreeze()
    else:
        apply_lora_layers(
            model,
            num_layers=config.num_layers,
            rank=config.rank,
            scale=config.scale,
            dropout=config.dropout,
            keys=config.keys,
            use_dora=config.use_dora,
        )
        for _, module in model.named_modules():
            if isinstance(module, AdapterLayer):
                names = [k for k in ADAPTER_PARAMETER_NAMES if k in module]
                module.unfreeze(recurse=False, keys=names, strict=False)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (packed quantized weights counted unpacked)."""

    def size(path: str, value: mx.array, module_bits: dict[str, int]) -> int:
        bits = module_bits.get(path.rsplit(".", 1)[0])
        if bits and path.endswith(".weight") and value.dtype == mx.uint32:
            return value.size * 32 // bits
        return value.size

    bits = {p: m.bits for p, m in model.named_modules() if hasattr(m, "bits")}
    params: dict[str, mx.array] = dict(tree_flatten(model.parameters()))
    trained: dict[str, mx.array] = dict(tree_flatten(model.trainable_parameters()))
    total = sum(size(k, v, bits) for k, v in params.items())
    trainable = sum(v.size for v in trained.values())
    return trainable, total


def _checkpointed_class(cls: type) -> type:
    if cls not in _CHECKPOINTED:
        original = cls.__call__

        def __call__(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            def inner(params: Any, *args: Any, **kwargs: Any) -> Any:
                self.update(params)
                return original(self, *args, **kwargs)

            return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

        _CHECKPOINTED[cls] = type(
            f"Checkpointed{cls.__name__}",
            (cls,),
            {"__call__": __call__, "_checkpointed_from": cls, "__module__": cls.__module__},
        )
    return _CHECKPOINTED[cls]


def enable_grad_checkpoint(model: nn.Module, *, blocks: int | None = None) -> int:
    """Recompute the last ``blocks`` transformer blocks (all: None) in the backward pass.

    Returns how many blocks were switched. Trades compute (one more forward per block) for
    activation memory, which then grows with one block instead of all of them.
    """
    layers = list(getattr(model, "layers", []))
    chosen = layers if blocks is None else layers[-max(blocks, 0) :]
    for layer in chosen:
        if not hasattr(type(layer), "_checkpointed_from"):
            layer.__class__ = _checkpointed_class(type(layer))
    return len(chosen)


def disable_grad_checkpoint(model: nn.Module) -> None:
    """Undo :func:`enable_grad_checkpoint` on every block of ``model``."""
    for layer in getattr(model, "layers", []):
        original = getattr(type(layer), "_checkpointed_from", None)
        if original is not None:
            layer.__class__ = original
