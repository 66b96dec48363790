"""``mlxlm lora``: fine-tune with LoRA, DoRA, full training, DPO or ORPO (MLX-LM's flags).

Every flag defaults to "not given", so a YAML config (``-c``) fills what the command line
leaves out and :class:`TrainingConfig`'s defaults fill the rest.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mlxlm_core.adapters import FINE_TUNE_TYPES
from mlxlm_core.cli import Command, console

from ._config import LOSSES, TrainingConfig, load_yaml
from ._optim import OPTIMIZERS, SCHEDULES
from ._records import FORMATS

__all__ = ["COMMAND", "main"]


def _size(text: str) -> int:
    """``512MB``, ``2GB`` or a byte count (for --clear-cache-threshold)."""
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    upper = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * units[unit])
    return int(upper)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--model", default=None, help="model directory, .gguf file or hub id (default model)")
    a("--train", action="store_true", default=None, help="train (default unless --test alone)")
    a("--test", action="store_true", default=None, help="report test loss after training")
    a(
        "--data",
        default=None,
        help="directory with train/valid/test.jsonl, a .jsonl file, or a hub dataset",
    )
    a("--data-format", choices=FORMATS, default=None, help="force the record format")
    a("--fine-tune-type", choices=FINE_TUNE_TYPES, default=None)
    a("--loss", choices=LOSSES, default=None, help="sft (default), dpo or orpo")
    a("--beta", type=float, default=None, help="DPO/ORPO strength (default 0.1)")
    a("--optimizer", choices=sorted(OPTIMIZERS), default=None)
    a(
        "--mask-prompt",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train only on assistant turns / completions (default: on)",
    )
    a("--num-layers", type=int, default=None, help="blocks to adapt, from the last (-1: all)")
    a("--rank", type=int, default=None, help="LoRA rank (lora_parameters.rank)")
    a("--scale", type=float, default=None, help="LoRA scale (lora_parameters.scale)")
    a("--dropout", type=float, default=None, help="LoRA dropout (lora_parameters.dropout)")
    a("--batch-size", type=int, default=None)
    a("--iters", type=int, default=None, help="optimizer steps")
    a("--val-batches", type=int, default=None, help="-1: whole validation set")
    a("--learning-rate", type=float, default=None)
    a("--lr-schedule", choices=SCHEDULES, default=None)
    a("--warmup", type=int, default=None, help="linear warmup steps")
    a("--warmup-init", type=float, default=None)
    a("--lr-end", type=float, default=None, help="final learning rate of cosine/linear decay")
    a("--steps-per-report", type=int, default=None)
    a("--steps-per-eval", type=int, default=None)
    a("--grad-accumulation-steps", type=int, default=None)
    a("--grad-clip", type=float, default=None, help="clip the gradient norm")
    a("--resume", default=None, help="resume exactly from a checkpoint or run directory")
    a("--resume-adapter-file", default=None, help="start from these adapter weights")
    a("--adapter-path", default=None, help="where the adapter and checkpoints go")
    a("--save-every", type=int, default=None, help="checkpoint every N steps")
    a("--test-batches", type=int, default=None)
    a("--max-seq-length", type=int, default=None)
    a(
        "--truncate",
        action="store_true",
        default=None,
        help="truncate examples longer than --max-seq-length instead of refusing them",
    )
    a(
        "--pack",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pack several examples per row (block-diagonal attention)",
    )
    a(
        "--bucket",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="batch examples of similar length together (default: on)",
    )
    a("-c", "--config", default=None, help="YAML file of options (flags take precedence)")
    a("--grad-checkpoint", action="store_true", default=None)
    a("--clear-cache-threshold", type=_size, default=None, help="e.g. 2GB")
    a("--report-to", default=None, help="comma-separated reporters: wandb, jsonl")
    a("--project-name", default=None)
    a("--seed", type=int, default=None)
    a("--no-compile", dest="compile", action="store_false", default=None)
    a("--dtype", choices=["auto", "keep", "float32", "float16", "bfloat16"], default=None)


def config_from_args(args: argparse.Namespace) -> TrainingConfig:
    values: dict[str, Any] = {}
    if args.config:
        values.update(load_yaml(args.config))
    flags = {
        k: v
        for k, v in vars(args).items()
        if v is not None and k not in ("config", "rank", "scale", "dropout")
    }
    lora = dict(values.get("lora_parameters") or {})
    for key in ("rank", "scale", "dropout"):
        if getattr(args, key) is not None:
            lora[key] = getattr(args, key)
    if lora:
        values["lora_parameters"] = lora
    if args.test and args.train is None and "train" not in values:
        flags["train"] = False
    values.update(flags)
    return TrainingConfig.from_dict(values, source=args.config or "options")


def run(args: argparse.Namespace) -> int:
    from ._api import train

    config = config_from_args(args)
    try:
        result = train(config)
    except ImportError as exc:
        sys.stderr.write(f"mlxlm lora: error: {exc}\n")
        return 1
    if config.train and result.rank == 0:
        print(
            f"Trained {result.steps} steps ({result.trainable_parameters:,} of "
            f"{result.total_parameters:,} parameters); adapter in {result.adapter_path}"
        )
    return 0


COMMAND = Command(
    name="lora",
    help="fine-tune with LoRA, DoRA, full training, DPO or ORPO",
    add_arguments=add_arguments,
    run=run,
)
main = console(COMMAND)
