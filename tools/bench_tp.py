"""Tensor-parallel decode speed: one process per GPU (mlx.launch, NCCL) vs one GPU.

Builds the Llama-3.2-1B-shaped model of tools/bench_cuda.py (same seed on every rank, so
the ranks hold slices of the same weights), shards it with ``--shard tensor`` semantics
(mlxlm_core.distributed.shard_model) when launched on several ranks, and times greedy
decoding at batch 1 (median of ``--runs``). Rank 0 prints one JSON line.

    python tools/bench_tp.py                                   # one GPU
    mlx.launch --backend nccl -n 2 python tools/bench_tp.py    # two GPUs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).parent))
from bench_cuda import LLAMA_1B

LLAMA_8B = {
    **LLAMA_1B,
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "intermediate_size": 14336,
    "head_dim": 128,
    "tie_word_embeddings": False,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--generation-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--shape", choices=["1b", "8b"], default="1b", help="Llama-3.2-1B or Llama-3-8B shape"
    )
    args = parser.parse_args()

    from mlxlm_core import generate_step
    from mlxlm_core.distributed import shard_model, world
    from mlxlm_core.models import get_model_classes

    group = world()
    model_cls, args_cls = get_model_classes("llama")
    mx.random.seed(0)
    config = LLAMA_1B if args.shape == "1b" else LLAMA_8B
    model = model_cls(args_cls.from_dict(config))
    model.set_dtype(getattr(mx, args.dtype))
    if group is not None:
        shard_model(model, group, "tensor")
    mx.eval(model.parameters())
    prompt = mx.random.randint(
        0, LLAMA_1B["vocab_size"], (args.prompt_tokens,), key=mx.random.key(1)
    )
    rates, tokens = [], None
    for run in range(args.runs + 1):  # the first run warms up and is dropped
        first = time.perf_counter()
        out = []
        for i, (token, _) in enumerate(
            generate_step(prompt, model, max_tokens=args.generation_tokens)
        ):
            if i == 0:
                first = time.perf_counter()
            out.append(token)
        if run:
            rates.append((args.generation_tokens - 1) / (time.perf_counter() - first))
        tokens = out
    if group is None or group.rank() == 0:
        print(
            json.dumps(
                {
                    "ranks": 1 if group is None else group.size(),
                    "shape": args.shape,
                    "device": str(mx.default_device()),
                    "decode_tps_median": statistics.median(rates),
                    "decode_tps_runs": rates,
                    "first_tokens": tokens[:8] if tokens else [],
                }
            )
        )


if __name__ == "__main__":
    main()
