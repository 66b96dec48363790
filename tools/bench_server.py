"""Aggregate decode throughput of mlxlm-server vs MLX-LM's server, same model, same run.

For 1, 4, 8 and 16 concurrent streaming clients (each asks for a greedy continuation of
its own prompt, ``--max-tokens`` tokens), prints completion tokens per second summed over
clients, for ``mlxlm server`` and for ``python -m mlx_lm.server`` on the same model
directory, and the ratios (vs one client, and ours vs MLX-LM).

    uv run python tools/bench_server.py [--model DIR] [--max-tokens 64] [--clients 1 4 8 16]

Without --model it uses the default model's imported directory. Figures only: nothing
here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with status {proc.returncode}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not come up")


def one_stream(url: str, model: str, prompt: str, max_tokens: int) -> int:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    tokens = 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            usage = json.loads(line[6:]).get("usage")
            if usage:  # the final chunk (stream_options.include_usage)
                tokens = usage["completion_tokens"]
    return tokens


def measure(url: str, model: str, clients: int, max_tokens: int) -> float:
    prompts = [f"Write a short story about lighthouse keeper number {i}." for i in range(clients)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        counts = list(pool.map(lambda p: one_stream(url, model, p, max_tokens), prompts))
    seconds = time.perf_counter() - start
    return sum(counts) / seconds


def default_model_dir() -> str:
    from mlxlm_core import load

    model, _ = load(None, lazy=True)
    return str(model.model_path)


def run_server(cmd: list[str], port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--only", choices=["mlxlm", "mlx_lm"], default=None)
    args = parser.parse_args()
    model_dir = args.model or default_model_dir()
    servers = {
        "mlxlm": lambda port: [
            str(Path(sys.executable).parent / "mlxlm"),
            "server",
            "--model",
            model_dir,
            "--port",
            str(port),
            "--served-model-name",
            "bench",
            "--max-batch-size",
            "16",
            "--log-level",
            "warning",
        ],
        "mlx_lm": lambda port: [
            sys.executable,
            "-m",
            "mlx_lm.server",
            "--model",
            model_dir,
            "--port",
            str(port),
            "--log-level",
            "WARNING",
        ],
    }
    results: dict[str, dict[int, float]] = {}
    for name, make in servers.items():
        if args.only and name != args.only:
            continue
        port = free_port()
        proc = run_server(make(port), port)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, proc)
            served = "bench" if name == "mlxlm" else model_dir
            measure(url, served, 1, 4)  # warm-up
            results[name] = {}
            for n in args.clients:
                results[name][n] = measure(url, served, n, args.max_tokens)
                print(f"{name:7s} clients={n:2d}  {results[name][n]:8.1f} tok/s", flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"\nmodel: {model_dir}  max_tokens: {args.max_tokens}")
    print(
        "clients  "
        + "  ".join(f"{k:>16s}" for k in results)
        + ("   mlxlm/mlx_lm" if len(results) == 2 else "")
    )
    for n in args.clients:
        row = "  ".join(
            f"{results[k][n]:7.1f} ({results[k][n] / results[k][args.clients[0]]:4.1f}x)"
            for k in results
        )
        ratio = f"   {results['mlxlm'][n] / results['mlx_lm'][n]:5.2f}" if len(results) == 2 else ""
        print(f"{n:7d}  {row}{ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
