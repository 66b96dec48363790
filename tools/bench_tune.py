"""LoRA training speed and peak memory: mlxlm-tune vs MLX-LM's tuner, same model, same data.

Both train LoRA (same rank, scale, blocks, batch size, learning rate, steps) on the same
MLX model directory (by default a float32 copy of the default model, so both compute in
float32: MLX-LM keeps a checkpoint's float16 scales, whose CPU kernels are ~30x slower) and
the same jsonl data. Each engine runs in a fresh process (so peak memory is its own),
alternating, ``--runs`` times; the median is reported with the ratio mlxlm / MLX-LM.

Both processes run on the same BLAS under MLX (whatever ``import mlxlm_core`` selects), so
the comparison is of the trainers, not of the matrix library.

Tokens/s counts target tokens (what the loss is computed on, MLX-LM's definition) over the
steps after the first report window (compilation and warm-up excluded, for both).

    uv run python tools/bench_tune.py [--model DIR] [--iters 30] [--batch-size 4]
        [--num-layers 8] [--runs 1] [--pack] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# isort: off
# The same BLAS under MLX for both engines: importing mlxlm_core loads it, and only if it
# comes before mlx.core (MLX-LM alone would run on MLX's bundled reference BLAS, ~10x
# slower, which would measure the BLAS rather than the trainers).
import mlxlm_core  # noqa: F401
# isort: on

WORDS = (  # noqa: SIM905  (a word list is easier to read as text)
    "the of and to in is was for on that with as by at from his her they this which you were "
    "are be had have one all their there when an would who will more no if out so said what "
    "up its about into than them can only other new some could time these two may then do "
    "first any my now such like our over man me even most made after also did many before "
    "must through back years where much your way well down should because each just those "
    "people how too little state good very make world still own see men work long get here "
    "between both life being under never day same another know while last might us great old "
).split()


def write_data(folder: Path, *, examples: int, seed: int = 0) -> Path:
    import numpy as np

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", examples), ("valid", 8)):
        rows = []
        for _ in range(n):
            words = rng.choice(WORDS, int(rng.integers(16, 64)))
            rows.append({"text": " ".join(words).capitalize() + "."})
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def float_copy(source: str | None, target: Path) -> Path:
    """The model as a float32 directory both engines read the same way."""
    from mlxlm_core import load, save
    from mlxlm_core.quantize import dequantize_model

    if (target / "config.json").is_file():
        return target
    model, tokenizer, config = load(source, return_config=True)
    dequantize_model(model)
    for key in ("quantization", "quantization_config"):
        config.pop(key, None)
    config["torch_dtype"] = "float32"
    save(target, model, tokenizer, config, dtype="float32")
    return target


# -- one engine, in its own process ------------------------------------------------------------


def _window_rate(reports: list[dict[str, Any]]) -> tuple[float, int]:
    later = reports[1:] or reports
    tokens = sum(r["tokens"] for r in later)
    seconds = sum(r["seconds"] for r in later)
    return tokens / seconds, int(tokens)


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    import mlx.core as mx
    from mlxlm_tune import TrainingCallback, TrainingConfig, train

    windows: list[dict[str, Any]] = []

    class Window(TrainingCallback):
        def on_train_loss_report(self, info: dict[str, Any]) -> None:
            tokens = info["tokens_per_second"] / max(info["iterations_per_second"], 1e-12)
            windows.append(
                {
                    "tokens": tokens * args.report,
                    "seconds": args.report / info["iterations_per_second"],
                    "loss": info["train_loss"],
                }
            )

    config = TrainingConfig(
        model=args.model,
        data=args.data,
        iters=args.iters,
        batch_size=args.batch_size,
        num_layers=args.num_layers,
        learning_rate=1e-5,
        steps_per_report=args.report,
        steps_per_eval=10**6,
        save_every=0,
        adapter_path=args.out,
        mask_prompt=False,
        lora_parameters={"rank": args.rank, "scale": 20.0, "dropout": 0.0},
        pack=args.pack,
        grad_checkpoint=args.grad_checkpoint,
        max_seq_length=2048,
    )
    mx.reset_peak_memory()
    train(config, callbacks=[Window()])
    rate, tokens = _window_rate(windows)
    return {
        "tokens_per_second": rate,
        "tokens": tokens,
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
        "final_loss": windows[-1]["loss"],
    }


def run_mlx_lm(args: argparse.Namespace) -> dict[str, Any]:
    import types

    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.datasets import CacheDataset, load_dataset
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    windows: list[dict[str, Any]] = []

    class Window(TrainingCallback):
        def on_train_loss_report(self, info: dict[str, Any]) -> None:
            seconds = args.report / info["iterations_per_second"]
            windows.append(
                {
                    "tokens": info["tokens_per_second"] * seconds,
                    "seconds": seconds,
                    "loss": info["train_loss"],
                }
            )

    model, tokenizer = load(args.model)
    data_args = types.SimpleNamespace(
        data=args.data, train=True, test=False, mask_prompt=False, hf_dataset=False
    )
    train_set, _, _ = load_dataset(data_args, tokenizer)
    mx.random.seed(0)
    model.freeze()
    linear_to_lora_layers(
        model, args.num_layers, {"rank": args.rank, "scale": 20.0, "dropout": 0.0}
    )
    training = TrainingArgs(
        batch_size=args.batch_size,
        iters=args.iters,
        steps_per_report=args.report,
        steps_per_eval=10**6,
        steps_per_save=10**6,
        max_seq_length=2048,
        adapter_file=str(Path(args.out) / "adapters.safetensors"),
        grad_checkpoint=args.grad_checkpoint,
    )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    mx.reset_peak_memory()
    train(
        model=model,
        optimizer=optim.Adam(learning_rate=1e-5),
        train_dataset=CacheDataset(train_set),
        val_dataset=None,
        args=training,
        training_callback=Window(),
    )
    rate, tokens = _window_rate(windows)
    return {
        "tokens_per_second": rate,
        "tokens": tokens,
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
        "final_loss": windows[-1]["loss"],
    }


# -- the harness -------------------------------------------------------------------------------


def _child(
    engine: str, args: argparse.Namespace, workdir: Path, *, pack: bool = False
) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--engine",
        engine,
        "--model",
        args.model,
        "--data",
        args.data,
        "--iters",
        str(args.iters),
        "--batch-size",
        str(args.batch_size),
        "--rank",
        str(args.rank),
        "--num-layers",
        str(args.num_layers),
        "--report",
        str(args.report),
        "--out",
        str(workdir / f"{engine}-{time.time_ns()}"),
    ]
    if pack:
        command.append("--pack")
    if args.grad_checkpoint:
        command.append("--grad-checkpoint")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{engine} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["ours", "mlx_lm"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument(
        "--model", default=None, help="MLX model dir (default: float32 default model)"
    )
    parser.add_argument(
        "--data", default=None, help="data dir with train.jsonl (default: synthetic)"
    )
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--report", type=int, default=10, help="steps per report window")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--pack", action="store_true", help="also time mlxlm with --pack")
    parser.add_argument("--grad-checkpoint", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.engine:
        result = run_ours(args) if args.engine == "ours" else run_mlx_lm(args)
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if args.model is None:
            cache = Path(tempfile.gettempdir()) / "mlxlm-bench-tune-float32"
            args.model = str(float_copy(None, cache))
        if args.data is None:
            args.data = str(write_data(workdir / "data", examples=args.examples))
        runs: dict[str, list[dict[str, Any]]] = {"mlx_lm": [], "ours": [], "ours_packed": []}
        for _ in range(args.runs):
            runs["mlx_lm"].append(_child("mlx_lm", args, workdir))
            runs["ours"].append(_child("ours", args, workdir))
            if args.pack:
                runs["ours_packed"].append(_child("ours", args, workdir, pack=True))
    summary: dict[str, Any] = {}
    for name, results in runs.items():
        if results:
            summary[name] = {k: statistics.median(r[k] for r in results) for k in results[0]}
    peer = summary["mlx_lm"]
    for name in ("ours", "ours_packed"):
        if name in summary:
            summary[name]["speed_ratio"] = (
                summary[name]["tokens_per_second"] / peer["tokens_per_second"]
            )
            summary[name]["memory_ratio"] = summary[name]["peak_memory_gb"] / peer["peak_memory_gb"]
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    from mlxlm_core._blas import blas_info

    print(
        f"model {args.model}; batch {args.batch_size}, {args.iters} steps, LoRA rank {args.rank} "
        f"on {args.num_layers} blocks; BLAS {blas_info().name}"
    )
    for name, row in summary.items():
        ratio = (
            f"  speed x{row['speed_ratio']:.2f}, memory x{row['memory_ratio']:.2f}"
            if "speed_ratio" in row
            else ""
        )
        print(
            f"{name:12s} {row['tokens_per_second']:8.1f} tok/s  peak {row['peak_memory_gb']:.2f} GB{ratio}"
        )


if __name__ == "__main__":
    main()
