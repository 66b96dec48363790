"""Aggregate decode throughput of mlxlm-server vs MLX-LM's server, same model, same run.

For 1, 4, 8 and 16 concurrent streaming clients (each asks for a greedy continuation of
its own prompt, ``--max-tokens`` tokens), reports completion tokens per second summed over
clients, for ``mlxlm server`` and for ``python -m mlx_lm.server`` on the same model
directory, and the ratios (vs one client, and ours vs MLX-LM).

    uv run python tools/bench_server.py [--model DIR] [--max-tokens 64] [--clients 1 4 8 16]
        [--trials 3] [--json FILE]

Both servers run side by side (an idle server costs no CPU), and every trial measures each
client count on each server in turn, alternating which goes first, so a change in the
machine's load hits both alike; the table gives medians over trials. With every figure
come the 1-minute load average and the CPU time per generated token of the server process
and of this client process (``/proc``), which says whether the client competes with the
server for the cores. Without --model it uses the default model's imported directory.
Figures only: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

CLOCK = os.sysconf("SC_CLK_TCK")
RETRIES = 5


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


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def one_stream(client: httpx.Client, url: str, model: str, prompt: str, max_tokens: int) -> int:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    for attempt in range(RETRIES + 1):
        tokens, received = 0, False
        try:
            with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
                for line in r.iter_lines():
                    received = True
                    # Only the final chunk (stream_options.include_usage) is parsed: the
                    # client shares the server's cores and should cost as little as possible.
                    if line.startswith('data: {"') and '"usage":{' in line.replace(" ", ""):
                        usage = json.loads(line[6:]).get("usage")
                        if usage:
                            tokens = usage["completion_tokens"]
            return tokens
        except httpx.TransportError:
            # MLX-LM's http.server listens with a backlog of 5: a burst of connections can
            # be reset before it accepts them. Retry those; a stream cut midway counts.
            if received or attempt == RETRIES:
                return -1
            time.sleep(0.2 * (attempt + 1))
    return -1


@dataclass
class Figure:
    server: str
    clients: int
    trial: int
    tokens_per_s: float
    tokens: int
    seconds: float
    load: float  # 1-minute load average when the measurement ended
    failed: int  # streams that failed (connection refused or cut): their tokens are lost
    server_cpu_ms_per_token: float
    client_cpu_ms_per_token: float


def measure(
    name: str, url: str, model: str, pid: int, clients: int, max_tokens: int, trial: int
) -> Figure:
    prompts = [f"Write a short story about lighthouse keeper number {i}." for i in range(clients)]
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    with httpx.Client(limits=limits) as client, ThreadPoolExecutor(clients) as pool:
        server_before, client_before = process_cpu(pid), own_cpu()
        start = time.perf_counter()
        counts = list(pool.map(lambda p: one_stream(client, url, model, p, max_tokens), prompts))
        seconds = time.perf_counter() - start
        server_cpu, client_cpu = process_cpu(pid) - server_before, own_cpu() - client_before
    failed = sum(1 for c in counts if c < 0)
    counts = [max(c, 0) for c in counts]
    tokens = max(1, sum(counts))
    return Figure(
        name,
        clients,
        trial,
        sum(counts) / seconds,
        sum(counts),
        seconds,
        os.getloadavg()[0],
        failed,
        1000 * server_cpu / tokens,
        1000 * client_cpu / tokens,
    )


def default_model_dir() -> str:
    from mlxlm_core import load

    model, _ = load(None, lazy=True)
    return str(model.model_path)


def run_server(cmd: list[str]) -> subprocess.Popen[bytes]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def commands(model_dir: str, ports: dict[str, int]) -> dict[str, list[str]]:
    return {
        "mlxlm": [
            str(Path(sys.executable).parent / "mlxlm"),
            "server",
            "--model",
            model_dir,
            "--port",
            str(ports["mlxlm"]),
            "--served-model-name",
            "bench",
            "--max-batch-size",
            "16",
            "--log-level",
            "warning",
        ],
        "mlx_lm": [
            sys.executable,
            "-m",
            "mlx_lm.server",
            "--model",
            model_dir,
            "--port",
            str(ports["mlx_lm"]),
            "--log-level",
            "WARNING",
        ],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--only", choices=["mlxlm", "mlx_lm"], default=None)
    parser.add_argument("--json", default=None, help="write every figure to this file")
    args = parser.parse_args()
    model_dir = args.model or default_model_dir()
    names = [n for n in ("mlxlm", "mlx_lm") if args.only in (None, n)]
    ports = {"mlxlm": free_port(), "mlx_lm": free_port()}
    while ports["mlx_lm"] == ports["mlxlm"]:
        ports["mlx_lm"] = free_port()
    cmds = commands(model_dir, ports)
    procs = {n: run_server(cmds[n]) for n in names}
    urls = {n: f"http://127.0.0.1:{p}" for n, p in ports.items()}
    served = {"mlxlm": "bench", "mlx_lm": model_dir}
    figures: list[Figure] = []
    try:
        for n in names:
            wait_ready(urls[n], procs[n])
            measure(n, urls[n], served[n], procs[n].pid, 1, 4, -1)  # warm-up
        print(f"load average at start: {os.getloadavg()[0]:.2f}", flush=True)
        for trial in range(args.trials):
            for clients in args.clients:
                order = names if (trial + clients) % 2 == 0 else names[::-1]
                for n in order:
                    f = measure(
                        n, urls[n], served[n], procs[n].pid, clients, args.max_tokens, trial
                    )
                    figures.append(f)
                    print(
                        f"trial {trial} {n:7s} clients={clients:2d} {f.tokens_per_s:7.1f} tok/s"
                        f"  load {f.load:4.1f}  cpu/token server {f.server_cpu_ms_per_token:5.1f}"
                        f" ms, client {f.client_cpu_ms_per_token:4.1f} ms"
                        + (f"  FAILED STREAMS: {f.failed}" if f.failed else ""),
                        flush=True,
                    )
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(30)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(f) for f in figures], indent=1))
    report(figures, names, args.clients, model_dir, args.max_tokens)
    return 0


def report(
    figures: list[Figure], names: list[str], clients: list[int], model_dir: str, max_tokens: int
) -> None:
    def median(name: str, n: int, key: str = "tokens_per_s") -> float:
        return statistics.median(
            getattr(f, key) for f in figures if f.server == name and f.clients == n
        )

    loads = [f.load for f in figures]
    trials = len({f.trial for f in figures})
    print(f"\nmodel: {model_dir}  max_tokens: {max_tokens}  medians of {trials} trials")
    print(f"load average during the run: {min(loads):.1f} to {max(loads):.1f}")
    head = "clients  " + "  ".join(f"{k:>22s}" for k in names)
    print(head + ("   mlxlm/mlx_lm" if len(names) == 2 else ""))
    for n in clients:
        cells = []
        for k in names:
            value, base = median(k, n), median(k, clients[0])
            cpu = median(k, n, "server_cpu_ms_per_token")
            cells.append(f"{value:7.1f} ({value / base:4.1f}x) {cpu:5.1f}ms")
        ratio = ""
        if len(names) == 2:
            ratio = f"   {median('mlxlm', n) / median('mlx_lm', n):5.2f}"
        print(f"{n:7d}  " + "  ".join(cells) + ratio)
    print("(tok/s, its ratio to the first client count, server CPU time per token)")
    for k in names:
        failed = sum(f.failed for f in figures if f.server == k)
        if failed:
            print(f"{k}: {failed} streams failed (their tokens are not counted)")


if __name__ == "__main__":
    raise SystemExit(main())
