"""Adapter directories in MLX-LM's format: ``adapter_config.json`` + ``adapters.safetensors``.

The config file MLX-LM writes holds all of its training arguments; what loading needs is
``fine_tune_type`` (``lora``, ``dora`` or ``full``; ``lora`` when absent), ``num_layers``
and ``lora_parameters`` (``rank``, ``scale``, ``dropout``, optional ``keys``). Other fields
are ignored on reading and kept by :func:`save_adapters` when passed as ``extra``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ._adapters_apply import adapter_parameters, restore, wrap_layers
from ._errors import CheckpointError, InvalidArgumentError, UnsupportedError

__all__ = ["FINE_TUNE_TYPES", "AdapterConfig", "load_adapters", "save_adapters"]

FINE_TUNE_TYPES = ("lora", "dora", "full")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapters.safetensors"


@dataclass(frozen=True)
class AdapterConfig:
    """What an adapter directory says about how to rebuild its layers."""

    fine_tune_type: str = "lora"
    num_layers: int = 16
    rank: int = 8
    scale: float = 20.0
    dropout: float = 0.0
    keys: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.fine_tune_type not in FINE_TUNE_TYPES:
            raise UnsupportedError(
                f"fine_tune_type {self.fine_tune_type!r} is not supported "
                f"(supported: {', '.join(FINE_TUNE_TYPES)})"
            )

    @property
    def use_dora(self) -> bool:
        return self.fine_tune_type == "dora"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = CONFIG_FILE) -> AdapterConfig:
        """Parse MLX-LM's layout; malformed values raise :class:`CheckpointError`."""
        fine_tune_type = data.get("fine_tune_type", "lora")
        if not isinstance(fine_tune_type, str):
            raise CheckpointError(f"{source}: fine_tune_type must be a string")
        if fine_tune_type not in FINE_TUNE_TYPES:
            raise UnsupportedError(
                f"{source}: fine_tune_type {fine_tune_type!r} is not supported "
                f"(supported: {', '.join(FINE_TUNE_TYPES)})"
            )
        num_layers = data.get("num_layers", -1 if fine_tune_type == "full" else None)
        if isinstance(num_layers, bool) or not isinstance(num_layers, int):
            raise CheckpointError(f"{source}: num_layers must be an integer, got {num_layers!r}")
        if fine_tune_type == "full":
            return cls(fine_tune_type="full", num_layers=num_layers)
        params = data.get("lora_parameters")
        if not isinstance(params, Mapping):
            raise CheckpointError(f"{source}: no lora_parameters object")
        rank, scale = params.get("rank"), params.get("scale")
        dropout, keys = params.get("dropout", 0.0), params.get("keys")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise CheckpointError(f"{source}: lora_parameters.rank must be a positive integer")
        if scale is None:
            hint = " (found 'alpha': the adapter format uses 'scale')" if "alpha" in params else ""
            raise CheckpointError(f"{source}: lora_parameters has no scale{hint}")
        if not _finite_number(scale):
            raise CheckpointError(f"{source}: lora_parameters.scale must be a number")
        if not _finite_number(dropout) or not 0.0 <= dropout < 1.0:
            raise CheckpointError(f"{source}: lora_parameters.dropout must be in [0, 1)")
        if keys is not None and (
            not isinstance(keys, list) or not all(isinstance(k, str) for k in keys)
        ):
            raise CheckpointError(f"{source}: lora_parameters.keys must be a list of strings")
        return cls(
            fine_tune_type=fine_tune_type,
            num_layers=num_layers,
            rank=rank,
            scale=float(scale),
            dropout=float(dropout),
            keys=None if keys is None else tuple(keys),
        )

    def to_dict(self) -> dict[str, Any]:
        """MLX-LM's layout of these fields."""
        out: dict[str, Any] = {"fine_tune_type": self.fine_tune_type, "num_layers": self.num_layers}
        if self.fine_tune_type != "full":
            params: dict[str, Any] = {
                "rank": self.rank,
                "scale": self.scale,
                "dropout": self.dropout,
            }
            if self.keys is not None:
                params["keys"] = list(self.keys)
            out["lora_parameters"] = params
        return out


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _locate(adapter_path: Path) -> tuple[Path, Path]:
    """(config file, weights file). A ``.safetensors`` path picks one checkpoint of a run
    (``0000100_adapters.safetensors``), with the config beside it."""
    if adapter_path.is_file() and adapter_path.suffix == ".safetensors":
        return adapter_path.parent / CONFIG_FILE, adapter_path
    if not adapter_path.exists():
        raise CheckpointError(f"adapter path {adapter_path} does not exist")
    if not adapter_path.is_dir():
        raise CheckpointError(f"{adapter_path}: expected an adapter directory")
    return adapter_path / CONFIG_FILE, adapter_path / WEIGHTS_FILE


def read_adapter_config(path: Path) -> AdapterConfig:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path.parent}: no {CONFIG_FILE} (not an adapter directory)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return AdapterConfig.from_dict(data, source=str(path))


def _read_weights(path: Path) -> dict[str, mx.array]:
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: no {path.name}")
    try:
        weights = mx.load(str(path), format="safetensors")
        mx.eval(weights)  # adapters are small; read now so a truncated file fails here
    except (RuntimeError, ValueError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: cannot read safetensors ({reason})") from None
    assert isinstance(weights, dict)
    return weights


def _mismatch(
    weights: Mapping[str, mx.array], expected: Mapping[str, mx.array], *, require_all: bool
) -> str | None:
    """Why ``weights`` does not fit ``expected`` (first few problems), or None."""
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
        return f"unexpected {unexpected[:3]}{more}"
    shapes = [k for k in sorted(weights) if weights[k].shape != expected[k].shape]
    if shapes:
        k = shapes[0]
        return f"{k} has shape {tuple(weights[k].shape)}, expected {tuple(expected[k].shape)}"
    missing = sorted(set(expected) - set(weights)) if require_all else []
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        return f"missing {missing[:3]}{more}"
    return None


def load_adapters(model: nn.Module, adapter_path: Path) -> nn.Module:
    """Apply the adapter in ``adapter_path`` to ``model`` in place, and return it.

    LoRA/DoRA: the layers named by the config are wrapped, then every adapter parameter
    must come from the file with the right shape (a file naming anything else is refused,
    and the model is left as it was). ``full``: the file's tensors replace model
    parameters of the same names and shapes.
    """
    adapter_path = Path(adapter_path)
    config_file, weights_file = _locate(adapter_path)
    config = read_adapter_config(config_file)
    weights = _read_weights(weights_file)
    if config.fine_tune_type == "full":
        problem = _mismatch(weights, dict(tree_flatten(model.parameters())), require_all=False)
        if problem:
            raise CheckpointError(f"{weights_file}: weights do not fit the model ({problem})")
        model.load_weights(list(weights.items()), strict=False)
        return model
    try:
        swaps = wrap_layers(
            model,
            num_layers=config.num_layers,
            rank=config.rank,
            scale=config.scale,
            dropout=config.dropout,
            keys=config.keys,
            use_dora=config.use_dora,
        )
    except InvalidArgumentError as exc:
        raise CheckpointError(f"{config_file}: {exc}") from None
    problem = _mismatch(weights, adapter_parameters(model), require_all=True)
    if problem:
        restore(swaps)
        raise CheckpointError(
            f"{weights_file}: adapter does not fit the model "
            f"({config.fine_tune_type}, num_layers={config.num_layers}): {problem}"
        )
    model.load_weights(list(weights.items()), strict=False)
    return model


def save_adapters(
    adapter_path: str | Path,
    model: nn.Module,
    config: AdapterConfig,
    *,
    extra: Mapping[str, Any] | None = None,
    weights_name: str = WEIGHTS_FILE,
) -> Path:
    """Write ``model``'s adapter in MLX-LM's format; returns the weights file.

    LoRA/DoRA save the adapter parameters; ``full`` saves the trainable parameters (what
    the trainer left unfrozen). ``extra`` adds fields to the config (training arguments);
    ``weights_name`` names intermediate checkpoints.
    """
    if config.fine_tune_type == "full":
        weights = dict(tree_flatten(model.trainable_parameters()))
    else:
        weights = adapter_parameters(model)
    if not weights:
        raise InvalidArgumentError("the model has no adapter parameters to save")
    folder = Path(adapter_path)
    folder.mkdir(parents=True, exist_ok=True)
    document = {**(extra or {}), **config.to_dict()}
    (folder / CONFIG_FILE).write_text(json.dumps(document, indent=4) + "\n")
    target = folder / weights_name
    mx.save_safetensors(str(target), weights, metadata={"format": "mlx"})
    return target
