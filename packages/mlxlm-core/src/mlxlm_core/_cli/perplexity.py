"""``mlxlm perplexity``: how well a model predicts a local text, offline.

Perplexity is ``exp`` of the mean next-token cross-entropy over fixed windows of the text;
its standard error comes from the per-token losses by the delta method
(``se(ppl) ≈ ppl · sd(loss) / sqrt(n)``), as MLX-LM reports it.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from .args import add_model_args, load_from_args, positive_int
from .command import Command, console
from .progress import progress_bar


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    standard_error: float
    mean_loss: float
    tokens: int  # predictions scored
    samples: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def evaluate_perplexity(
    model: Any,
    windows: Any,
    *,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``windows`` (an ``(N, L)`` array of token ids)."""
    import mlx.core as mx
    import mlx.nn as nn

    from .._mx_typed import item_float

    start = time.perf_counter()
    losses = []
    for first in range(0, windows.shape[0], batch_size):
        batch = windows[first : first + batch_size]
        logits = model(batch[:, :-1]).astype(mx.float32)
        loss = nn.losses.cross_entropy(logits, batch[:, 1:], reduction="none")
        mx.eval(loss)
        losses.append(loss.reshape(-1))
        if on_batch is not None:
            on_batch(batch.shape[0])
    every = mx.concatenate(losses)
    n = every.size
    mean = item_float(every.mean())
    sd = item_float(mx.sqrt(mx.var(every, ddof=1))) if n > 1 else 0.0
    ppl = math.exp(mean)
    return PerplexityResult(
        perplexity=ppl,
        standard_error=ppl * sd / math.sqrt(n),
        mean_loss=mean,
        tokens=n,
        samples=int(windows.shape[0]),
        seconds=time.perf_counter() - start,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument(
        "--data-path",
        default=None,
        help='a local .txt file or .jsonl file of {"text": ...} records '
        "(default: a short built-in English text)",
    )
    parser.add_argument("--sequence-length", type=positive_int, default=512)
    parser.add_argument(
        "--num-samples", type=int, default=256, help="windows to score (-1: all the text gives)"
    )
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    import mlx.core as mx

    from .._errors import InvalidArgumentError
    from ..data import BUILTIN_TEXT_NAME, builtin_text, read_texts, token_windows

    if args.num_samples == 0 or args.num_samples < -1:
        raise InvalidArgumentError(f"--num-samples must be positive or -1, got {args.num_samples}")
    if args.sequence_length < 2:
        raise InvalidArgumentError("--sequence-length must be >= 2")
    texts = read_texts(args.data_path) if args.data_path else [builtin_text()]
    model, tokenizer = load_from_args(args)
    limit = getattr(getattr(model, "args", None), "max_position_embeddings", None)
    if limit and args.sequence_length - 1 > limit:
        raise InvalidArgumentError(
            f"--sequence-length {args.sequence_length} exceeds the model's context of {limit}"
        )
    windows = token_windows(
        tokenizer, texts, sequence_length=args.sequence_length, num_samples=args.num_samples
    )
    data = mx.array(windows)
    mx.reset_peak_memory()
    bar = progress_bar(len(windows), unit="window")
    try:
        result = evaluate_perplexity(
            model, data, batch_size=args.batch_size, on_batch=bar.update if bar else None
        )
    finally:
        if bar is not None:
            bar.close()
    peak = mx.get_peak_memory() / 1e9
    source = args.data_path or BUILTIN_TEXT_NAME
    if args.json:
        out = {
            **asdict(result),
            "tokens_per_second": result.tokens_per_second,
            "peak_memory_gb": peak,
            "sequence_length": args.sequence_length,
            "data": str(source),
            "model": str(getattr(model, "model_path", args.model)),
        }
        print(json.dumps(out))
        return 0
    print(f"Data: {source} ({result.samples} x {args.sequence_length} tokens)")
    print(f"Perplexity: {result.perplexity:.3f} ± {result.standard_error:.3f}")
    print(f"Evaluation time: {result.seconds:.2f} seconds")
    print(f"Tokens per second: {result.tokens_per_second:.1f}")
    print(f"Peak memory: {peak:.3f} GB")
    return 0


COMMAND = Command("perplexity", "perplexity of a model on a local text", add_arguments, run)
main = console(COMMAND)
