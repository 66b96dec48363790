"""One-row quantized products on MLX's CPU backend: MLX's kernel vs mlxlm's plane kernel.

For the matrix shapes of SmolLM2-135M (the default model: 4-bit group-32 layers, an 8-bit
tied output layer), times ``mx.quantized_matmul`` with one float32 row against
``mlxlm_core._quant_matvec.quantized_matvec`` (median of ``--runs`` evaluations each, the
two alternating), checks that they agree, and prints ns per weight. The policy's heap
setting (mlxlm_core._malloc) is applied first, as ``load()`` does on CPU.

    uv run python tools/bench_matvec.py [--runs 30] [--json]

``--rows 1,2,3,4,8,16,32`` times inputs of several rows instead, in CPU ms (median of
``--runs``): MLX's kernel, the plane kernel (up to 8 rows), the chunked dequantization of
``mlxlm_core._quant_matmul`` and ``mx.dequantize`` followed by a float matmul (2 rows on),
each checked against MLX's kernel; this is how ``_policy_layers.PLANE_ROWS`` was chosen.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from functools import partial

import mlxlm_core  # noqa: F401  (loads the BLAS before mlx.core)

# isort: split

import mlx.core as mx
from mlxlm_core._malloc import keep_heap
from mlxlm_core._quant_matmul import dequantized_matmul, wide_weights
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


def _cpu_ms(fn, runs: int) -> float:
    out = []
    for _ in range(runs):
        start = time.process_time()
        mx.eval(fn())
        out.append(time.process_time() - start)
    return statistics.median(out) * 1e3


def _mlx_product(x: mx.array, packed: list[mx.array], bits: int) -> mx.array:
    return mx.quantized_matmul(x, *packed, transpose=True, group_size=32, bits=bits)


def _dequantized_product(x: mx.array, packed: list[mx.array], bits: int) -> mx.array:
    return x @ mx.dequantize(*packed, group_size=32, bits=bits).T


def _rows_table(counts: list[int], runs: int) -> list[dict]:
    table = []
    for name, rows, cols, bits in SHAPES:
        w = mx.random.normal((rows, cols), key=mx.random.key(rows + cols))
        packed = mx.quantize(w, group_size=32, bits=bits)
        mx.eval(packed)
        del w
        wide = wide_weights(*packed, bits=bits, group_size=32)
        for count in counts:
            x = mx.random.normal((count, cols), key=mx.random.key(count))
            mx.eval(x)
            ways = {"mlx": partial(_mlx_product, x, packed, bits)}
            if count <= 8:
                bucket = 1 << (count - 1).bit_length()
                views = plane_weights(*packed, bits=bits, group_size=32, inputs=bucket)
                ways["planes"] = partial(quantized_matvec, x, views)
            if count >= 2:
                ways["chunked"] = partial(dequantized_matmul, x, wide)
                ways["dequantize"] = partial(_dequantized_product, x, packed, bits)
            ref = ways["mlx"]()
            row = {"matrix": name, "shape": [rows, cols], "bits": bits, "rows": count}
            for way, fn in ways.items():
                err = float(mx.abs(fn() - ref).max() / mx.abs(ref).max())
                assert err < 1e-5, (name, count, way, err)
                row[f"{way}_ms"] = _cpu_ms(fn, runs if way != "mlx" or rows < 10_000 else 3)
            row["load_avg"] = os.getloadavg()[0]
            table.append(row)
            if not args_json:
                cells = "  ".join(f"{k[:-3]} {v:7.2f}" for k, v in row.items() if k.endswith("_ms"))
                print(f"{name:30s} {rows:5d}x{cols:<4d} {bits}-bit {count:3d} rows  {cells}  "
                      f"load {row['load_avg']:.1f}", flush=True)  # fmt: skip
    return table


args_json = False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--rows", default=None, help="row counts: CPU ms per way, see above")
    args = parser.parse_args()
    heap = keep_heap()
    if args.rows:
        global args_json
        args_json = args.json
        if not args.json:
            print(f"CPU ms per product, median of {args.runs}; heap: {heap}")
        table = _rows_table([int(r) for r in args.rows.split(",")], args.runs)
        if args.json:
            print(json.dumps({"heap": heap, "results": table}, indent=1))
        return 0
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
