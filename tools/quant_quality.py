"""The quantization quality table: held-out perplexity of every method on the default model.

Reference: SmolLM2-135M-Instruct (the default model, a Q4_1 GGUF) dequantized to float;
its float16 rounding is the "float16" row. Each other row quantizes that float model with
one recipe/method of mlxlm-quant, then is evaluated with its weights dequantized back to
float32 (the same numbers as the quantized kernels, at BLAS speed). Held-out text: core's
built-in evaluation prose (``mlxlm_core/data/eval.txt``), which the calibration corpus
(``mlxlm_quant/data/calibration.txt``) does not contain.

The target (issue 6): at 3 bits each learned method cuts RTN's perplexity increase over
float16 by at least 30 %. Bits per weight are MLX-LM's count (scales and biases included),
so the dynamic rows at 3.5 have exactly the budget of uniform 3-bit g64; one applies the
allocation with GPTQ, the other rounds it (what the allocation alone buys). Results are cached per row in ``--out`` (JSON), so an interrupted
run resumes; the table is printed in Markdown with each row's time and the total.

Usage: uv run --frozen python tools/quant_quality.py [--rows a,b] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from collections import Counter
from pathlib import Path

import mlxlm_core  # noqa: F401  isort: skip  (first: it loads the optimised BLAS under MLX)
import mlx.core as mx
import mlx.nn as nn
from mlxlm_core import load
from mlxlm_core.data import builtin_text, token_windows
from mlxlm_core.quantize import dequantize_model
from mlxlm_quant import QuantRecipe, bits_per_weight, calibration_windows, dynamic_recipe, quantize
from mlxlm_quant._output import round_floats

ROWS = {
    "float16": ("float16 (reference)", None),
    "rtn4": ("RTN affine 4-bit g64", ("rtn", 4)),
    "rtn3": ("RTN affine 3-bit g64", ("rtn", 3)),
    "awq3": ("AWQ affine 3-bit g64", ("awq", 3)),
    "gptq3": ("GPTQ affine 3-bit g64", ("gptq", 3)),
    "dwq3": ("DWQ affine 3-bit g64 (from RTN)", ("dwq", 3)),
    "dynamic3.5": ("dynamic 3.5 bpw, GPTQ-applied", ("dynamic", 3.5)),
    "dynamic3.5-rtn": ("dynamic 3.5 bpw, rounded (the allocation alone)", ("dynamic-rtn", 3.5)),
    "mxfp4": ("mxfp4 (g32)", ("mxfp4", 4)),
    "nvfp4": ("nvfp4 (g16)", ("nvfp4", 4)),
}
_DYNAMIC: dict[tuple[float, int], tuple[QuantRecipe, float]] = {}
LEARNED = ("awq3", "gptq3", "dwq3", "dynamic3.5", "dynamic3.5-rtn")


def perplexity(model: nn.Module, windows: mx.array) -> tuple[float, int]:
    total, count = 0.0, 0
    for row in windows:
        logits = model(row[None, :-1]).astype(mx.float32)
        loss = nn.losses.cross_entropy(logits, row[None, 1:], reduction="sum")
        total += float(loss)
        count += row.shape[0] - 1
    return math.exp(total / count), count


def build(
    name: str, reference: nn.Module, calib: mx.array, args: argparse.Namespace, dwq: mx.array
) -> dict:
    model = copy.deepcopy(reference)
    spec = ROWS[name][1]
    info: dict = {}
    if spec is None:
        round_floats(model, "float16")
        return info | {"bpw": 16.0, "model": model}
    method, bits = spec
    if method in ("mxfp4", "nvfp4"):
        quantize(model, QuantRecipe(bits=4, mode=method))
    elif method in ("dynamic", "dynamic-rtn"):
        key = (bits, args.sensitivity_samples)
        if key not in _DYNAMIC:  # both dynamic rows share one allocation
            t0 = time.perf_counter()
            mx.random.seed(0)
            _DYNAMIC[key] = (
                dynamic_recipe(
                    model,
                    calib[: args.sensitivity_samples],
                    target_bpw=bits,
                    base=QuantRecipe(bits=2, group_size=64),
                )[0],
                time.perf_counter() - t0,
            )
        recipe, seconds = _DYNAMIC[key]
        info["allocation_s"] = round(seconds, 1)
        info["specs"] = {
            f"{b}-bit g{g}": n
            for (b, g), n in sorted(Counter((r.bits, r.group_size) for r in recipe.rules).items())
        }
        if method == "dynamic":
            quantize(model, recipe, method="gptq", tokens=calib)
        else:
            quantize(model, recipe)
    elif method == "dwq":
        quantize(
            model,
            QuantRecipe(bits=int(bits), group_size=64),
            method="dwq",
            tokens=dwq,
            dwq_steps=args.dwq_steps,
            dwq_lr=args.dwq_lr,
        )
    else:
        quantize(
            model,
            QuantRecipe(bits=int(bits), group_size=64),
            method=method,
            tokens=calib,
            dwq_steps=args.dwq_steps,
            dwq_lr=args.dwq_lr,
        )
    round_floats(model, "float16")
    info["bpw"] = bits_per_weight(model)
    dequantize_model(model)
    return info | {"model": model}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--out", default="/tmp/mlxlm-quant-quality.json")
    parser.add_argument("--num-samples", type=int, default=32, help="calibration windows")
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--sensitivity-samples", type=int, default=16)
    # DWQ's budget: a backward pass through the whole model per step is what this shared
    # 2-core machine can least afford, so its default run is short (see the closing note).
    parser.add_argument("--dwq-steps", type=int, default=16)
    parser.add_argument("--dwq-lr", type=float, default=3e-5)
    parser.add_argument("--dwq-samples", type=int, default=8)
    parser.add_argument("--dwq-length", type=int, default=128)
    parser.add_argument("--eval-length", type=int, default=512)
    args = parser.parse_args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    mx.random.seed(0)
    start_all = time.perf_counter()
    model, tokenizer = load()
    dequantize_model(model)
    mx.eval(model.parameters())
    windows = mx.array(token_windows(tokenizer, [builtin_text()], sequence_length=args.eval_length))
    calib = calibration_windows(
        tokenizer, num_samples=args.num_samples, sequence_length=args.sequence_length
    )
    args.calib_shape = tuple(calib.shape)  # the corpus may hold fewer windows than asked
    dwq_tokens = calibration_windows(
        tokenizer, num_samples=args.dwq_samples, sequence_length=args.dwq_length
    )
    for name in args.rows.split(","):
        if name in results:
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        built = build(name, model, calib, args, dwq_tokens)
        q_seconds = time.perf_counter() - t0
        ppl, count = perplexity(built.pop("model"), windows)
        results[name] = built | {
            "ppl": ppl,
            "tokens": count,
            "quantize_s": round(q_seconds, 1),
            "total_s": round(time.perf_counter() - t0, 1),
            "cpu_s": round(time.process_time() - c0, 1),
            "load": [round(v, 2) for v in os.getloadavg()],  # 1/5/15-min, at the row's end
        }
        out.write_text(json.dumps(results, indent=1))
        print(f"{name}: ppl {ppl:.3f} ({results[name]['total_s']} s)", flush=True)
    print_table(results, args, time.perf_counter() - start_all)


def print_table(results: dict, args: argparse.Namespace, seconds: float) -> None:
    base = results.get("float16", {}).get("ppl")
    rtn3 = results.get("rtn3", {}).get("ppl")
    print(
        f"\nHeld-out: mlxlm_core/data/eval.txt, {results.get('float16', {}).get('tokens')} "
        f"predictions; calibration: built-in corpus, {args.calib_shape[0]} x "
        f"{args.calib_shape[1]} tokens (dynamic's sensitivities: the first "
        f"{args.sensitivity_samples}; DWQ: {args.dwq_samples} x {args.dwq_length}, "
        f"{args.dwq_steps} steps, lr {args.dwq_lr:g})\n"
    )
    print(
        "| method | bits/weight | perplexity | increase over float16 | cut of RTN-3 increase "
        "| wall (s) | CPU (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, (label, _) in ROWS.items():
        r = results.get(name)
        if r is None:
            continue
        inc = r["ppl"] - base if base else float("nan")
        cut = ""
        if name in LEARNED and base and rtn3:
            cut = f"{100 * (1 - inc / (rtn3 - base)):.0f} %"
        print(
            f"| {label} | {r['bpw']:.2f} | {r['ppl']:.3f} | {inc:+.3f} | {cut} | {r['total_s']} | {r.get('cpu_s', '')} |"
        )
    total = sum(r["total_s"] for r in results.values())
    cpu = sum(r.get("cpu_s", 0) for r in results.values())
    loads = [r["load"][0] for r in results.values() if "load" in r]
    print(
        f"\nSum of row times: {total:.0f} s wall, {cpu:.0f} s CPU (rows with a CPU figure); "
        f"this invocation: {seconds:.0f} s"
        + (f"; 1-minute load average {min(loads):.1f} to {max(loads):.1f}" if loads else "")
        + ". The dynamic rows share one allocation, timed in the first of them."
    )


if __name__ == "__main__":
    main()
