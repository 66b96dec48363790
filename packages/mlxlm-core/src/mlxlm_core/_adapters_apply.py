"""Putting adapter layers into a model, and taking them out again (fused or not).

Which layers get an adapter follows MLX-LM exactly, so an adapter file trained there finds
the same parameter names here:

- ``keys`` are module paths relative to one transformer block (``self_attn.q_proj``); when
  not given, every linear, embedding and switch (MoE) layer found inside the blocks is used;
- only the last ``num_layers`` blocks are adapted (``num_layers <= 0`` means every block,
  which is what MLX-LM's ``model.layers[-max(num_layers, 0):]`` does);
- a key that is a full path from the model root (``lm_head``, ``model.embed_tokens``) adapts
  that module too, wherever it lives.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ._adapters_layers import (
    AdapterLayer,
    DoRAEmbedding,
    DoRALinear,
    LoRAEmbedding,
    LoRALinear,
    LoRASwitchLinear,
)
from ._errors import InvalidArgumentError, UnsupportedError

__all__ = [
    "ADAPTER_PARAMETER_NAMES",
    "adapter_parameters",
    "apply_lora_layers",
    "fuse_adapters",
    "linear_to_lora_layers",
    "remove_adapters",
]

#: Leaf names of the parameters an adapter file holds (MLX-LM's names).
ADAPTER_PARAMETER_NAMES = frozenset({"lora_a", "lora_b", "m"})

# (LoRA class, DoRA class or None when DoRA has no meaning there yet).
_WRAPPERS: tuple[tuple[type[AdapterLayer], type[AdapterLayer] | None], ...] = (
    (LoRALinear, DoRALinear),
    (LoRAEmbedding, DoRAEmbedding),
    (LoRASwitchLinear, None),
)
_ADAPTABLE = tuple(t for lora, _ in _WRAPPERS for t in lora.accepts)

# What was replaced: (owner module, path relative to it, original module), so a failed
# load can put the model back as it was.
Swaps = list[tuple[nn.Module, str, nn.Module]]


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, _ADAPTABLE) or hasattr(module, "to_lora")


def _wrap(
    module: nn.Module, path: str, *, rank: int, scale: float, dropout: float, use_dora: bool
) -> nn.Module:
    # A layer may know how to adapt itself (MLX-LM's hook for custom projections).
    if not use_dora and hasattr(module, "to_lora"):
        return module.to_lora(r=rank, scale=scale, dropout=dropout)
    for lora_cls, dora_cls in _WRAPPERS:
        if isinstance(module, lora_cls.accepts):
            cls = dora_cls if use_dora else lora_cls
            if cls is None:
                raise UnsupportedError(
                    f"DoRA is not supported on {type(module).__name__} ({path}); use LoRA"
                )
            return cls(module, rank=rank, scale=scale, dropout=dropout)
    raise UnsupportedError(
        f"cannot put an adapter on {type(module).__name__} at {path!r} "
        "(supported: linear, embedding and switch layers)"
    )


def wrap_layers(
    model: nn.Module,
    *,
    num_layers: int,
    rank: int,
    scale: float,
    dropout: float,
    keys: Iterable[str] | None,
    use_dora: bool,
) -> Swaps:
    """Swap adapter layers in; returns what was replaced (see :func:`restore`)."""
    if any(isinstance(m, AdapterLayer) for _, m in model.named_modules()):
        raise InvalidArgumentError(
            "model already has adapter layers; fuse or remove them before adding more"
        )
    blocks = getattr(model, "layers", None)
    if blocks is None:
        raise UnsupportedError(f"{type(model).__name__} has no .layers to put adapters on")
    blocks = list(blocks)
    if keys is None:
        wanted = {p for block in blocks for p, m in block.named_modules() if p and _adaptable(m)}
    else:
        if isinstance(keys, str):
            raise InvalidArgumentError("keys must be a list of module paths, not a string")
        wanted = set(keys)
    options: dict[str, Any] = {
        "rank": rank,
        "scale": scale,
        "dropout": dropout,
        "use_dora": use_dora,
    }
    chosen = blocks[-max(num_layers, 0) :]
    swaps: Swaps = []
    owners: list[tuple[nn.Module, list[tuple[str, nn.Module]]]] = []
    for index, block in zip(range(len(blocks) - len(chosen), len(blocks)), chosen):
        found = [(p, m) for p, m in block.named_modules() if p in wanted]
        owners.append((block, [(p, _wrap(m, f"layers.{index}.{p}", **options)) for p, m in found]))
        swaps += [(block, p, m) for p, m in found]
    found = [(p, m) for p, m in model.named_modules() if p in wanted]
    owners.append((model, [(p, _wrap(m, p, **options)) for p, m in found]))
    swaps += [(model, p, m) for p, m in found]
    if not swaps:
        raise InvalidArgumentError(
            f"no layer matches the adapter keys {sorted(wanted)[:5]} in the last "
            f"{len(chosen)} block(s)"
        )
    for owner, new in owners:
        if new:
            owner.update_modules(tree_unflatten(new))
    # New layers follow the model's mode, so their dropout is off when it is in eval mode.
    model.train(model.training)
    return swaps


def restore(swaps: Swaps) -> None:
    """Undo :func:`wrap_layers`."""
    for owner, path, original in reversed(swaps):
        owner.update_modules(tree_unflatten([(path, original)]))


def apply_lora_layers(
    model: nn.Module,
    *,
    num_layers: int,
    rank: int = 8,
    scale: float = 20.0,
    dropout: float = 0.0,
    keys: Iterable[str] | None = None,
    use_dora: bool = False,
) -> nn.Module:
    """Wrap the model's layers with fresh LoRA (or DoRA) adapters, in place.

    ``num_layers`` counts blocks from the last (``<= 0``: all); ``keys`` are block-relative
    module paths (or full paths for modules outside the blocks), by default every linear,
    embedding and switch layer inside the blocks. Fresh adapters change nothing until
    trained (``lora_b`` starts at zero). Base weights are not frozen here: freeze the model
    first when training only the adapters, as MLX-LM does.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int):
        raise InvalidArgumentError(f"num_layers must be an integer, got {num_layers!r}")
    wrap_layers(
        model,
        num_layers=num_layers,
        rank=rank,
        scale=scale,
        dropout=dropout,
        keys=keys,
        use_dora=use_dora,
    )
    return model


def linear_to_lora_layers(
    model: nn.Module, num_layers: int, config: Mapping[str, Any], use_dora: bool = False
) -> nn.Module:
    """MLX-LM's spelling: ``config`` holds ``rank``, ``scale``, ``dropout`` and ``keys``."""
    if "scale" not in config:
        hint = " (found 'alpha': the adapter format uses 'scale')" if "alpha" in config else ""
        raise InvalidArgumentError(f"LoRA config is missing 'scale'{hint}")
    return apply_lora_layers(
        model,
        num_layers=num_layers,
        rank=config.get("rank", 8),
        scale=config["scale"],
        dropout=config.get("dropout", 0.0),
        keys=config.get("keys"),
        use_dora=use_dora,
    )


def _replace_adapters(model: nn.Module, replacement: Any) -> nn.Module:
    swaps = [(p, replacement(m)) for p, m in model.named_modules() if isinstance(m, AdapterLayer)]
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return model


def fuse_adapters(model: nn.Module, *, requantize: bool = False) -> nn.Module:
    """Merge every adapter into its base layer, in place (see :meth:`AdapterLayer.fuse`)."""
    return _replace_adapters(model, lambda m: m.fuse(requantize=requantize))


def remove_adapters(model: nn.Module) -> nn.Module:
    """Drop every adapter, putting the untouched base layers back, in place."""
    return _replace_adapters(model, lambda m: m.base)


def adapter_parameters(model: nn.Module) -> dict[str, mx.array]:
    """The adapter parameters (``lora_a``, ``lora_b``, ``m``) by their full names."""
    params: dict[str, mx.array] = dict(tree_flatten(model.parameters()))
    return {k: v for k, v in params.items() if k.rsplit(".", 1)[-1] in ADAPTER_PARAMETER_NAMES}
