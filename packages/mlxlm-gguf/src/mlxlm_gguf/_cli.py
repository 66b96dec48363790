"""``mlxlm gguf import FILE OUT_DIR``: convert a GGUF file into an MLX model directory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mlxlm_core.cli import Command, console


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    imp = actions.add_parser("import", help="GGUF file -> MLX model directory")
    imp.add_argument("gguf_path", type=Path, help="the .gguf file")
    imp.add_argument("out_dir", type=Path, help="directory to create")
    imp.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help="dtype of float tensors, scales and biases (float32: fastest on CPU)",
    )
    imp.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")
    imp.add_argument("--json", action="store_true", help="print a JSON summary")


def run(args: argparse.Namespace) -> int:
    from ._import import import_gguf

    out = import_gguf(args.gguf_path, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
    config = json.loads((out / "config.json").read_text())
    summary = {
        "out_dir": str(out),
        "model_type": config.get("model_type"),
        "quantization": config.get("quantization"),
        "gguf_import": config.get("gguf_import"),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"imported {args.gguf_path} -> {out} ({summary['model_type']})")
    return 0


COMMAND = Command("gguf", "import GGUF files (llama.cpp's format) into MLX", add_arguments, run)
main = console(COMMAND)
