"""``mlxlm fuse``: merge an adapter into its base model (MLX-LM's flags, plus requantize)."""

from __future__ import annotations

import argparse
import sys

from mlxlm_core.cli import Command, console

__all__ = ["COMMAND", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--model", default=None, help="base model directory, .gguf file or hub id (default model)")
    a("--adapter-path", default="adapters", help="adapter directory (default: adapters)")
    a("--save-path", default="fused_model", help="output model directory (default: fused_model)")
    a("--dequantize", action="store_true", help="write the whole model in float")
    a(
        "--requantize",
        action="store_true",
        help="on a quantized base, quantize the fused layers again (checked: the adapter's "
        "effect must survive; default keeps them float16)",
    )
    a(
        "--min-retained",
        type=float,
        default=0.5,
        help="with --requantize: least fraction of the adapter's logit effect to keep (0.5)",
    )
    a("--force", action="store_true", help="write even if the adapter's effect did not survive")
    a(
        "--dtype",
        choices=["float16", "bfloat16", "float32"],
        default=None,
        help="float dtype of the written weights (default: the checkpoint's, else float16)",
    )
    a("--export-gguf", action="store_true", help="also write a GGUF file (needs mlxlm-gguf)")
    a(
        "--gguf-path",
        default="ggml-model-f16.gguf",
        help="GGUF file name, inside --save-path unless a path (default: ggml-model-f16.gguf)",
    )


def run(args: argparse.Namespace) -> int:
    from ._fuse import fuse

    try:
        report = fuse(
            args.model,
            args.adapter_path,
            args.save_path,
            dequantize=args.dequantize,
            requantize=args.requantize,
            min_retained=args.min_retained,
            force=args.force,
            dtype=args.dtype,
            export_gguf=args.gguf_path if args.export_gguf else None,
        )
    except ImportError as exc:
        sys.stderr.write(f"mlxlm fuse: error: {str(exc).splitlines()[0]}\n")
        return 1
    line = f"Fused {report.adapted_layers} layers ({report.mode}) into {report.save_path}"
    if report.retained is not None:
        line += f"; adapter effect retained after re-quantizing: {report.retained:.1%}"
    print(line)
    if report.gguf_path is not None:
        print(f"GGUF written to {report.gguf_path}")
    return 0


COMMAND = Command(
    name="fuse",
    help="merge a LoRA/DoRA adapter into its base model",
    add_arguments=add_arguments,
    run=run,
)
main = console(COMMAND)
