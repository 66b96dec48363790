"""Training checkpoints that resume exactly: weights, optimizer state, data position, RNG.

A checkpoint at step N of a run in ``DIR`` is three files beside the adapter:

- ``DIR/000000N_adapters.safetensors``: the trainable weights (MLX-LM's checkpoint name,
  so MLX-LM and ``load_adapters`` read it as an adapter);
- ``DIR/000000N_optimizer.safetensors``: every array of the optimizer state (moments,
  step count);
- ``DIR/000000N_state.json``: the step, where the data stream stands, and the format version.

The random state needs no file: the trainer seeds MLX's generator from ``(seed, step)`` at
every step (MLX offers no way to set its key back), so the dropout masks of step N+1 are
the same whether or not the run stopped at step N.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten
from mlxlm_core import CheckpointError

from ._batching import DataPosition

__all__ = ["CHECKPOINT_VERSION", "TrainingState", "find_checkpoint", "read_state", "write_state"]

CHECKPOINT_VERSION = 1
_STEP_FILE = re.compile(r"^(\d{7,})_state\.json$")


@dataclass(frozen=True)
class TrainingState:
    step: int
    position: DataPosition
    weights_file: Path
    optimizer_file: Path
    extra: dict[str, Any]


def _names(folder: Path, step: int) -> tuple[Path, Path, Path]:
    tag = f"{step:07d}"
    return (
        folder / f"{tag}_adapters.safetensors",
        folder / f"{tag}_optimizer.safetensors",
        folder / f"{tag}_state.json",
    )


def write_state(
    folder: Path,
    *,
    step: int,
    position: DataPosition,
    optimizer: optim.Optimizer,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the optimizer and data-position files of a checkpoint (weights: the caller)."""
    _, opt_file, state_file = _names(folder, step)
    arrays = dict(tree_flatten(optimizer.state))
    mx.save_safetensors(str(opt_file), arrays)
    document = {
        "checkpoint_version": CHECKPOINT_VERSION,
        "step": step,
        "data_position": position.to_dict(),
        **(extra or {}),
    }
    state_file.write_text(json.dumps(document, indent=2) + "\n")
    return state_file


def find_checkpoint(path: str | Path) -> Path:
    """The ``*_state.json`` of ``path``: that file, or the latest in a run directory."""
    path = Path(path)
    if path.is_file():
        if _STEP_FILE.match(path.name):
            return path
        match = re.match(r"^(\d{7,})_", path.name)
        if match:
            candidate = path.parent / f"{match.group(1)}_state.json"
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"{path}: not a training checkpoint (expected NNNNNNN_state.json)")
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    found = sorted((int(m.group(1)), p) for p in path.iterdir() if (m := _STEP_FILE.match(p.name)))
    if not found:
        raise CheckpointError(f"{path}: no training checkpoint to resume (no *_state.json)")
    return found[-1][1]


def read_state(path: str | Path) -> TrainingState:
    state_file = find_checkpoint(path)
    try:
        doc = json.loads(state_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{state_file}: unreadable ({exc})") from None
    version = doc.get("checkpoint_version")
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{state_file}: checkpoint_version {version!r} is not {CHECKPOINT_VERSION}"
        )
    try:
        step = int(doc["step"])
        position = DataPosition(
            int(doc["data_position"]["epoch"]), int(doc["data_position"]["index"])
        )
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{state_file}: missing step or data_position") from None
    weights, opt_file, _ = _names(state_file.parent, step)
    for f in (weights, opt_file):
        if not f.is_file():
            raise CheckpointError(f"{state_file}: {f.name} is missing beside it")
    extra = {
        k: v for k, v in doc.items() if k not in ("checkpoint_version", "step", "data_position")
    }
    return TrainingState(step, position, weights, opt_file, extra)


def restore_state(state: TrainingState, model: nn.Module, optimizer: optim.Optimizer) -> None:
    """Load the checkpoint's weights and optimizer state into ``model`` / ``optimizer``."""
    try:
        weights = mx.load(str(state.weights_file))
        arrays = mx.load(str(state.optimizer_file))
    except (RuntimeError, ValueError, OSError) as exc:
        raise CheckpointError(
            f"{state.weights_file.parent}: cannot read checkpoint ({exc})"
        ) from None
    assert isinstance(weights, dict) and isinstance(arrays, dict)
    trainable = dict(tree_flatten(model.trainable_parameters()))
    missing = sorted(set(trainable) - set(weights))
    unexpected = sorted(set(weights) - set(trainable))
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(
            f"{state.weights_file}: does not match the model's trainable parameters ({what})"
        )
    for name, value in weights.items():
        if value.shape != trainable[name].shape:
            raise CheckpointError(
                f"{state.weights_file}: {name} has shape {tuple(value.shape)}, "
                f"expected {tuple(trainable[name].shape)}"
            )
    model.load_weights(list(weights.items()), strict=False)
    optimizer.init(model.trainable_parameters())
    current = dict(tree_flatten(optimizer.state))
    if set(current) != set(arrays):
        diff = sorted(set(current) ^ set(arrays))[:3]
        raise CheckpointError(
            f"{state.optimizer_file}: optimizer state does not match this optimizer ({diff})"
        )
    optimizer.state = tree_unflatten(list(arrays.items()))
    mx.eval(model.parameters(), optimizer.state)
