"""``mlxlm convert``: a Hugging Face / MLX directory (or a GGUF file) → an MLX model directory.

Optionally casts the floating parameters (``--dtype``), quantizes uniformly (``-q`` with
``--q-bits``, ``--q-group-size``, ``--q-mode``) or dequantizes (``--dequantize``). The
output is written by :func:`mlxlm_core.save` (staged, then renamed into place), with
``config.json`` carrying MLX-LM's ``quantization`` block, so MLX-LM reads it too. Recipes
(mixed bits, AWQ, GPTQ, DWQ) are mlxlm-quant's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .args import add_model_args
from .command import Command, console

CONVERSION_DTYPES = ("float16", "bfloat16", "float32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    # MLX-LM's name for the source; the same destination as --model.
    parser.add_argument("--hf-path", dest="model", default=None, help="same as --model")
    parser.add_argument("--mlx-path", default="mlx_model", help="output directory (must not exist)")
    parser.add_argument("-q", "--quantize", action="store_true", help="quantize the weights")
    parser.add_argument("--q-bits", type=int, default=None, help="bits per weight (mode default)")
    parser.add_argument("--q-group-size", type=int, default=None, help="group size (mode default)")
    parser.add_argument("--q-mode", default="affine", choices=["affine", "mxfp4", "nvfp4", "mxfp8"])
    parser.add_argument(
        "-d", "--dequantize", action="store_true", help="turn a quantized model back to float"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")


def _validate(args: argparse.Namespace) -> None:
    from .._errors import InvalidArgumentError
    from ..quantize import QUANT_MODES, QuantSpec

    if args.quantize and args.dequantize:
        raise InvalidArgumentError("choose either --quantize or --dequantize, not both")
    if not args.quantize and (args.q_bits is not None or args.q_group_size is not None):
        raise InvalidArgumentError("--q-bits and --q-group-size need -q/--quantize")
    if args.adapter_path is not None:
        raise InvalidArgumentError("convert does not apply adapters; fuse them with 'mlxlm fuse'")
    if args.dtype not in ("auto", "keep", *CONVERSION_DTYPES):
        raise InvalidArgumentError(f"--dtype must be one of {', '.join(CONVERSION_DTYPES)}")
    if args.quantize:
        bits, _, group = QUANT_MODES[args.q_mode]
        args.q_bits = args.q_bits if args.q_bits is not None else (4 if 4 in bits else bits[0])
        args.q_group_size = args.q_group_size if args.q_group_size is not None else group
        QuantSpec(bits=args.q_bits, group_size=args.q_group_size, mode=args.q_mode)  # validates
    dest = Path(args.mlx_path)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InvalidArgumentError(f"{dest} already exists; choose a new --mlx-path or remove it")


def _cast(model: Any, dtype: str) -> None:
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    from .._mx_typed import flat_items

    target = getattr(mx, dtype)
    params = flat_items(model.parameters())
    changed = [
        (k, v.astype(target))
        for k, v in params
        if mx.issubdtype(v.dtype, mx.floating) and v.dtype != target
    ]
    if changed:
        model.update(tree_unflatten(changed))


def _is_quantized(config: dict[str, Any]) -> bool:
    return "quantization" in config or "quantization_config" in config


def run(args: argparse.Namespace) -> int:
    from .._errors import InvalidArgumentError
    from .._loading import load, save
    from ..quantize import dequantize_model, quantize_model

    _validate(args)
    # Keep the checkpoint's dtype unless asked: "auto" would mean float32 on CPU, which
    # is an execution choice, not something to bake into a converted model.
    explicit = args.dtype if args.dtype in CONVERSION_DTYPES else None
    model, tokenizer, config = load(
        args.model,
        dtype="keep",
        weight_mode="native",  # no dense copies: converting computes nothing with them
        revision=args.revision,
        lazy=True,
        return_config=True,
    )
    config = dict(config)
    if args.quantize and _is_quantized(config):
        raise InvalidArgumentError(
            "the model is already quantized; convert it with --dequantize first"
        )
    if args.dequantize and not _is_quantized(config):
        raise InvalidArgumentError("the model is not quantized; there is nothing to dequantize")
    if explicit is not None:
        _cast(model, explicit)
        config["torch_dtype"] = explicit
    if args.quantize:
        block = quantize_model(
            model, bits=args.q_bits, group_size=args.q_group_size, mode=args.q_mode
        )
        # MLX-LM writes both keys; transformers-style readers look for the second.
        config["quantization"] = block
        config["quantization_config"] = block
    if args.dequantize:
        config.pop("quantization", None)
        config.pop("quantization_config", None)
        dequantize_model(model)
    try:
        dest = save(args.mlx_path, model, tokenizer, config)
    except (OSError, RuntimeError) as exc:  # MLX reports I/O failures as RuntimeError
        raise InvalidArgumentError(f"cannot write {args.mlx_path}: {exc}") from None
    summary = {
        "mlx_path": str(dest),
        "source": str(getattr(model, "model_path", args.model)),
        "dtype": explicit or config.get("torch_dtype"),
        "quantization": config.get("quantization"),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        what = "quantized" if args.quantize else "dequantized" if args.dequantize else "converted"
        print(f"[mlxlm] {what} {summary['source']} -> {dest}")
    return 0


COMMAND = Command(
    "convert", "convert a model to an MLX directory, optionally quantized", add_arguments, run
)
main = console(COMMAND)
