"""``mlxlm benchmark``: prompt and generation throughput, time to first token, peak memory.

Prompts are random token ids (seeded), and end-of-sequence never stops a run, so every trial
does exactly ``-p`` prompt and ``-g`` generated tokens per sequence. Batch size 1 times the
single-sequence path (``generate_step``); larger batches time the continuous-batching engine.
One untimed warm-up run comes first; the reported figure is the median over trials.

``--compare mlx-lm[,llama.cpp]`` times the peers on the same checkpoint and prompt ids, each
engine (mlxlm too) in a worker process of its own so peak memory is per engine; trials
alternate between engines and the medians come with ratios mlxlm / peer. MLX-LM runs with its
default settings and, unless ``--peer-blas same``, MLX's bundled BLAS (as installed);
llama.cpp (``llama-cpp-python``) reads the GGUF file with ``--threads`` threads.
``--bandwidth`` adds the memory-bandwidth bound: a large-copy bandwidth divided by the bytes
of weights each engine reads per generated token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

from .args import add_cache_args, add_model_args, load_from_args, positive_int
from .command import Command, console


@dataclass(frozen=True)
class Trial:
    prompt_tps: float  # prompt tokens (all rows) per second until the first token
    generation_tps: float  # generated tokens (all rows) per second after the first
    ttft_s: float  # time to first token
    total_s: float
    peak_memory_gb: float


def _single(model: Any, prompt: list[int], generate: int, options: dict[str, Any]) -> Trial:
    import mlx.core as mx

    from .._generate import generate_step

    mx.reset_peak_memory()
    start = time.perf_counter()
    first = start
    count = 0
    for count, _ in enumerate(
        generate_step(mx.array(prompt), model, max_tokens=generate, **options), 1
    ):
        if count == 1:
            first = time.perf_counter()
    end = time.perf_counter()
    return _trial(len(prompt), count, start, first, end, rows=1)


def _batched(model: Any, prompts: list[list[int]], generate: int, options: dict[str, Any]) -> Trial:
    import mlx.core as mx

    from .._engine import BatchGenerator

    mx.reset_peak_memory()
    engine = BatchGenerator(
        model,
        completion_batch_size=len(prompts),
        prefill_batch_size=len(prompts),
        **options,
    )
    start = time.perf_counter()
    engine.insert(prompts, max_tokens=generate)
    first = start
    steps = 0
    while engine.has_work:
        if engine.next():
            steps += 1
            if steps == 1:
                first = time.perf_counter()
    end = time.perf_counter()
    return _trial(len(prompts[0]), steps, start, first, end, rows=len(prompts))


def _trial(
    prompt_len: int, steps: int, start: float, first: float, end: float, *, rows: int
) -> Trial:
    import mlx.core as mx

    ttft = first - start
    return Trial(
        prompt_tps=rows * prompt_len / max(ttft, 1e-9),
        generation_tps=rows * (steps - 1) / max(end - first, 1e-9) if steps > 1 else 0.0,
        ttft_s=ttft,
        total_s=end - start,
        peak_memory_gb=mx.get_peak_memory() / 1e9,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument("--prompt-tokens", "-p", type=positive_int, default=512)
    parser.add_argument("--generation-tokens", "-g", type=positive_int, default=1024)
    parser.add_argument("--batch-size", "-b", type=positive_int, default=1)
    parser.add_argument("--num-trials", "-n", type=positive_int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--compare",
        default=None,
        help="peers to time in the same run, comma-separated: mlx-lm, llama.cpp",
    )
    parser.add_argument("--gguf", default=None, help="GGUF file for llama.cpp (default model's)")
    parser.add_argument("--threads", type=positive_int, default=2, help="llama.cpp threads")
    parser.add_argument(
        "--peer-blas",
        choices=["default", "same"],
        default="default",
        help="MLX-LM's BLAS: MLX's bundled one as installed (default) or the one mlxlm uses",
    )
    parser.add_argument(
        "--bandwidth", action="store_true", help="measure memory bandwidth, print the bound"
    )
    add_cache_args(parser)


def run(args: argparse.Namespace) -> int:
    if args.compare is not None or args.bandwidth:
        from ._bench_compare import run_compare

        return run_compare(args)
    import mlx.core as mx

    from .._loading import load_config

    model, _tokenizer = load_from_args(args)
    vocab = getattr(getattr(model, "args", None), "vocab_size", None)
    if vocab is None:
        config = load_config(model.model_path)
        vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    mx.random.seed(args.seed)
    prompts: list[list[int]] = mx.random.randint(  # type: ignore[assignment]
        0, vocab, (args.batch_size, args.prompt_tokens)
    ).tolist()
    cache = {
        "max_kv_size": args.max_kv_size,
        "kv_bits": args.kv_bits,
        "kv_group_size": args.kv_group_size,
        "prefill_step_size": args.prefill_step_size,
    }

    def once() -> Trial:
        if args.batch_size == 1:
            return _single(model, prompts[0], args.generation_tokens, cache)
        return _batched(model, prompts, args.generation_tokens, cache)

    from .._blas import blas_info
    from .._loading import describe_policy

    policy, blas = describe_policy(model), blas_info().describe()
    if not args.json:
        print(f"policy: {policy}\nblas: {blas}")
        print("Running warmup...")
    once()
    if not args.json:
        print(
            f"Timing with prompt_tokens={args.prompt_tokens}, "
            f"generation_tokens={args.generation_tokens}, batch_size={args.batch_size}."
        )
    trials = []
    for i in range(args.num_trials):
        trial = once()
        trials.append(trial)
        if not args.json:
            print(f"Trial {i + 1}: {_format(trial)}")
    median = Trial(
        **{
            key: statistics.median(getattr(t, key) for t in trials)
            for key in Trial.__dataclass_fields__
        }
    )
    if args.json:
        print(
            json.dumps(
                {
                    "model": str(getattr(model, "model_path", args.model)),
                    "prompt_tokens": args.prompt_tokens,
                    "generation_tokens": args.generation_tokens,
                    "batch_size": args.batch_size,
                    "num_trials": args.num_trials,
                    "policy": policy,
                    "blas": blas,
                    **asdict(median),
                    "trials": [asdict(t) for t in trials],
                }
            )
        )
    else:
        print(f"Median: {_format(median)}")
    return 0


def _format(trial: Trial) -> str:
    return (
        f"prompt_tps={trial.prompt_tps:.3f}, generation_tps={trial.generation_tps:.3f}, "
        f"ttft={trial.ttft_s:.3f}s, peak_memory={trial.peak_memory_gb:.3f}GB, "
        f"total_time={trial.total_s:.3f}s"
    )


COMMAND = Command(
    "benchmark",
    "measure prompt and generation speed, time to first token, memory",
    add_arguments,
    run,
)
main = console(COMMAND)
