"""``train``: a whole fine-tuning run from a :class:`TrainingConfig`.

Load the model and data, put adapters in (or unfreeze blocks), train with checkpoints,
write the adapter in MLX-LM's format, and report validation and test loss. Each piece is
public on its own for callers that assemble their own loop.

Started by ``mlx.launch`` (more than one process), the run is data-parallel: every rank
trains on its slice of each batch (``batch_size`` is the global batch), and only rank 0
prints, reports and writes files (:mod:`._distributed`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlxlm_core import CheckpointError, InvalidArgumentError
from mlxlm_core.adapters import load_adapters, save_adapters

from ._batching import Batcher
from ._callbacks import PrintReporter, ProgressBar, TrainingCallback, make_reporters
from ._config import TrainingConfig
from ._dataset import Dataset, DatasetSplits, load_dataset
from ._distributed import broadcast_trainable, check_batch_size, part, training_group
from ._losses import LossFn, make_dpo_loss, make_orpo_loss, sequence_logprobs, sft_loss
from ._meta import check_base_model, tune_metadata
from ._optim import build_optimizer, build_schedule, schedule_from_config
from ._setup import count_parameters, enable_grad_checkpoint, prepare_model
from ._trainer import Trainer, TrainerOptions, evaluate

__all__ = ["TrainResult", "compute_reference", "make_batcher", "make_loss", "train"]


@dataclass
class TrainResult:
    adapter_path: Path
    steps: int
    train_loss: float | None
    val_loss: float | None
    test_loss: float | None
    trainable_parameters: int
    total_parameters: int
    rank: int = 0  # this process's rank in a data-parallel run (0 when alone)
    world_size: int = 1


def make_batcher(
    dataset: Dataset, config: TrainingConfig, *, shuffle: bool = True, pad_id: int = 0
) -> Batcher:
    return Batcher(
        dataset,
        batch_size=config.batch_size,
        max_seq_length=config.max_seq_length,
        pack=config.pack and not dataset.is_preference,
        bucket=config.bucket,
        shuffle=shuffle,
        seed=config.seed,
        pad_id=pad_id,
    )


def compute_reference(model: nn.Module, dataset: Dataset, *, batch_size: int = 8) -> np.ndarray:
    """The current model's log-likelihood of every chosen and rejected answer, ``(N, 2)``.

    Called before training, with fresh adapters (which change nothing), this is the frozen
    reference model of DPO, computed once instead of kept as a second model in memory.
    """
    if not dataset.is_preference:
        raise InvalidArgumentError(
            f"{dataset.name}: reference log-likelihoods need preference pairs"
        )
    was_training = model.training
    model.eval()
    batcher = Batcher(dataset, batch_size=batch_size, shuffle=False, bucket=False)
    out = np.zeros((len(dataset), 2), np.float64)
    for b, rows in enumerate(batcher.plan(0)):
        logps, _ = sequence_logprobs(model, batcher.make_batch(rows))
        sums = np.array(logps.astype(mx.float32))
        half = len(rows)
        for k, row in enumerate(rows):
            out[row[0]] = (sums[k], sums[half + k])
        del b
    model.train(was_training)
    return out


def make_loss(config: TrainingConfig) -> LossFn:
    if config.loss == "dpo":
        return make_dpo_loss(beta=config.beta)
    if config.loss == "orpo":
        return make_orpo_loss(beta=config.beta)
    return sft_loss


def _learning_rate(config: TrainingConfig) -> Any:
    if isinstance(config.lr_schedule, dict):
        return schedule_from_config(config.lr_schedule, total_steps=config.iters)
    return build_schedule(
        config.learning_rate,
        name=config.lr_schedule or "constant",
        total_steps=config.iters,
        warmup=config.warmup,
        warmup_init=config.warmup_init,
        end=config.lr_end,
    )


def _check_data(splits: DatasetSplits, config: TrainingConfig) -> None:
    for split in (splits.train, splits.valid, splits.test):
        if split is None:
            continue
        if config.loss == "sft" and split.is_preference:
            raise InvalidArgumentError(
                f"{split.name}: preference pairs (chosen/rejected) need --loss dpo or orpo"
            )
        if config.loss != "sft" and not split.is_preference:
            raise InvalidArgumentError(
                f"{split.name}: --loss {config.loss} needs 'prompt', 'chosen' and 'rejected' records"
            )


def _default_callbacks(config: TrainingConfig, run_dir: Path) -> list[TrainingCallback]:
    # The bar (terminal only) shows progress; the printed lines are the run's record.
    callbacks: list[TrainingCallback] = [ProgressBar(), PrintReporter()]
    callbacks += make_reporters(
        config.report_to, run_dir=run_dir, project=config.project_name, config=config.to_dict()
    )
    return callbacks


def train(
    config: TrainingConfig,
    *,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    datasets: DatasetSplits | None = None,
    callbacks: Sequence[TrainingCallback] | None = None,
) -> TrainResult:
    """Run ``config``: train (and/or test) and write the adapter to ``config.adapter_path``.

    ``model`` / ``tokenizer`` / ``datasets`` may be given to skip loading them; ``callbacks``
    replace the default progress bar and printed reports (they run on rank 0 only).
    """
    group = training_group()
    check_batch_size(config.batch_size, group)
    primary = group is None or group.rank() == 0
    mx.random.seed(config.seed)
    if model is None or tokenizer is None:
        from mlxlm_core import load

        model, tokenizer = load(config.model, dtype=config.dtype)
    if datasets is None:
        datasets = load_dataset(
            config.data,
            tokenizer,
            max_seq_length=config.max_seq_length,
            mask_prompt=config.mask_prompt,
            truncate=config.truncate,
            fmt=config.data_format,
        )
    _check_data(datasets, config)
    if config.train and datasets.train is None:
        raise InvalidArgumentError(f"{config.data}: no training set (train.jsonl)")
    if config.test and datasets.test is None:
        raise InvalidArgumentError(f"{config.data}: no test set (test.jsonl)")
    run_dir = Path(config.adapter_path)
    adapter_config = config.adapter_config()
    if config.train:
        prepare_model(model, adapter_config)
    elif (run_dir / "adapter_config.json").is_file():
        # --test alone evaluates the trained adapter (MLX-LM's behaviour).
        check_base_model(model, run_dir)
        load_adapters(model, run_dir)
        model.freeze()
    if config.loss == "dpo":
        for split in (datasets.train, datasets.valid, datasets.test):
            if split is not None:
                split.reference = compute_reference(model, split, batch_size=config.batch_size)
    if config.resume_adapter_file:
        _load_weights_only(model, config.resume_adapter_file)
    if config.grad_checkpoint:
        enable_grad_checkpoint(model)
    if config.train:
        broadcast_trainable(model, group)
    trainable, total = count_parameters(model)
    optimizer = build_optimizer(
        config.optimizer, _learning_rate(config), config.optimizer_options()
    )
    loss = make_loss(config)
    options = TrainerOptions(
        iters=config.iters,
        grad_accumulation_steps=config.grad_accumulation_steps,
        grad_clip=config.grad_clip,
        steps_per_report=config.steps_per_report,
        steps_per_eval=config.steps_per_eval,
        val_batches=config.val_batches,
        save_every=config.save_every,
        clear_cache_threshold=config.clear_cache_threshold,
        compile=config.compile,
        seed=config.seed,
    )
    chosen_callbacks: list[TrainingCallback] = []
    if primary:  # reporters (wandb, files) must not start on the other ranks
        chosen_callbacks = (
            list(callbacks) if callbacks is not None else _default_callbacks(config, run_dir)
        )
    extra = {**config.to_dict(), **tune_metadata(model)}

    def save_weights(folder: Path, step: int, name: str | None = None) -> Path:
        if not primary:  # written once, by rank 0
            return folder / (name or f"{step:07d}_adapters.safetensors")
        return save_adapters(
            folder,
            model,
            adapter_config,
            extra=extra,
            weights_name=name or f"{step:07d}_adapters.safetensors",
        )

    pad_id = int(getattr(tokenizer, "pad_token_id", None) or 0)
    last: dict[str, Any] = {}
    steps = 0
    if config.train:
        assert datasets.train is not None
        trainer = Trainer(
            model,
            optimizer,
            loss=loss,
            options=options,
            callbacks=chosen_callbacks,
            group=group,
        )
        if config.resume:
            check_base_model(model, config.resume)
            trainer.resume(config.resume)
        train_batches = make_batcher(datasets.train, config, pad_id=pad_id)
        valid_batches = (
            make_batcher(datasets.valid, config, shuffle=False, pad_id=pad_id)
            if datasets.valid
            else None
        )
        if primary:
            run_dir.mkdir(parents=True, exist_ok=True)
        save_weights(run_dir, 0, "adapters.safetensors")  # config now, so checkpoints load
        last = trainer.fit(
            train_batches, valid=valid_batches, checkpoint_dir=run_dir, save_weights=save_weights
        )
        save_weights(run_dir, trainer.step, "adapters.safetensors")
        steps = trainer.step
    test_loss = None
    if config.test:
        assert datasets.test is not None
        test_loss = evaluate(
            model,
            (
                b
                for b, _ in make_batcher(
                    datasets.test, config, shuffle=False, pad_id=pad_id
                ).batches(loop=False, part=part(group))
            ),
            loss=loss,
            num_batches=config.test_batches,
            group=group,
        )
        if primary:
            print(f"Test loss {test_loss:.3f}, Test ppl {math.exp(min(test_loss, 50)):.3f}.")
    return TrainResult(
        adapter_path=run_dir,
        steps=steps,
        train_loss=last.get("train_loss"),
        val_loss=last.get("val_loss"),
        test_loss=test_loss,
        trainable_parameters=trainable,
        total_parameters=total,
        rank=0 if group is None else group.rank(),
        world_size=1 if group is None else group.size(),
    )


def _load_weights_only(model: nn.Module, path: str | Path) -> None:
    """MLX-LM's ``--resume-adapter-file``: start from saved weights (no optimizer state)."""
    try:
        weights = mx.load(str(path))
    except (RuntimeError, ValueError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot read adapter weights ({exc})") from None
    assert isinstance(weights, dict)
    trainable = dict(tree_flatten(model.trainable_parameters()))
    unknown = sorted(set(weights) - set(trainable))
    if unknown or any(weights[k].shape != trainable[k].shape for k in weights):
        what = f"unexpected {unknown[:3]}" if unknown else "shapes differ"
        raise CheckpointError(f"{path}: does not fit this model's adapter ({what})")
    model.load_weights(list(weights.items()), strict=False)
