"""Prompt-processing and decoding speed of mlxlm vs the published MLX-LM, same run.

Both engines load the same MLX model directory (by default the imported default model),
get the same prompt token ids and generate a fixed number of tokens greedily (no stop
tokens); this harness times both the same way. Runs alternate between the engines and the
median of ``--runs`` is reported, with the ratio mlxlm / MLX-LM and the peak memory.

    uv run python tools/bench_generate.py [--model DIR] [--prompt-tokens 512]
        [--generation-tokens 128] [--runs 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import mlx.core as mx

Steps = Callable[[mx.array, int], Iterator[object]]


def time_run(steps: Steps, prompt: mx.array, n_gen: int) -> dict[str, float]:
    mx.clear_cache()
    mx.reset_peak_memory()
    start = time.perf_counter()
    first = None
    count = 0
    for count, _ in enumerate(steps(prompt, n_gen), 1):
        if count == 1:
            first = time.perf_counter()
    end = time.perf_counter()
    assert first is not None and count == n_gen, f"expected {n_gen} tokens, got {count}"
    return {
        "prompt_tps": prompt.size / (first - start),
        "decode_tps": (n_gen - 1) / (end - first),
        "ttft_s": first - start,
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
    }


def mlxlm_steps(model_dir: Path) -> Steps:
    from mlxlm_core import load
    from mlxlm_core._generate import generate_step

    model, _ = load(model_dir)

    def steps(prompt: mx.array, n: int) -> Iterator[object]:
        return generate_step(prompt, model, max_tokens=n)

    return steps


def mlx_lm_steps(model_dir: Path) -> Steps:
    from mlx_lm import load as peer_load
    from mlx_lm.generate import generate_step as peer_step

    model, _ = peer_load(str(model_dir))

    def steps(prompt: mx.array, n: int) -> Iterator[object]:
        return peer_step(prompt, model, max_tokens=n)

    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="MLX model directory (default model)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--generation-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from mlxlm_core._resolve import resolve_model_path

    model_dir = resolve_model_path(args.model)
    config = json.loads((model_dir / "config.json").read_text())
    prompt = mx.random.randint(3, config["vocab_size"], (args.prompt_tokens,), key=mx.random.key(0))
    engines = {"mlxlm": mlxlm_steps(model_dir), "mlx-lm": mlx_lm_steps(model_dir)}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in engines}
    for run in range(args.runs):
        order = list(engines) if run % 2 == 0 else list(reversed(engines))
        for name in order:
            results[name].append(time_run(engines[name], prompt, args.generation_tokens))
    summary = {
        name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for name, runs in results.items()
    }
    ratios = {
        key: summary["mlxlm"][key] / summary["mlx-lm"][key] for key in ("prompt_tps", "decode_tps")
    }
    report = {
        "model": str(model_dir),
        "prompt_tokens": args.prompt_tokens,
        "generation_tokens": args.generation_tokens,
        "runs": args.runs,
        "median": summary,
        "ratio_mlxlm_over_mlx_lm": ratios,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"model: {model_dir}  prompt {args.prompt_tokens} tok, generate {args.generation_tokens} tok, "
        f"median of {args.runs}"
    )
    print(f"{'engine':<8} {'prompt tok/s':>13} {'decode tok/s':>13} {'TTFT s':>8} {'peak GB':>8}")
    for name, s in summary.items():
        print(
            f"{name:<8} {s['prompt_tps']:>13.1f} {s['decode_tps']:>13.2f} {s['ttft_s']:>8.2f} "
            f"{s['peak_memory_gb']:>8.3f}"
        )
    print(
        f"ratio mlxlm / mlx-lm: prompt {ratios['prompt_tps']:.2f}x, decode {ratios['decode_tps']:.2f}x"
    )


if __name__ == "__main__":
    main()
