"""Decode and prompt speed on a GPU backend: mlxlm vs MLX-LM on a Llama-3.2-1B-shaped model.

Random weights (the shapes are what matter for speed). For each configuration (bfloat16 or
4-bit weights, batch 1 or 16) each engine runs in its own process: mlxlm as ``load`` would
set it up (its execution policy applied), MLX-LM with its defaults and without mlxlm ever
imported (mlxlm's import sets MLX's CUDA graph limits, see mlxlm_core._cuda_env, which would
otherwise apply to MLX-LM too). Each process builds the model (seed 0), prefills
``--prompt-tokens`` per sequence and decodes ``--generation-tokens`` greedily with no stop
tokens: one dropped warm-up, then ``--runs`` timed trials. ``--rounds`` repeats the pair of
processes, the engines' order alternating; medians are over every trial of every round.
Printed: medians, the ratio mlxlm / MLX-LM, peak memory, and for batch 1 the bandwidth bound
(device copy bandwidth / bytes of weights read per token).

    python tools/bench_cuda.py [--configs bf16:1,bf16:16,q4:1,q4:16] [--runs 3] [--rounds 1]

``--engines`` adds mlxlm variants: ``mlxlm-mlxdecode`` (decode_kernels="mlx"),
``mlxlm-nolimits`` (MLX's own graph limits).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
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

ENGINE_ENV = {
    "mlxlm-nolimits": {"MLXLM_CUDA_GRAPH_LIMITS": "0"},
    "mlxlm-ops100": {"MLX_MAX_OPS_PER_BUFFER": "100"},
    "mlxlm-ops64": {"MLX_MAX_OPS_PER_BUFFER": "64"},
}


def build_ours(quant_bits: int | None) -> nn.Module:
    from mlxlm_core.models import get_model_classes
    from mlxlm_core.quantize import quantize_model

    model_cls, args_cls = get_model_classes("llama")
    mx.random.seed(0)
    model = model_cls(args_cls.from_dict(LLAMA_1B))
    model.set_dtype(mx.bfloat16)
    if quant_bits:
        quantize_model(model, bits=quant_bits, group_size=64)
    return model


def build_peer(quant_bits: int | None) -> nn.Module:
    from mlx_lm.models import llama as peer_llama

    mx.random.seed(0)
    model = peer_llama.Model(peer_llama.ModelArgs.from_dict(LLAMA_1B))
    model.set_dtype(mx.bfloat16)
    if quant_bits:
        nn.quantize(model, group_size=64, bits=quant_bits)
    return model


def build_models(quant_bits: int | None) -> tuple[nn.Module, nn.Module]:
    """Both models in one process with the same weights (no execution policy applied)."""
    ours, peer = build_ours(quant_bits), build_peer(quant_bits)
    peer.load_weights(list(tree_flatten(ours.parameters())))
    mx.eval(ours.parameters(), peer.parameters())
    return ours, peer


def weight_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def copy_bandwidth() -> float:
    """Bytes per second moved by a large device copy (read + write) through MLX."""
    x = mx.zeros((1 << 28,), dtype=mx.float32)  # 1 GiB
    mx.eval(x)
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        y = x + 0  # one read, one write
        mx.eval(y)
        best = max(best, 2 * x.nbytes / (time.perf_counter() - start))
    return best


def torch_copy_bandwidth() -> float | None:
    """The same through PyTorch's copy kernel where PyTorch is installed (a second opinion)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    a = torch.empty(1 << 29, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    best = 0.0
    for _ in range(10):
        torch.cuda.synchronize()
        start = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        best = max(best, 2 * a.nbytes / (time.perf_counter() - start))
    del a, b
    torch.cuda.empty_cache()
    return best


def single(engine: str, model: nn.Module, prompt: mx.array, n: int) -> dict[str, float]:
    if engine.startswith("mlxlm"):
        from mlxlm_core import generate_step
    else:
        from mlx_lm.generate import generate_step  # type: ignore[no-redef]
    mx.synchronize()
    mx.reset_peak_memory()
    start = time.perf_counter()
    first, prompt_peak = 0.0, 0
    for i, _ in enumerate(generate_step(prompt, model, max_tokens=n)):
        if i == 0:
            first = time.perf_counter()
            prompt_peak = mx.get_peak_memory()
    end = time.perf_counter()
    return {
        "prompt_tps": prompt.size / (first - start),
        "decode_tps": (n - 1) / (end - first),
        "peak_gb": mx.get_peak_memory() / 1e9,
        "prompt_peak_gb": prompt_peak / 1e9,  # where the peak is reached: prompt or decode
    }


def batched(engine: str, model: nn.Module, prompts: list[list[int]], n: int) -> dict[str, float]:
    mx.synchronize()
    mx.reset_peak_memory()
    start = time.perf_counter()
    produced, first = 0, 0.0
    if engine.startswith("mlxlm"):
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


def worker(engine: str, config: str, args: argparse.Namespace) -> dict[str, Any]:
    """One engine, one configuration, in this process."""
    kind, batch_text = config.split(":")
    batch = int(batch_text)
    bits = 4 if kind == "q4" else None
    out: dict[str, Any] = {"engine": engine, "config": config}
    if engine.startswith("mlxlm"):
        from mlxlm_core._policy import apply_policy, choose_policy

        model = build_ours(bits)
        decode = "mlx" if engine == "mlxlm-mlxdecode" else "auto"
        policy = apply_policy(model, choose_policy(model=model, decode_kernels=decode))
        out["policy"] = policy.describe()
    else:
        model = build_peer(bits)
    mx.eval(model.parameters())
    out["weight_gb"] = weight_bytes(model) / 1e9
    out["graph_env"] = {k: v for k, v in os.environ.items() if k.startswith("MLX_")}
    if args.bandwidth:
        out["copy_bandwidth_gbs"] = copy_bandwidth() / 1e9
        torch_bw = torch_copy_bandwidth()
        if torch_bw:
            out["torch_copy_bandwidth_gbs"] = torch_bw / 1e9
    key = mx.random.key(1)
    prompts = mx.random.randint(0, LLAMA_1B["vocab_size"], (batch, args.prompt_tokens), key=key)
    trials = []
    for trial in range(args.runs + 1):  # the first warms up kernels and is dropped
        if batch == 1:
            r = single(engine, model, prompts[0], args.generation_tokens)
        else:
            r = batched(engine, model, prompts.tolist(), args.generation_tokens)
        if trial:
            trials.append(r)
    out["trials"] = trials
    out["device"] = mx.device_info().get("device_name", str(mx.default_device()))
    return out


def spawn(engine: str, config: str, args: argparse.Namespace, bandwidth: bool) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        engine,
        "--configs",
        config,
        "--runs",
        str(args.runs),
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--generation-tokens",
        str(args.generation_tokens),
    ]
    if bandwidth:
        cmd.append("--bandwidth")
    env = {**os.environ, **ENGINE_ENV.get(engine, {})}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{engine} {config} failed:\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="bf16:1,bf16:16,q4:1,q4:16")
    parser.add_argument("--engines", default="mlxlm,mlx-lm")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--generation-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--bandwidth", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.configs, args)), flush=True)
        return
    engines = args.engines.split(",")
    report: dict[str, Any] = {"results": {}}
    measured_bandwidth = False
    for config in args.configs.split(","):
        runs: dict[str, list[dict[str, Any]]] = {e: [] for e in engines}
        for rnd in range(args.rounds):
            for engine in engines if rnd % 2 == 0 else list(reversed(engines)):
                out = spawn(engine, config, args, bandwidth=not measured_bandwidth)
                if not measured_bandwidth:
                    report["device"] = out["device"]
                    report["copy_bandwidth_gbs"] = out["copy_bandwidth_gbs"]
                    if "torch_copy_bandwidth_gbs" in out:
                        report["torch_copy_bandwidth_gbs"] = out["torch_copy_bandwidth_gbs"]
                    measured_bandwidth = True
                runs[engine].append(out)
                print(f"# {config} {engine}: {[round(t['decode_tps']) for t in out['trials']]}")
        entry: dict[str, Any] = {"median": {}, "ratio": {}}
        for engine, outs in runs.items():
            trials = [t for o in outs for t in o["trials"]]
            entry["median"][engine] = {
                k: statistics.median(t[k] for t in trials) for k in trials[0]
            }
            entry["median"][engine]["all_decode_tps"] = [round(t["decode_tps"]) for t in trials]
            if "policy" in outs[0]:
                entry.setdefault("policy", {})[engine] = outs[0]["policy"]
            entry["weight_gb"] = outs[0]["weight_gb"]
        peer = entry["median"].get("mlx-lm")
        for engine in engines:
            if engine != "mlx-lm" and peer:
                med = entry["median"][engine]
                entry["ratio"][engine] = {
                    k: med[k] / peer[k] for k in ("prompt_tps", "decode_tps", "peak_gb")
                }
        if config.endswith(":1"):
            ours = entry["median"][engines[0]]["decode_tps"]
            for key in ("copy_bandwidth_gbs", "torch_copy_bandwidth_gbs"):
                if key in report:
                    bound = report[key] * 1e9 / (entry["weight_gb"] * 1e9)
                    entry[f"bound_tps_{key}"] = bound
                    entry[f"fraction_of_bound_{key}"] = ours / bound
        report["results"][config] = entry
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
