"""Decode and prompt speed on a GPU backend: mlxlm vs MLX-LM on a Llama-3.2-1B-shaped model.

Random weights (the shapes are what matter for speed), built once and loaded into both
libraries' llama implementations. For each configuration (bfloat16 or 4-bit weights,
batch 1 or 16) both engines prefill ``--prompt-tokens`` per sequence and decode
``--generation-tokens`` greedily with no stop tokens; the median of ``--runs`` is printed
with the ratio mlxlm / MLX-LM, peak memory, and the batch-1 decode bandwidth bound
(measured device copy bandwidth / bytes of weights read per token).

    python tools/bench_cuda.py [--configs bf16:1,bf16:16,q4:1,q4:16] [--runs 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

LLAMA_1B = dict(
    model_type="llama",
    hidden_size=2048,
    num_hidden_layers=16,
    intermediate_size=8192,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    rms_norm_eps=1e-5,
    vocab_size=128256,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rope_scaling={
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    tie_word_embeddings=True,
)


def build_models(quant_bits: int | None) -> tuple[nn.Module, nn.Module]:
    from mlx_lm.models import llama as peer_llama
    from mlxlm_core.models import get_model_classes
    from mlxlm_core.quantize import quantize_model

    model_cls, args_cls = get_model_classes("llama")
    mx.random.seed(0)
    ours = model_cls(args_cls.from_dict(LLAMA_1B))
    ours.set_dtype(mx.bfloat16)
    peer = peer_llama.Model(peer_llama.ModelArgs.from_dict(LLAMA_1B))
    peer.set_dtype(mx.bfloat16)
    if quant_bits:
        quantize_model(ours, bits=quant_bits, group_size=64)
        nn.quantize(peer, group_size=64, bits=quant_bits)
    peer.load_weights(list(tree_flatten(ours.parameters())))
    mx.eval(ours.parameters(), peer.parameters())
    return ours, peer


def weight_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def copy_bandwidth() -> float:
    """Bytes per second moved by a large device copy (read + write)."""
    x = mx.zeros((1 << 28,), dtype=mx.float32)  # 1 GiB
    mx.eval(x)
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        y = x + 0  # one read, one write
        mx.eval(y)
        best = max(best, 2 * x.nbytes / (time.perf_counter() - start))
    return best


def single(engine: str, model: nn.Module, prompt: mx.array, n: int) -> dict[str, float]:
    if engine == "mlxlm":
        from mlxlm_core import generate_step
    else:
        from mlx_lm.generate import generate_step  # type: ignore[no-redef]
    mx.synchronize()
    mx.reset_peak_memory()
    start = time.perf_counter()
    first = 0.0
    for i, _ in enumerate(generate_step(prompt, model, max_tokens=n)):
        if i == 0:
            first = time.perf_counter()
    end = time.perf_counter()
    return {
        "prompt_tps": prompt.size / (first - start),
        "decode_tps": (n - 1) / (end - first),
        "peak_gb": mx.get_peak_memory() / 1e9,
    }


def batched(engine: str, model: nn.Module, prompts: list[list[int]], n: int) -> dict[str, float]:
    mx.synchronize()
    mx.reset_peak_memory()
    start = time.perf_counter()
    produced, first = 0, 0.0
    if engine == "mlxlm":
        from mlxlm_core import BatchGenerator

        gen = BatchGenerator(
            model, completion_batch_size=len(prompts), prefill_batch_size=len(prompts)
        )
        gen.insert(prompts, max_tokens=n)
        while gen.has_work:
            out = gen.next()
            if out and not first:
                first = time.perf_counter()
            produced += len(out)
    else:
        from mlx_lm.generate import BatchGenerator as PeerBatch

        gen = PeerBatch(
            model, max_tokens=n, completion_batch_size=len(prompts), prefill_batch_size=len(prompts)
        )
        gen.insert(prompts, [n] * len(prompts))
        while True:
            out = gen.next_generated()
            if not out:
                break
            if not first:
                first = time.perf_counter()
            produced += len(out)
    end = time.perf_counter()
    count = len(prompts)
    assert produced == count * n, (engine, produced)
    return {
        "prompt_tps": sum(map(len, prompts)) / (first - start),
        "decode_tps": (produced - count) / (end - first),
        "peak_gb": mx.get_peak_memory() / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="bf16:1,bf16:16,q4:1,q4:16")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--generation-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report: dict[str, Any] = {
        "device": str(mx.default_device()),
        "copy_bandwidth_gbs": copy_bandwidth() / 1e9,
    }
    results = {}
    for config in args.configs.split(","):
        kind, batch = config.split(":")
        batch = int(batch)
        ours, peer = build_models(4 if kind == "q4" else None)
        key = mx.random.key(1)
        prompts = mx.random.randint(0, LLAMA_1B["vocab_size"], (batch, args.prompt_tokens), key=key)
        rows: dict[str, list[dict[str, float]]] = {"mlxlm": [], "mlx-lm": []}
        engines = {"mlxlm": ours, "mlx-lm": peer}
        for run in range(args.runs + 1):  # the first round warms up kernels and is dropped
            order = list(engines) if run % 2 == 0 else list(reversed(engines))
            for name in order:
                if batch == 1:
                    r = single(name, engines[name], prompts[0], args.generation_tokens)
                else:
                    r = batched(name, engines[name], prompts.tolist(), args.generation_tokens)
                if run:
                    rows[name].append(r)
        med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in rows.items()}
        entry: dict[str, Any] = {"median": med}
        entry["ratio"] = {
            k: med["mlxlm"][k] / med["mlx-lm"][k] for k in ("prompt_tps", "decode_tps")
        }
        if batch == 1:
            bound = report["copy_bandwidth_gbs"] * 1e9 / weight_bytes(ours)
            entry["bandwidth_bound_tps"] = bound
            entry["fraction_of_bound"] = med["mlxlm"]["decode_tps"] / bound
        entry["weight_gb"] = weight_bytes(ours) / 1e9
        results[config] = entry
        del ours, peer
        mx.clear_cache()
    report["results"] = results
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
