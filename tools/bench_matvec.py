"""One-row quantized products on MLX's CPU backend: MLX's kernel vs mlxlm's plane kernel.

For the matrix shapes of SmolLM2-135M (the default model: 4-bit group-32 layers, an 8-bit
tied output layer), times ``mx.quantized_matmul`` with one float32 row against
``mlxlm_core._quant_matvec.quantized_matvec`` (median of ``--runs`` evaluations each, the
two alternating), checks that they agree, and prints ns per weight. The policy's heap
setting (mlxlm_core._malloc) is applied first, as ``load()`` does on CPU.

    uv run python tools/bench_matvec.py [--runs 30] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import mlxlm_core  # noqa: F401  (loads the BLAS before mlx.core)

# isort: split

import mlx.core as mx
from mlxlm_core._malloc import keep_heap
from mlxlm_core._quant_matvec import plane_weights, quantized_matvec

SHAPES = [  # (name, rows, cols, bits)
    ("q_proj / o_proj", 576, 576, 4),
    ("k_proj / v_proj", 192, 576, 4),
    ("gate_proj / up_proj", 1536, 576, 4),
    ("down_proj", 576, 1536, 4),
    ("output layer (tied embedding)", 49152, 576, 8),
]


def _time(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        mx.eval(fn())
        out.append(time.perf_counter() - start)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    heap = keep_heap()
    rows_out = []
    for name, rows, cols, bits in SHAPES:
        w = mx.random.normal((rows, cols), key=mx.random.key(rows + cols))
        packed = mx.quantize(w, group_size=32, bits=bits)
        x = mx.random.normal((1, cols), key=mx.random.key(1))
        views = plane_weights(*packed, bits=bits, group_size=32)
        mx.eval(packed, x, [c for chunk in views.chunks for c in chunk])
        del w

        def mlx_kernel(packed=packed, x=x, bits=bits):
            return mx.quantized_matmul(x, *packed, transpose=True, group_size=32, bits=bits)

        def planes(views=views, x=x):
            return quantized_matvec(x, views)

        ref, ours = mlx_kernel(), planes()
        err = float(mx.abs(ours - ref).max() / mx.abs(ref).max())
        mlx_t, plane_t = [], []
        for _ in range(3):  # alternate, a third of the runs each time
            mlx_t += _time(mlx_kernel, max(1, args.runs // 3))
            plane_t += _time(planes, max(1, args.runs // 3))
        a, b = statistics.median(mlx_t), statistics.median(plane_t)
        rows_out.append(
            {
                "matrix": name,
                "shape": [rows, cols],
                "bits": bits,
                "chunks": len(views.chunks),
                "mlx_us": a * 1e6,
                "planes_us": b * 1e6,
                "mlx_ns_per_weight": a / (rows * cols) * 1e9,
                "planes_ns_per_weight": b / (rows * cols) * 1e9,
                "speedup": a / b,
                "max_rel_diff": err,
            }
        )
    report = {"load_avg": os.getloadavg()[0], "heap": heap, "results": rows_out}
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"load average {report['load_avg']:.2f}; heap: {heap}")
    print(f"{'matrix':32s} {'shape':>11s} bits  MLX us  planes us  speed-up  ns/weight  rel diff")
    for r in rows_out:
        shape = "x".join(map(str, r["shape"]))
        print(
            f"{r['matrix']:32s} {shape:>11s} {r['bits']:4d} {r['mlx_us']:7.0f} {r['planes_us']:10.0f}"
            f" {r['speedup']:8.2f}x {r['mlx_ns_per_weight']:.2f}/{r['planes_ns_per_weight']:.2f}"
            f"  {r['max_rel_diff']:.1e}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
