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

``--batch 1,2,4,8,16,32`` times batched decoding instead: per row count and engine
(``--weight-mode`` values, plus ``mlx-lm`` for MLX-LM's own ``BatchGenerator`` on the same
checkpoint with its defaults and MLX's bundled BLAS), a fresh process inserts that many
random 64-token prompts, lets every row start decoding, then times ``--trials`` windows of
decoding steps (each at least ``--steps`` steps and ~1 s of CPU): CPU and wall ms per step
(medians over the windows), peak MLX memory while decoding and over the whole run.

    uv run python tools/bench_decode_cpu.py --batch 1,2,4,8,16,32 --weight-mode auto,dense,mlx-lm
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial


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


def _batch_worker(model_path: str, engine: str, rows: int, trials: int, steps: int) -> dict:
    if engine == "mlx-lm":
        os.environ["MLXLM_BLAS"] = "off"  # MLX-LM as installed (nothing imports mlxlm_core)
        import mlx.core as mx
        from mlx_lm import load as peer_load
        from mlx_lm.generate import BatchGenerator as PeerBatch

        model = peer_load(model_path)[0]
        gen = PeerBatch(model, max_tokens=100_000, completion_batch_size=rows,
                        prefill_batch_size=rows)  # fmt: skip

        def step() -> int:
            return len(gen.next()[1])

        policy = "MLX-LM defaults"
    else:
        import mlxlm_core  # noqa: F401  (the BLAS before mlx.core)

        # isort: split
        import mlx.core as mx
        from mlxlm_core import load
        from mlxlm_core._engine import BatchGenerator

        model = load(model_path, weight_mode=engine)[0]
        gen = BatchGenerator(
            model, max_tokens=100_000, completion_batch_size=rows, prefill_batch_size=rows
        )

        def step() -> int:
            return len(gen.next())

        policy = model.policy.describe()
    vocab = model.args.vocab_size
    prompts = mx.random.randint(0, vocab, (rows, 64), key=mx.random.key(rows)).tolist()
    mx.reset_peak_memory()
    gen.insert(prompts)
    for _ in range(200):  # until every row has its first tokens (prefill done)
        if step() == rows and step() == rows:
            break
    peak_all = mx.get_peak_memory()
    mx.reset_peak_memory()
    cpu_ms, wall_ms = [], []
    for _ in range(trials):
        done, cpu0, wall0 = 0, time.process_time(), time.perf_counter()
        while done < steps or time.process_time() - cpu0 < 1.0:
            if step() != rows:
                raise RuntimeError("a row stopped decoding")
            done += 1
        cpu_ms.append((time.process_time() - cpu0) / done * 1e3)
        wall_ms.append((time.perf_counter() - wall0) / done * 1e3)
    peak_decode = mx.get_peak_memory()
    return {
        "engine": engine,
        "rows": rows,
        "policy": policy,
        "cpu_ms_per_step": statistics.median(cpu_ms),
        "wall_ms_per_step": statistics.median(wall_ms),
        "cpu_ms_trials": cpu_ms,
        "peak_decode_mb": peak_decode / 1e6,
        "peak_mb": max(peak_all, peak_decode) / 1e6,
        "load_avg": os.getloadavg()[0],
    }


def _batch_line(rows: int, engine: str, r: dict) -> str:
    trials = "/".join(f"{t:.0f}" for t in r["cpu_ms_trials"])
    return (
        f"{rows:3d} rows {engine:8s} cpu {r['cpu_ms_per_step']:7.1f} ms/step "
        f"({trials})  wall {r['wall_ms_per_step']:7.1f}  peak decode "
        f"{r['peak_decode_mb']:6.0f} MB, all {r['peak_mb']:6.0f} MB  "
        f"load {r['load_avg']:.1f}"
    )


def _mode_line(mode: str, r: dict) -> str:
    threads = "/".join(f"{t:.1f}" for t in r["busiest_threads_ms_per_token"])
    return (
        f"{mode:10s} {r['tokens_per_s']:6.1f} tok/s  "
        f"cpu {r['cpu_ms_per_token']:6.1f} ms/token "
        f"(threads {threads}, python {r['python_thread_ms_per_token']:.1f})  "
        f"nodes/step {r['graph_nodes_per_step']}  load {r['load_avg']:.1f}"
    )


def _batch_main(args: argparse.Namespace) -> int:
    if not args.model:
        from mlxlm_core._resolve import resolve_model_path

        args.model = str(resolve_model_path(None))

    jobs = []
    for rows in [int(r) for r in args.batch.split(",")]:
        for engine in args.weight_mode.split(","):
            cmd = [sys.executable, __file__, "--batch-worker", f"{engine}:{rows}"]
            cmd += ["--model", args.model, "--trials", str(args.trials), "--steps", str(args.steps)]
            jobs.append((cmd, partial(_batch_line, rows, engine)))
    return _run_all(jobs, as_json=args.json)


def _run_all(jobs: list[tuple[list[str], Callable[[dict], str]]], *, as_json: bool) -> int:
    """Run each measurement in a fresh process (its own peak memory; its last line is JSON),
    printing a line per result as it comes, or all results as JSON at the end."""
    results = []
    for cmd, describe in jobs:
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        if not as_json:
            print(describe(results[-1]), flush=True)
    if as_json:
        print(json.dumps(results, indent=1))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--weight-mode", default="native,dense,auto")
    parser.add_argument("--generation-tokens", "-g", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--batch", default=None, help="row counts: time batched decoding")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="--batch: least steps per trial")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch_worker:
        engine, rows = args.batch_worker.split(":")
        result = _batch_worker(args.model, engine, int(rows), args.trials, args.steps)
        print(json.dumps(result))
        return 0
    if args.batch:
        return _batch_main(args)
    if args.worker:
        print(json.dumps(_worker(args.model, args.worker, args.generation_tokens)))
        return 0

    jobs = []
    for _ in range(args.rounds):
        for mode in args.weight_mode.split(","):
            cmd = [sys.executable, __file__, "--worker", mode, "-g", str(args.generation_tokens)]
            if args.model:
                cmd += ["--model", args.model]
            jobs.append((cmd, partial(_mode_line, mode)))
    return _run_all(jobs, as_json=args.json)


if __name__ == "__main__":
    raise SystemExit(main())
