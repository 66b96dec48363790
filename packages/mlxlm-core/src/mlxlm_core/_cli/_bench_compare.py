"""``mlxlm benchmark --compare``: mlxlm against MLX-LM and llama.cpp, same prompt, same run."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
from pathlib import Path
from typing import Any

from .._errors import InvalidArgumentError, UnsupportedError
from ._bench_peers import Spec, Worker, measure_bandwidth

PEERS = {"mlx-lm": ("mlx_lm", "mlx-lm"), "llama.cpp": ("llama_cpp", "llama-cpp-python")}
METRICS = ("prompt_tps", "generation_tps", "ttft_s", "total_s", "peak_memory_gb", "peak_rss_gb")


def _peers(text: str | None) -> list[str]:
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    for name in names:
        if name not in PEERS:
            raise InvalidArgumentError(
                f"--compare takes {', '.join(PEERS)} (comma-separated); got {name!r}"
            )
        module, package = PEERS[name]
        if importlib.util.find_spec(module) is None:
            raise UnsupportedError(f"--compare {name} needs {package}: pip install {package}")
    return list(dict.fromkeys(names))


def _gguf_path(args: argparse.Namespace) -> str:
    if args.gguf:
        return args.gguf
    if args.model and str(args.model).endswith(".gguf"):
        return str(args.model)
    if args.model is None:
        from .._default_model import default_model_path

        return str(default_model_path())
    raise InvalidArgumentError("--compare llama.cpp needs a GGUF file: pass --gguf PATH")


def run_compare(args: argparse.Namespace) -> int:
    import mlx.core as mx

    from .._mx_typed import int_list
    from .._resolve import resolve_model_path

    peers = _peers(args.compare)
    if args.batch_size != 1:
        raise InvalidArgumentError("--compare and --bandwidth time batch size 1 only")
    model_dir = resolve_model_path(args.model, revision=args.revision)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    mx.random.seed(args.seed)
    prompt = int_list(mx.random.randint(0, vocab, (args.prompt_tokens,)))
    options = {"dtype": args.dtype, "weight_mode": args.weight_mode}
    if args.adapter_path:
        options["adapter_path"] = args.adapter_path

    def spec(engine: str, model: str) -> Spec:
        return Spec(engine, model, prompt, args.generation_tokens, options, args.threads)

    specs = [spec("mlxlm", str(model_dir))]
    if "mlx-lm" in peers:
        specs.append(spec("mlx-lm", str(model_dir)))
    if "llama.cpp" in peers:
        specs.append(spec("llama.cpp", _gguf_path(args)))
    workers: list[Worker] = []
    try:
        for s in specs:
            blas = "off" if s.engine != "mlxlm" and args.peer_blas == "default" else None
            worker = Worker(s, blas=blas)
            if "error" in worker.info:
                raise UnsupportedError(worker.info["error"])
            workers.append(worker)
        bandwidth = measure_bandwidth() if args.bandwidth else None
        trials: dict[str, list[dict[str, Any]]] = {w.engine: [] for w in workers}
        for i in range(args.num_trials):
            for worker in workers if i % 2 == 0 else workers[::-1]:
                trials[worker.engine].append(worker.run())
                if not args.json:
                    print(f"trial {i + 1} {worker.engine}: {_brief(trials[worker.engine][-1])}")
    finally:
        for worker in workers:
            worker.close()
    report = _report(args, model_dir, workers, trials, bandwidth)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return 0


def _median(runs: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in runs if not math.isnan(r[key])]
    return statistics.median(values) if values else float("nan")


def _report(
    args: argparse.Namespace,
    model_dir: Path,
    workers: list[Worker],
    trials: dict[str, list[dict[str, Any]]],
    bandwidth: float | None,
) -> dict[str, Any]:
    engines: dict[str, Any] = {}
    for worker in workers:
        runs = trials[worker.engine]
        summary: dict[str, Any] = {key: _median(runs, key) for key in METRICS}
        summary["policy"] = worker.info.get("policy")
        summary["decode_bytes"] = worker.info.get("decode_bytes")
        if worker.info.get("blas"):
            summary["blas"] = worker.info["blas"]
        if bandwidth is not None and summary["decode_bytes"]:
            bound = bandwidth * 1e9 / summary["decode_bytes"]
            summary["bandwidth_bound_tps"] = bound
            summary["fraction_of_bound"] = summary["generation_tps"] / bound
        summary["load_avg"] = [r["load"] for r in runs]
        summary["trials"] = runs
        engines[worker.engine] = summary
    ours = engines["mlxlm"]
    ratios = {
        peer: {
            "prompt_tps": ours["prompt_tps"] / s["prompt_tps"],
            "generation_tps": ours["generation_tps"] / s["generation_tps"],
            "peak_rss_gb": ours["peak_rss_gb"] / s["peak_rss_gb"],
            **(
                {"peak_memory_gb": ours["peak_memory_gb"] / s["peak_memory_gb"]}
                if not math.isnan(s["peak_memory_gb"])
                else {}
            ),
        }
        for peer, s in engines.items()
        if peer != "mlxlm"
    }
    return {
        "model": str(model_dir),
        "prompt_tokens": args.prompt_tokens,
        "generation_tokens": args.generation_tokens,
        "num_trials": args.num_trials,
        "memory_bandwidth_gbps": bandwidth,
        "engines": engines,
        "ratios_mlxlm_over_peer": ratios,
    }


def _brief(r: dict[str, Any]) -> str:
    return (
        f"prompt {r['prompt_tps']:.1f} tok/s, decode {r['generation_tps']:.2f} tok/s, "
        f"peak {r['peak_memory_gb']:.3f} GB (rss {r['peak_rss_gb']:.3f}), load {r['load']:.2f}"
    )


def _print(report: dict[str, Any]) -> None:
    print(
        f"\nmodel {report['model']}: prompt {report['prompt_tokens']} tokens, "
        f"{report['generation_tokens']} generated, median of {report['num_trials']}"
    )
    bw = report["memory_bandwidth_gbps"]
    if bw is not None:
        print(f"memory bandwidth (large copy): {bw:.1f} GB/s")
    head = f"{'engine':<10} {'prompt tok/s':>12} {'decode tok/s':>12} {'TTFT s':>7}"
    head += f" {'MLX peak GB':>11} {'RSS GB':>7} {'MB/token':>9} {'bound tok/s':>11}"
    print(head)
    for name, s in report["engines"].items():
        bound = s.get("bandwidth_bound_tps")
        mb = (s["decode_bytes"] or 0) / 1e6
        print(
            f"{name:<10} {s['prompt_tps']:>12.1f} {s['generation_tps']:>12.2f} "
            f"{s['ttft_s']:>7.2f} {s['peak_memory_gb']:>11.3f} {s['peak_rss_gb']:>7.3f} "
            f"{mb:>9.1f} {(f'{bound:.0f}' if bound else '-'):>11}"
        )
    for name, s in report["engines"].items():
        print(f"  {name}: {s['policy']}" + (f"; blas {s['blas']}" if s.get("blas") else ""))
    for peer, r in report["ratios_mlxlm_over_peer"].items():
        memory = f", MLX peak memory {r['peak_memory_gb']:.2f}x" if "peak_memory_gb" in r else ""
        print(
            f"mlxlm / {peer}: prompt {r['prompt_tps']:.2f}x, decode {r['generation_tps']:.2f}x"
            f"{memory}, RSS {r['peak_rss_gb']:.2f}x"
        )
