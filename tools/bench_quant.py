"""AWQ and GPTQ: mlxlm-quant next to MLX-LM's implementations, same model, data and run.

Both quantize the default model (SmolLM2-135M-Instruct dequantized to float32, saved once as
an MLX directory both load) from the same calibration windows (mlxlm-quant's built-in
corpus; MLX-LM's own loader would download a file, so its functions are called directly
with our tokens). Settings are matched where the implementations allow:

- GPTQ 4-bit g64 (MLX-LM's GPTQ packs only 2/4/8 bits): MLX-LM GPTQs the linear layers and
  rounds the tied embedding at the fallback width (4-bit g64); ours also GPTQs the tied
  embedding as the output head.
- AWQ 4-bit g64 with the embedding at 4-bit g32 (MLX-LM's defaults), grid 20 both.

Each row reports wall time, our/their time ratio (target <= 1.0) and perplexity on core's
held-out evaluation text (weights dequantized to float32 for evaluation).

Usage: uv run --frozen python tools/bench_quant.py [--num-samples N] [--sequence-length L]
"""

from __future__ import annotations

import argparse
import math
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


def perplexity(model: nn.Module, windows: mx.array) -> float:
    dequantize_model(model)
    total, count = 0.0, 0
    for row in windows:
        logits = model(row[None, :-1]).astype(mx.float32)
        total += float(nn.losses.cross_entropy(logits, row[None, 1:], reduction="sum"))
        count += row.shape[0] - 1
    return math.exp(total / count)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--methods", default="gptq,awq")
    parser.add_argument(
        "--skip-mlx-lm", action="store_true", help="only ours (MLX-LM's AWQ takes ~40 min here)"
    )
    args = parser.parse_args()
    model, tokenizer, config = load(return_config=True)
    dequantize_model(model)
    config = {k: v for k, v in config.items() if not k.startswith("quantization")}
    windows = mx.array(token_windows(tokenizer, [builtin_text()], sequence_length=512))
    tokens = calibration_windows(
        tokenizer, num_samples=args.num_samples, sequence_length=args.sequence_length
    )
    print(
        f"calibration {tokens.shape[0]} x {tokens.shape[1]} tokens; "
        f"held-out {windows.shape[0]} x 512 tokens"
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = save(Path(tmp) / "float", model, tokenizer, config, dtype="float32")
        print(
            "| method | mlxlm-quant wall / CPU (s) | MLX-LM wall / CPU (s) | ratio wall / CPU "
            "| ppl mlxlm-quant | ppl MLX-LM |"
        )
        print("|---|---|---|---|---|---|")
        for method in args.methods.split(","):
            t0, c0 = time.perf_counter(), time.process_time()
            mine = ours(method, path, tokens)
            t_ours, c_ours = time.perf_counter() - t0, time.process_time() - c0
            if args.skip_mlx_lm:
                print(
                    f"| {method} 4-bit g64 | {t_ours:.0f} / {c_ours:.0f} | - | - | "
                    f"{perplexity(mine, windows):.3f} | - |",
                    flush=True,
                )
                continue
            t0, c0 = time.perf_counter(), time.process_time()
            other = theirs(method, path, tokens)
            t_theirs, c_theirs = time.perf_counter() - t0, time.process_time() - c0
            print(
                f"| {method} 4-bit g64 | {t_ours:.0f} / {c_ours:.0f} | "
                f"{t_theirs:.0f} / {c_theirs:.0f} | {t_ours / t_theirs:.2f} / "
                f"{c_ours / c_theirs:.2f} | {perplexity(mine, windows):.3f} | "
                f"{perplexity(other, windows):.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
