"""Where a decoding step's CPU time goes, per weight mode: threads, graph nodes, tokens/s.

Loads the default model (or ``--model``) with each ``--weight-mode`` in a fresh process,
prefills a random 512-token prompt and decodes ``-g`` tokens greedily through the engine's
own functions (``prefill``/``decode_step`` with ``mx.async_eval``, as ``generate_step``),
then reports wall tokens/s, CPU milliseconds per token for the whole process and for its
two busiest threads (MLX's stream thread computes; the Python thread builds each step's
graph and schedules its nodes), and the number of nodes in one step's graph.

    uv run python tools/bench_decode_cpu.py [--weight-mode native,dense,auto] [-g 128] [--rounds 2]

CPU time is less disturbed than wall time by the other work on a shared machine, which is
why the policy's choices on CPU were measured with it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time


def _thread_cpu() -> dict[str, float]:
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[tid] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _worker(model_path: str | None, weight_mode: str, tokens: int) -> dict:
    import mlxlm_core  # noqa: F401  (the BLAS before mlx.core)

    # isort: split
    import mlx.core as mx
    from mlxlm_core import load
    from mlxlm_core._engine import Sampling, decode_step, generation_stream, prefill
    from mlxlm_core.cache import make_prompt_cache

    model, _ = load(model_path, weight_mode=weight_mode)
    prompt = mx.random.randint(0, model.args.vocab_size, (1, 512), key=mx.random.key(0))
    stream = generation_stream()
    cache = make_prompt_cache(model)
    with mx.stream(stream):
        prefill(model, prompt[:, :-1], cache)
        sampling = Sampling()
        sampling.add(prompt[0, :-1], None, None)
        current = decode_step(model, prompt[:, -1:], cache, sampling)
        mx.async_eval(*current)
    current[0].item()
    before, start, cpu0 = _thread_cpu(), time.perf_counter(), time.process_time()
    for _ in range(tokens):
        with mx.stream(stream):
            upcoming = decode_step(model, current[0][:, None], cache, sampling)
            mx.async_eval(*upcoming)
        current[0].item()
        current = upcoming
    current[0].item()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    after = _thread_cpu()
    threads = sorted((after[t] - before.get(t, 0.0) for t in after), reverse=True)
    # One more step's graph, unevaluated, counted through MLX's DOT export.
    with tempfile.NamedTemporaryFile(suffix=".dot") as dot:
        step = decode_step(model, current[0][:, None], cache, sampling)
        mx.export_to_dot(dot.name, *step)
        with open(dot.name) as f:
            nodes = len(re.findall(r"\[label =", f.read()))
        mx.eval(*step)
    return {
        "weight_mode": weight_mode,
        "policy": model.policy.describe(),
        "tokens_per_s": tokens / wall,
        "cpu_ms_per_token": cpu / tokens * 1e3,
        "busiest_threads_ms_per_token": [t / tokens * 1e3 for t in threads[:2]],
        "python_thread_ms_per_token": (after[str(os.getpid())] - before[str(os.getpid())])
        / tokens
        * 1e3,
        "graph_nodes_per_step": nodes,
        "load_avg": os.getloadavg()[0],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--weight-mode", default="native,dense,auto")
    parser.add_argument("--generation-tokens", "-g", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.model, args.worker, args.generation_tokens)))
        return 0
    results = []
    for _ in range(args.rounds):
        for mode in args.weight_mode.split(","):
            cmd = [sys.executable, __file__, "--worker", mode, "-g", str(args.generation_tokens)]
            if args.model:
                cmd += ["--model", args.model]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results.append(result)
            if not args.json:
                threads = "/".join(f"{t:.1f}" for t in result["busiest_threads_ms_per_token"])
                print(
                    f"{mode:10s} {result['tokens_per_s']:6.1f} tok/s  "
                    f"cpu {result['cpu_ms_per_token']:6.1f} ms/token "
                    f"(threads {threads}, python {result['python_thread_ms_per_token']:.1f})  "
                    f"nodes/step {result['graph_nodes_per_step']}  load {result['load_avg']:.1f}",
                    flush=True,
                )
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
