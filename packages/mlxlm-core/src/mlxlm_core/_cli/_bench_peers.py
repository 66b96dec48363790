"""Engines for ``mlxlm benchmark --compare``, each timed in a worker process of its own.

One process per engine keeps the measurements apart: each process's peak memory is its own
model's, and the MLX-LM worker runs with MLX's bundled BLAS unless asked otherwise
(``MLXLM_BLAS`` is set for the child only), i.e. MLX-LM as a user installs it. The parent
(:mod:`.benchmark`) sends ``run`` lines and reads one JSON object per trial; every engine
gets the same prompt token ids and generates greedily for exactly the requested count.

    python -m mlxlm_core._cli._bench_peers '<json spec>'
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENGINES = ("mlxlm", "mlx-lm", "llama.cpp")


@dataclass
class Spec:
    engine: str
    model: str  # MLX model directory (mlxlm, mlx-lm) or GGUF file (llama.cpp)
    prompt: list[int]
    generate: int
    load: dict[str, Any]  # mlxlm's load() options
    threads: int = 2  # llama.cpp threads


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux


def _time(steps: Iterator[object], prompt_len: int, generate: int) -> dict[str, float]:
    start = time.perf_counter()
    first = start
    count = 0
    for count, _ in enumerate(steps, 1):
        if count == 1:
            first = time.perf_counter()
    end = time.perf_counter()
    if count != generate:
        raise RuntimeError(f"expected {generate} tokens, got {count}")
    return {
        "prompt_tps": prompt_len / max(first - start, 1e-9),
        "generation_tps": (count - 1) / max(end - first, 1e-9) if count > 1 else 0.0,
        "ttft_s": first - start,
        "total_s": end - start,
    }


def _mlx_runner(spec: Spec) -> tuple[Callable[[], dict[str, float]], dict[str, Any]]:
    import mlx.core as mx

    if spec.engine == "mlxlm":
        from mlxlm_core import load
        from mlxlm_core._blas import blas_info
        from mlxlm_core._generate import generate_step

        model, _ = load(spec.model, **spec.load)
        info = {"policy": model.policy.describe(), "blas": blas_info().describe()}
        info["decode_bytes"] = decode_bytes(model)

        def steps(prompt: mx.array, n: int) -> Iterator[object]:
            return generate_step(prompt, model, max_tokens=n)
    else:
        from mlx_lm import load as peer_load
        from mlx_lm.generate import generate_step as peer_step

        model = peer_load(spec.model)[0]
        info = {"policy": "MLX-LM defaults (checkpoint dtype, MLX quantized kernels)"}
        info["decode_bytes"] = decode_bytes(model)

        def steps(prompt: mx.array, n: int) -> Iterator[object]:
            return peer_step(prompt, model, max_tokens=n)

    prompt = mx.array(spec.prompt)
    for _ in steps(prompt[:16], 2):  # warm-up, untimed
        pass

    def run() -> dict[str, float]:
        mx.clear_cache()
        mx.reset_peak_memory()
        result = _time(steps(prompt, spec.generate), prompt.size, spec.generate)
        result["peak_memory_gb"] = mx.get_peak_memory() / 1e9
        return result

    return run, info


def _llama_cpp_runner(spec: Spec) -> tuple[Callable[[], dict[str, float]], dict[str, Any]]:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(
        model_path=spec.model,
        n_ctx=len(spec.prompt) + spec.generate + 16,
        n_batch=512,
        n_threads=spec.threads,
        n_threads_batch=spec.threads,
        verbose=False,
    )
    vocab = llm.n_vocab()

    def steps(prompt: list[int], n: int) -> Iterator[int]:
        llm.reset()
        llm.eval(prompt)
        for _ in range(n):
            logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(vocab,))
            token = int(logits.argmax())
            yield token
            llm.eval([token])

    for _ in steps(spec.prompt[:16], 2):  # warm-up, untimed
        pass

    def run() -> dict[str, float]:
        result = _time(steps(spec.prompt, spec.generate), len(spec.prompt), spec.generate)
        result["peak_memory_gb"] = float("nan")  # not an MLX allocation; see peak_rss_gb
        return result

    info = {"policy": f"llama.cpp, {spec.threads} threads", "decode_bytes": _gguf_bytes(spec)}
    return run, info


def _gguf_bytes(spec: Spec) -> int:
    return Path(spec.model).stat().st_size  # every tensor is read per token (tied output)


def decode_bytes(model: Any) -> int:
    """Bytes of parameters one decoding step reads (the weights it multiplies by).

    Quantized layers count their packed weight, scales and biases, or their dense copy when
    they keep one; an embedding table counts only if it also serves as the output layer.
    """
    import mlx.core as mx
    import mlx.nn as nn

    tied = "lm_head" not in model
    total = 0
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.QuantizedEmbedding)) and not tied:
            continue  # a lookup reads one row
        arrays = {k: v for k, v in module.items() if isinstance(v, mx.array)}
        dense = arrays.get("_dense")
        if dense is not None:
            total += dense.nbytes + (arrays["bias"].nbytes if "bias" in arrays else 0)
        else:
            total += sum(v.nbytes for k, v in arrays.items() if not k.startswith("_"))
    return total


def measure_bandwidth(size_mb: int = 256, repeats: int = 7) -> float:
    """Memory bandwidth in GB/s: median large copy (bytes read + bytes written) per second."""
    import numpy as np

    src = np.ones(size_mb * (1 << 20) // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    times.sort()
    return 2 * src.nbytes / times[len(times) // 2] / 1e9


def main() -> None:
    spec = Spec(**json.loads(sys.argv[1]))
    try:
        if spec.engine == "llama.cpp":
            run, info = _llama_cpp_runner(spec)
        else:
            run, info = _mlx_runner(spec)
    except ImportError as exc:
        print(json.dumps({"error": f"{spec.engine} is not installed ({exc.name})"}), flush=True)
        return
    print(json.dumps({"ready": True, **info}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        result = run()
        result["peak_rss_gb"] = _peak_rss_gb()
        result["load"] = os.getloadavg()[0]
        print(json.dumps(result), flush=True)


class Worker:
    """The parent's handle on one engine's process."""

    def __init__(self, spec: Spec, *, blas: str | None) -> None:
        env = dict(os.environ)
        if blas is not None:
            env["MLXLM_BLAS"] = blas
        self.engine = spec.engine
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlxlm_core._cli._bench_peers", json.dumps(spec.__dict__)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.info = self._read()
        if "error" in self.info:
            self.close()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            return {"error": f"{self.engine} worker exited with status {self.proc.wait()}"}
        return json.loads(line)

    def run(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait()


if __name__ == "__main__":
    main()
