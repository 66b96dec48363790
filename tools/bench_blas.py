"""Float32 matmul speed of MLX's CPU backend under each BLAS that can be loaded beneath it.

Each candidate runs in a fresh interpreter with ``MLXLM_BLAS`` set (``off`` = MLX's bundled
reference BLAS, or a library path), imports ``mlxlm_core`` (which loads it before
``mlx.core``) and times the products a small LLM makes: a prompt chunk (512 x 576 x 1536),
a square 1024 product, and matrix-vector products for decoding (a 1536 x 576 layer, the
49152 x 576 output layer of SmolLM2). It also checks results against numpy in float64.

    uv run python tools/bench_blas.py [--mkl PATH] [--openblas PATH] [--threading-layer L]

By default the candidates are the bundled BLAS, MKL from the ``mkl`` package in this
environment (the ``blas`` extra) and Debian's OpenBLAS, where present. Medians of 7.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, os, time
import numpy as np
import mlxlm_core
import mlx.core as mx
from mlxlm_core._blas import blas_info

def median_time(f, n):
    f()
    times = []
    for _ in range(n):
        t = time.perf_counter(); f(); times.append(time.perf_counter() - t)
    return sorted(times)[n // 2]

out = {"blas": blas_info().describe(), "load": os.getloadavg()[0]}
a, w = mx.random.normal((512, 576)), mx.random.normal((1536, 576))
sq = mx.random.normal((1024, 1024))
x, x2 = mx.random.normal((1, 576)), mx.random.normal((1, 576))
big = mx.random.normal((49152, 576))
mx.eval(a, w, sq, x, big)
out["sgemm_512x576x1536_gflops"] = 2 * 512 * 576 * 1536 / median_time(lambda: mx.eval(a @ w.T), 7) / 1e9
out["sgemm_1024_gflops"] = 2 * 1024**3 / median_time(lambda: mx.eval(sq @ sq), 7) / 1e9
out["gemv_1536x576_us"] = median_time(lambda: mx.eval(x @ w.T), 51) * 1e6
out["gemv_49152x576_gbps"] = big.nbytes / median_time(lambda: mx.eval(x @ big.T), 11) / 1e9
rng = np.random.default_rng(0)
A, B = rng.standard_normal((300, 257)).astype(np.float32), rng.standard_normal((257, 129)).astype(np.float32)
ref = A.astype(np.float64) @ B.astype(np.float64)
out["max_rel_error"] = float(np.abs(np.array(mx.array(A) @ mx.array(B)) - ref).max() / np.abs(ref).max())
print(json.dumps(out))
"""


def candidates(args: argparse.Namespace) -> dict[str, str]:
    found = {"bundled": "off"}
    mkl = args.mkl or str(Path(sys.prefix) / "lib" / "libmkl_rt.so.3")
    if Path(mkl).exists():
        found["mkl"] = mkl
    openblas = args.openblas or "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
    if Path(openblas).exists():
        found["openblas"] = openblas
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mkl", default=None, help="libmkl_rt.so path (default: the extra's)")
    parser.add_argument("--openblas", default=None, help="libopenblas.so.0 path")
    parser.add_argument(
        "--threading-layer", default=None, help="MKL_THREADING_LAYER for MKL (e.g. INTEL)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = {}
    for name, setting in candidates(args).items():
        env = {**os.environ, "MLXLM_BLAS": setting}
        if name == "mkl" and args.threading_layer:
            env["MKL_THREADING_LAYER"] = args.threading_layer
        done = subprocess.run(
            [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True
        )
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'BLAS':<9} {'sgemm 512 GF/s':>14} {'sgemm 1024 GF/s':>15} {'gemv 1536 us':>12}")
    for name, r in results.items():
        print(
            f"{name:<9} {r['sgemm_512x576x1536_gflops']:>14.1f} {r['sgemm_1024_gflops']:>15.1f} "
            f"{r['gemv_1536x576_us']:>12.0f}  gemv 49152x576 {r['gemv_49152x576_gbps']:.1f} GB/s"
            f"  err {r['max_rel_error']:.1e}  load {r['load']:.1f}  [{r['blas']}]"
        )


if __name__ == "__main__":
    main()
