"""The training loop: steps with gradient accumulation, evaluation, reports, checkpoints.

:class:`Trainer` knows nothing about adapters or data formats: it trains whatever
parameters of the model are trainable, on batches from a :class:`Batcher`, with any loss
of the form ``loss(model, batch) -> (mean loss, count)``. So it serves LoRA/DoRA/full
fine-tuning, DPO/ORPO and other packages' learned quantizers (DWQ) alike.

An optimizer *step* consumes ``grad_accumulation_steps`` batches; their gradients are
averaged weighted by each batch's token (or pair) count, so accumulating k batches of b
rows trains like one batch of k*b rows.

Data-parallel (``group``: the processes of ``mlx.launch``, see :mod:`._distributed`): each
rank reads its slice of every batch, the token-weighted gradient sums and counts are summed
over the ranks before the division, so n ranks with b rows each step like one process with
n*b rows; reports, callbacks and checkpoints happen on rank 0 only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map
from mlxlm_core import InvalidArgumentError

from ._batching import Batch, Batcher, DataPosition
from ._callbacks import CallbackList, TrainingCallback
from ._distributed import Group, is_primary, part, peer_failures, sum_arrays, sum_tree
from ._losses import LossFn, sft_loss
from ._state import TrainingState, read_state, restore_state, write_state

__all__ = ["Trainer", "TrainerOptions", "evaluate"]

SaveWeights = Callable[[Path, int], Path]


@dataclass
class TrainerOptions:
    """How the loop runs (the what-to-train lives in :class:`TrainingConfig`)."""

    iters: int = 1000
    grad_accumulation_steps: int = 1
    grad_clip: float | None = None
    steps_per_report: int = 10
    steps_per_eval: int = 200
    val_batches: int = 25
    save_every: int = 100
    clear_cache_threshold: int = 0
    compile: bool = True
    #: MLX's generator is reseeded from (seed, step) before every step, so randomness
    #: (dropout) depends only on the step and a resumed run draws what it would have.
    #: None leaves the generator alone.
    seed: int | None = 0

    def __post_init__(self) -> None:
        for name in ("iters", "grad_accumulation_steps", "steps_per_report", "steps_per_eval"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise InvalidArgumentError(f"grad_clip must be > 0, got {self.grad_clip}")


def scalar(x: mx.array) -> float:
    """A one-element array as a Python float (``item()`` is typed as possibly complex)."""
    value = x.item()
    assert isinstance(value, int | float)
    return float(value)


def _arrays(batch: Batch) -> dict[str, mx.array]:
    out = {"tokens": batch.tokens, "mask": batch.mask}
    if batch.segments is not None:
        out["segments"] = batch.segments
    if batch.reference is not None:
        out["reference"] = batch.reference
    out.update({f"extra.{k}": v for k, v in batch.extra.items()})
    return out


def _rebuild(arrays: dict[str, mx.array], preference: bool) -> Batch:
    return Batch(
        tokens=arrays["tokens"],
        mask=arrays["mask"],
        segments=arrays.get("segments"),
        reference=arrays.get("reference"),
        preference=preference,
        extra={k[6:]: v for k, v in arrays.items() if k.startswith("extra.")},
    )


def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    loss: LossFn = sft_loss,
    num_batches: int = -1,
    clear_cache_threshold: int = 0,
    group: Group | None = None,
) -> float:
    """Count-weighted mean loss over ``num_batches`` batches (``-1``: all), in eval mode.

    With ``group``, ``batches`` are this rank's slices and the sums are taken over all ranks.
    """
    was_training = model.training
    model.eval()
    total, count = mx.array(0.0), mx.array(0.0)
    for i, batch in enumerate(batches):
        if 0 <= num_batches <= i:
            break
        if batch.empty:
            continue
        value, n = loss(model, batch)
        total, count = total + value * n, count + n
        mx.eval(total, count)
        if clear_cache_threshold and mx.get_cache_memory() > clear_cache_threshold:
            mx.clear_cache()
    model.train(was_training)
    if group is not None:
        with peer_failures():
            total, count = sum_arrays([total, count.astype(total.dtype)], group)
            mx.eval(total, count)
    if count.item() == 0:
        raise InvalidArgumentError("evaluation saw no target tokens")
    return scalar(total / count)


class Trainer:
    """Trains ``model``'s trainable parameters with ``optimizer`` on ``loss``."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: optim.Optimizer,
        *,
        loss: LossFn = sft_loss,
        options: TrainerOptions | None = None,
        callbacks: Sequence[TrainingCallback] = (),
        eval_loss: LossFn | None = None,
        group: Group | None = None,
    ) -> None:
        self.model, self.optimizer, self.loss = model, optimizer, loss
        self.eval_loss = eval_loss or loss
        self.options = options or TrainerOptions()
        self.group = group
        self.primary = is_primary(group)
        # Reports and checkpoints are rank 0's; the other ranks only compute.
        self.callbacks = CallbackList(callbacks if self.primary else ())
        self.step = 0
        self.position = DataPosition()
        self._grad_fns: dict[tuple[Any, ...], Callable[..., Any]] = {}
        if not tree_flatten(model.trainable_parameters()):
            raise InvalidArgumentError("the model has no trainable parameters")

    # -- one step ------------------------------------------------------------------------------

    def _grad_fn(self, batch: Batch) -> Callable[..., Any]:
        key = (batch.preference, *sorted(_arrays(batch)))
        if key not in self._grad_fns:
            model = self.model
            value_and_grad = nn.value_and_grad(model, self._loss_on_arrays(batch.preference))

            def fn(arrays: dict[str, mx.array]) -> Any:
                return value_and_grad(model, arrays)

            if self.options.compile:
                # The model is captured state, not an argument: compile would hand a
                # plain dict of its arrays to the function instead of the module.
                state = [model.state, mx.random.state]
                fn = mx.compile(fn, inputs=state, outputs=state)
            self._grad_fns[key] = fn
        return self._grad_fns[key]

    def _loss_on_arrays(self, preference: bool) -> Callable[..., Any]:
        loss = self.loss

        def on_arrays(model: nn.Module, arrays: dict[str, mx.array]) -> Any:
            return loss(model, _rebuild(arrays, preference))

        return on_arrays

    def train_step(self, batches: Sequence[Batch]) -> tuple[float, float]:
        """One optimizer update from ``batches`` (accumulated); returns (mean loss, count)."""
        group = self.group
        if self.options.seed is not None:
            # Each rank draws its own dropout masks; rank 0 draws what one process would.
            seed = self.options.seed * 1_000_003 + self.step
            mx.random.seed(seed if group is None else seed * group.size() + group.rank())
        grads: Any = None
        total_loss, total_count = mx.array(0.0), mx.array(0.0)
        for batch in batches:
            if batch.empty:  # this rank's slice of a short batch: it adds nothing
                continue
            (value, count), g = self._grad_fn(batch)(_arrays(batch))
            g = tree_map(lambda x, c=count: x * c, g)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            total_loss, total_count = total_loss + value * count, total_count + count
            if len(batches) > 1:
                mx.eval(grads, total_loss, total_count)
        if grads is None:
            grads = tree_map(mx.zeros_like, self.model.trainable_parameters())
        if group is not None:
            with peer_failures():
                grads = sum_tree(grads, group)
                total_loss, total_count = sum_arrays([total_loss, total_count], group)
                mx.eval(grads, total_loss, total_count)
        denom = mx.maximum(total_count, 1)
        grads = tree_map(lambda x: x / denom, grads)
        if self.options.grad_clip is not None:
            grads, _ = optim.clip_grad_norm(grads, self.options.grad_clip)
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.parameters(), self.optimizer.state, total_loss, total_count)
        result = scalar(total_loss / denom), scalar(total_count)
        threshold = self.options.clear_cache_threshold
        if threshold and mx.get_cache_memory() > threshold:
            mx.clear_cache()
        self.step += 1
        return result

    # -- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(
        self, folder: str | Path, save_weights: SaveWeights, *, extra: dict[str, Any] | None = None
    ) -> Path:
        """Weights (by ``save_weights(folder, step)``), optimizer, RNG and data position."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_weights(folder, self.step)
        return write_state(
            folder, step=self.step, position=self.position, optimizer=self.optimizer, extra=extra
        )

    def resume(self, checkpoint: str | Path) -> TrainingState:
        """Continue from a checkpoint file or the latest checkpoint in a run directory."""
        state = read_state(checkpoint)
        restore_state(state, self.model, self.optimizer)
        self.step, self.position = state.step, state.position
        self._grad_fns.clear()
        return state

    # -- the loop ------------------------------------------------------------------------------

    def fit(
        self,
        train: Batcher,
        *,
        valid: Batcher | None = None,
        checkpoint_dir: str | Path | None = None,
        save_weights: SaveWeights | None = None,
    ) -> dict[str, Any]:
        """Train until ``options.iters`` steps; returns the last report."""
        opts = self.options
        if self.step >= opts.iters:
            raise InvalidArgumentError(
                f"already at step {self.step}, nothing to do for iters={opts.iters}"
            )
        self.model.train()
        self.callbacks.on_train_begin({"iters": opts.iters, "start": self.step})
        stream = train.batches(self.position, loop=True, part=part(self.group))
        window: dict[str, float] = {"loss": 0.0, "count": 0.0, "steps": 0, "time": 0.0}
        trained_tokens = 0.0
        last: dict[str, Any] = {}
        if valid is not None and self.step == 0:
            last.update(self._validate(valid))
        while self.step < opts.iters:
            tic = time.perf_counter()
            batches = []
            for _ in range(opts.grad_accumulation_steps):
                batch, self.position = next(stream)
                batches.append(batch)
            loss, count = self.train_step(batches)
            elapsed = time.perf_counter() - tic
            window["loss"] += loss * count
            window["count"] += count
            window["steps"] += 1
            window["time"] += elapsed
            self.callbacks.on_step_end(
                {"iteration": self.step, "loss": loss, "tokens": count, "seconds": elapsed}
            )
            if self.step % opts.steps_per_report == 0 or self.step == opts.iters:
                trained_tokens += window["count"]
                last = self._report(window, trained_tokens)
                window = {"loss": 0.0, "count": 0.0, "steps": 0, "time": 0.0}
            if valid is not None and (
                self.step % opts.steps_per_eval == 0 or self.step == opts.iters
            ):
                last.update(self._validate(valid))
            if (
                self.primary
                and checkpoint_dir is not None
                and save_weights is not None
                and opts.save_every
                and self.step % opts.save_every == 0
            ):
                path = self.save_checkpoint(checkpoint_dir, save_weights)
                self.callbacks.on_checkpoint({"iteration": self.step, "path": str(path)})
        self.callbacks.on_train_end(last)
        return last

    def _report(self, window: dict[str, float], trained_tokens: float) -> dict[str, Any]:
        lr = self.optimizer.learning_rate
        info = {
            "iteration": self.step,
            "train_loss": window["loss"] / max(window["count"], 1.0),
            "learning_rate": scalar(lr) if isinstance(lr, mx.array) else float(lr),
            "iterations_per_second": window["steps"] / max(window["time"], 1e-9),
            "tokens_per_second": window["count"] / max(window["time"], 1e-9),
            "trained_tokens": int(trained_tokens),
            "peak_memory": mx.get_peak_memory() / 1e9,
        }
        self.callbacks.on_train_loss_report(info)
        return info

    def _validate(self, valid: Batcher) -> dict[str, Any]:
        tic = time.perf_counter()
        value = evaluate(
            self.model,
            (b for b, _ in valid.batches(loop=False, part=part(self.group))),
            loss=self.eval_loss,
            num_batches=self.options.val_batches,
            clear_cache_threshold=self.options.clear_cache_threshold,
            group=self.group,
        )
        info = {"iteration": self.step, "val_loss": value, "val_time": time.perf_counter() - tic}
        self.callbacks.on_val_loss_report(info)
        return info
