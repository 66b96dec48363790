"""``mlxlm gguf import FILE OUT_DIR`` and ``mlxlm gguf export --model X --out FILE``."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from mlxlm_core.cli import Command, add_model_args, console, load_from_args

from ._encode import OUT_TYPES


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

    exp = actions.add_parser("export", help="MLX model -> GGUF file that llama.cpp runs")
    add_model_args(exp)
    exp.add_argument("--out", type=Path, required=True, help="the .gguf file to write")
    exp.add_argument(
        "--out-type",
        default="auto",
        choices=OUT_TYPES,
        help="tensor type of the weight matrices (auto: float16 for float layers, the "
        "closest GGUF type for quantized ones)",
    )
    exp.add_argument(
        "--pre-tokenizer",
        default=None,
        help="llama.cpp's name for the tokenizer's pre-tokenizer, when it is not recognised",
    )
    exp.add_argument("--name", default=None, help="general.name written in the file")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing file")
    exp.add_argument("--json", action="store_true", help="print a JSON summary")


def _run_import(args: argparse.Namespace) -> int:
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


def _run_export(args: argparse.Namespace) -> int:
    from mlxlm_core.adapters import fuse_adapters

    from ._export import export

    if args.out.exists() and not args.overwrite:
        # Say so before spending time loading the model.
        from mlxlm_core import InvalidArgumentError

        raise InvalidArgumentError(f"{args.out} already exists (use --overwrite to replace it)")
    model, tokenizer = load_from_args(args)
    if args.adapter_path is not None:
        fuse_adapters(model)
    report = export(
        model,
        tokenizer,
        args.out,
        out_type=args.out_type,
        overwrite=args.overwrite,
        pre_tokenizer=args.pre_tokenizer,
        name=args.name,
    )
    if args.json:
        summary = asdict(report) | {"path": str(report.path)}
        print(json.dumps(summary))
    else:
        types = ", ".join(f"{n} {t}" for t, n in report.tensor_types.items())
        print(
            f"exported {report.model_type} -> {report.path} ({report.architecture}, "
            f"{report.file_type}: {types}) in {report.seconds:.1f}s"
        )
        for note in report.notes:
            print(f"note: {note}")
    return 0


def run(args: argparse.Namespace) -> int:
    return _run_export(args) if args.action == "export" else _run_import(args)


COMMAND = Command(
    "gguf", "GGUF files (llama.cpp's format): import into MLX, export from MLX", add_arguments, run
)
main = console(COMMAND)
