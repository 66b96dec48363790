"""AWQ and GPTQ: mlxlm-quant next to MLX-LM's implementations, same model, data and run.

Both quantize the default model (SmolLM2-135M-Instruct dequantized to float32, saved once as
an MLX directory both load) from the same calibration windows (mlxlm-quant's built-in
corpus; MLX-LM's own loader would download a file, so its functions are called directly
with our tokens). Settings are matched where the implementations allow:

- GPTQ 4-bit g64 (MLX-LM's GPTQ packs only 2/4/8 bits): MLX-LM GPTQs the linear layers and
  rounds the tied embedding at the fallback width (4-bit g64); ours also GPTQs the tied
  embedding as the output head.
- AWQ 4-bit g64 with the embedding at 4-bit g32 (MLX-LM's defaults), grid 20 both.

Each method runs ``--trials`` times per implementation, alternating which goes first; the
table gives median wall and CPU seconds, the ratio of the medians (target <= 1.0) and the
range of the per-trial ratios, with the 1-minute load average seen. Perplexity (weights
dequantized to float32) is on core's held-out evaluation text and, as a second, larger
held-out set, on the calibration corpus's windows that calibration did not use; a line after
each row gives both sets' predictions together.

Usage: uv run --frozen python tools/bench_quant.py [--methods gptq,awq] [--trials N]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import mlxlm_core  # noqa: F401  isort: skip  (first: it loads the optimised BLAS under MLX)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlxlm_core import load, load_model, save
from mlxlm_core.data import builtin_text, token_windows
from mlxlm_core.quantize import dequantize_model
from mlxlm_quant import LayerRule, QuantRecipe, calibration_windows, quantize


def nll(model: nn.Module, windows: mx.array) -> tuple[float, int]:
    total, count = 0.0, 0
    for row in windows:
        logits = model(row[None, :-1]).astype(mx.float32)
        total += float(nn.losses.cross_entropy(logits, row[None, 1:], reduction="sum"))
        count += row.shape[0] - 1
    return total, count


def perplexities(model: nn.Module, sets: list[mx.array]) -> list[float]:
    """Each set's perplexity, then (with several sets) all their predictions together."""
    dequantize_model(model)
    sums = [nll(model, s) for s in sets if s.shape[0]]
    out = [math.exp(t / n) for t, n in sums]
    if len(sums) > 1:
        out.append(math.exp(sum(t for t, _ in sums) / sum(n for _, n in sums)))
    return out


def mlx_lm_model(path: Path) -> nn.Module:
    from mlx_lm.utils import load_model as mlx_lm_load_model

    model, _ = mlx_lm_load_model(path)
    floats = [
        (k, v.astype(mx.float32))
        for k, v in tree_flatten(model.parameters())
        if mx.issubdtype(v.dtype, mx.floating)
    ]
    model.update(tree_unflatten(floats))
    return model


def theirs(method: str, path: Path, tokens: mx.array) -> nn.Module:
    model = mlx_lm_model(path)
    if method == "gptq":
        from mlx_lm.quant.gptq import gptq_quantize

        gptq_quantize(model, tokens, 4, 64, 4, 64, batch_size=4)
    else:
        from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS, awq_quantize

        awq_quantize(
            model,
            tokens,
            AWQ_MODEL_CONFIGS["llama"],
            group_size=64,
            bits=4,
            embed_group_size=32,
            embed_bits=4,
            n_grid=20,
        )
    mx.eval(model.parameters())
    return model


def ours(method: str, path: Path, tokens: mx.array) -> nn.Module:
    model, _ = load_model(path)
    rules = ()
    if method == "awq":
        rules = (LayerRule(match="model.embed_tokens", bits=4, group_size=32),)
    quantize(model, QuantRecipe(bits=4, group_size=64, rules=rules), method=method, tokens=tokens)
    mx.eval(model.parameters())
    return model


def timed(fn, *args) -> tuple[nn.Module, float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    model = fn(*args)
    return model, time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--methods", default="gptq,awq")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument(
        "--skip-mlx-lm", action="store_true", help="only ours (MLX-LM's AWQ takes ~17 min here)"
    )
    args = parser.parse_args()
    model, tokenizer, config = load(return_config=True)
    dequantize_model(model)
    config = {k: v for k, v in config.items() if not k.startswith("quantization")}
    windows = mx.array(token_windows(tokenizer, [builtin_text()], sequence_length=512))
    corpus = calibration_windows(tokenizer, num_samples=-1, sequence_length=args.sequence_length)
    tokens, unused = corpus[: args.num_samples], corpus[args.num_samples :]
    print(
        f"calibration {tokens.shape[0]} x {tokens.shape[1]} tokens; held-out: eval.txt "
        f"{windows.shape[0]} x 512 tokens, unused calibration windows {unused.shape[0]} x "
        f"{unused.shape[1]}; {args.trials} trial(s), order alternating; "
        f"load at start {os.getloadavg()[0]:.1f}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = save(Path(tmp) / "float", model, tokenizer, config, dtype="float32")
        print(
            "| method | mlxlm-quant wall / CPU (s) | MLX-LM wall / CPU (s) | ratio wall / CPU "
            "(per-trial wall) | ppl eval.txt ours / MLX-LM | ppl unused windows ours / "
            "MLX-LM | load |"
        )
        print("|---|---|---|---|---|---|---|")
        for method in args.methods.split(","):
            runs: dict[str, list[tuple[float, float]]] = {"ours": [], "theirs": []}
            kept: dict[str, nn.Module] = {}
            loads = []
            for trial in range(args.trials):
                order = ["ours", "theirs"] if trial % 2 == 0 else ["theirs", "ours"]
                for who in order:
                    if who == "theirs" and args.skip_mlx_lm:
                        continue
                    fn = ours if who == "ours" else theirs
                    result, wall, cpu = timed(fn, method, path, tokens)
                    runs[who].append((wall, cpu))
                    kept.setdefault(who, result)
                    loads.append(os.getloadavg()[0])
                    print(
                        f"  {method} {who} trial {trial + 1}: {wall:.1f} s wall, {cpu:.1f} s CPU",
                        flush=True,
                    )
            med = {
                who: (statistics.median(w for w, _ in r), statistics.median(c for _, c in r))
                for who, r in runs.items()
                if r
            }
            ppl = {who: perplexities(m, [windows, unused]) for who, m in kept.items()}
            mine = f"{med['ours'][0]:.0f} / {med['ours'][1]:.0f}"
            if len(ppl["ours"]) > 2:
                both = ", ".join(f"{who} {p[2]:.3f}" for who, p in ppl.items())
                print(f"  {method} ppl both held-out sets together: {both}", flush=True)
            if "theirs" not in med:
                print(
                    f"| {method} 4-bit g64 | {mine} | - | - | {ppl['ours'][0]:.3f} / - | "
                    f"{ppl['ours'][1]:.3f} / - | {min(loads):.1f}-{max(loads):.1f} |"
                )
                continue
            per_trial = [a[0] / b[0] for a, b in zip(runs["ours"], runs["theirs"])]
            print(
                f"| {method} 4-bit g64 | {mine} | {med['theirs'][0]:.0f} / {med['theirs'][1]:.0f} "
                f"| {med['ours'][0] / med['theirs'][0]:.2f} / {med['ours'][1] / med['theirs'][1]:.2f} "
                f"({min(per_trial):.2f}-{max(per_trial):.2f}) | {ppl['ours'][0]:.3f} / "
                f"{ppl['theirs'][0]:.3f} | {ppl['ours'][1]:.3f} / {ppl['theirs'][1]:.3f} | "
                f"{min(loads):.1f}-{max(loads):.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
