"""What an adapter written here says about itself: format version and the base it fits.

``adapter_config.json`` stays MLX-LM's document (MLX-LM ignores keys it does not know), with
two additions: ``mlxlm_tune`` (``{"version", "adapter_format"}``) and ``base_model`` (the
architecture fields that decide whether the adapter fits a model). Loading an adapter onto
a model whose fields differ fails with the field's name, instead of a shape error deep
inside a layer — or, worse, no error when only ``num_layers`` happens to fit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.nn as nn
from mlxlm_core import CheckpointError

__all__ = ["ADAPTER_FORMAT", "check_base_model", "model_fingerprint", "tune_metadata"]

ADAPTER_FORMAT = 1
_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """The architecture fields of ``model`` (from its ``args``) that an adapter depends on."""
    args = getattr(model, "args", None)
    out: dict[str, Any] = {}
    for name in _FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            out[name] = value
    if "num_hidden_layers" not in out and hasattr(model, "layers"):
        out["num_hidden_layers"] = len(model.layers)
    return out


def tune_metadata(model: nn.Module) -> dict[str, Any]:
    from . import __version__

    return {
        "mlxlm_tune": {"version": __version__, "adapter_format": ADAPTER_FORMAT},
        "base_model": model_fingerprint(model),
    }


def check_base_model(model: nn.Module, adapter_path: str | Path) -> None:
    """Refuse an adapter whose recorded ``base_model`` differs from ``model``, naming the field."""
    path = Path(adapter_path)
    config_file = (path.parent if path.is_file() else path) / "adapter_config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file.parent}: no adapter_config.json (not an adapter)")
    try:
        document = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_file}: invalid JSON ({exc})") from None
    tune = document.get("mlxlm_tune")
    if isinstance(tune, dict) and int(tune.get("adapter_format", ADAPTER_FORMAT)) > ADAPTER_FORMAT:
        raise CheckpointError(
            f"{config_file}: mlxlm_tune.adapter_format {tune['adapter_format']} is newer than "
            f"this version reads ({ADAPTER_FORMAT}); upgrade mlxlm-tune"
        )
    recorded = document.get("base_model")
    if not isinstance(recorded, dict):
        return  # MLX-LM's adapters carry no fingerprint; the shape checks still apply
    actual = model_fingerprint(model)
    for name in _FIELDS:
        if name in recorded and name in actual and recorded[name] != actual[name]:
            raise CheckpointError(
                f"{config_file}: base_model.{name} is {recorded[name]!r} but the model has "
                f"{actual[name]!r}: this adapter was trained for another model"
            )
    num_layers = document.get("num_layers")
    blocks = actual.get("num_hidden_layers")
    if isinstance(num_layers, int) and blocks is not None and num_layers > blocks:
        raise CheckpointError(
            f"{config_file}: num_layers is {num_layers} but the model has {blocks} blocks"
        )
