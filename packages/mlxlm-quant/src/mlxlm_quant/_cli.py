"""``mlxlm quantize`` / ``awq`` / ``gptq`` / ``dwq`` / ``dynamic-quant``: one flow, one recipe.

Every command validates everything it can (recipe, layer names, destination, calibration
file) before the slow work, and writes the output directory only at the end, staged and
renamed into place, so a failure never leaves a partial model behind.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from mlxlm_core.cli import Command, add_model_args, console

from ._recipe import PRESETS, QuantRecipe

METHODS = ("rtn", "awq", "gptq", "dwq")


def _progress() -> Any:
    """A ``(stage, done, total)`` callback drawing a bar on a terminal, else None."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bars: dict[str, Any] = {}

    def update(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, file=sys.stderr, leave=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


def _add_common(parser: argparse.ArgumentParser, *, calibrate: bool) -> None:
    add_model_args(parser)
    parser.add_argument("--mlx-path", default="mlx_model", help="output directory (must not exist)")
    group = parser.add_argument_group("recipe")
    group.add_argument(
        "--recipe",
        default=None,
        help=f"a built-in recipe ({', '.join(PRESETS)}) or a .json/.yaml recipe file",
    )
    group.add_argument("--bits", "--q-bits", dest="bits", type=int, default=None)
    group.add_argument("--group-size", "--q-group-size", dest="group_size", type=int, default=None)
    group.add_argument(
        "--mode", "--q-mode", dest="mode", default=None, help="affine, mxfp4, nvfp4 or mxfp8"
    )
    group.add_argument(
        "--keep-float",
        action="append",
        default=None,
        metavar="PATTERN",
        help="module paths (fnmatch) kept in float; repeatable",
    )
    parser.add_argument("--save-dtype", default="float16", help="dtype of stored floats")
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    if calibrate:
        data = parser.add_argument_group("calibration")
        data.add_argument(
            "--data-path",
            default=None,
            help='local .txt or .jsonl ({"text": ...}) file (default: built-in corpus)',
        )
        data.add_argument("--num-samples", type=int, default=32)
        data.add_argument("--sequence-length", type=int, default=256)
        data.add_argument("--seed", type=int, default=0)


def build_recipe(args: argparse.Namespace) -> QuantRecipe:
    """The recipe from ``--recipe`` (preset or file) with flags overriding its defaults."""
    from mlxlm_core import InvalidArgumentError

    from ._recipe import preset

    if args.recipe is None:
        base: dict[str, Any] = {}
    elif args.recipe in PRESETS:
        base = preset(args.recipe).as_dict()
    elif Path(args.recipe).suffix.lower() in (".json", ".yaml", ".yml"):
        base = QuantRecipe.from_file(args.recipe).as_dict()
    else:
        raise InvalidArgumentError(
            f"--recipe {args.recipe!r} is neither a built-in recipe ({', '.join(PRESETS)}) "
            "nor a .json/.yaml file"
        )
    if args.mode is not None:
        base["mode"] = args.mode
        if args.group_size is None and args.recipe is None:
            base.pop("group_size", None)
    if args.bits is not None:
        base["bits"] = args.bits
    if args.group_size is not None:
        base["group_size"] = args.group_size
    if args.keep_float:
        base["keep_float"] = [*base.get("keep_float", []), *args.keep_float]
    base.pop("predicate", None)
    return QuantRecipe.from_dict(base, source=args.recipe or "flags")


def _load(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    from mlxlm_core import load
    from mlxlm_core.quantize import dequantize_model

    model, tokenizer, config = load(
        args.model,
        adapter_path=args.adapter_path,
        revision=args.revision,
        dtype="float32",
        return_config=True,
    )
    config = dict(config)
    if "quantization" in config or "quantization_config" in config:
        sys.stderr.write("note: the model is quantized; dequantizing it to float first\n")
        dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    config.pop("quantization_recipe", None)
    return model, tokenizer, config


def run_method(args: argparse.Namespace, method: str) -> int:
    from mlxlm_core import InvalidArgumentError

    from ._calibration import BUILTIN_CALIBRATION_NAME, calibration_windows
    from ._output import SAVE_DTYPES, check_destination, save_quantized
    from ._quantize import quantize

    if args.save_dtype not in SAVE_DTYPES:
        raise InvalidArgumentError(f"--save-dtype must be one of {', '.join(SAVE_DTYPES)}")
    recipe = build_recipe(args)
    dest = check_destination(args.mlx_path)
    if getattr(args, "sequence_length", 2) < 2:
        raise InvalidArgumentError("--sequence-length must be >= 2")
    start = time.perf_counter()
    model, tokenizer, config = _load(args)
    recipe.plan(model)  # names missing layers before any slow work
    tokens = None
    details: dict[str, Any] = {}
    needs_data = method != "rtn" or getattr(args, "target_bpw", None) is not None
    if needs_data:
        import mlx.core as mx

        mx.random.seed(args.seed)
        tokens = calibration_windows(
            tokenizer,
            data_path=args.data_path,
            num_samples=args.num_samples,
            sequence_length=args.sequence_length,
        )
        details["calibration"] = {
            "data": str(args.data_path or BUILTIN_CALIBRATION_NAME),
            "samples": int(tokens.shape[0]),
            "sequence_length": int(tokens.shape[1]),
        }
    progress = _progress()
    if getattr(args, "target_bpw", None) is not None:
        from ._dynamic import dynamic_recipe

        assert tokens is not None

        widths = _ints(args.widths, "--widths")
        groups = _ints(args.group_sizes, "--group-sizes") if args.group_sizes else None
        recipe, _ = dynamic_recipe(
            model,
            tokens,
            target_bpw=args.target_bpw,
            base=recipe,
            bits=widths,
            group_sizes=groups,
            estimator=args.estimator,
            progress=progress,
        )
        details["target_bpw"] = args.target_bpw
    extra = {"dwq_steps": args.steps, "dwq_lr": args.learning_rate} if method == "dwq" else {}
    block = quantize(model, recipe, method=method, tokens=tokens, progress=progress, **extra)
    saved = save_quantized(
        dest,
        model,
        tokenizer,
        config,
        block,
        recipe=recipe,
        method=method if getattr(args, "target_bpw", None) is None else f"dynamic+{method}",
        details=details,
        dtype=args.save_dtype,
    )
    bpw = json.loads((saved / "config.json").read_text())["quantization_recipe"]["bits_per_weight"]
    summary = {
        "mlx_path": str(saved),
        "method": method,
        "recipe": recipe.as_dict(),
        "bits_per_weight": bpw,
        "seconds": round(time.perf_counter() - start, 1),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"[mlxlm] {method}: {bpw:.3f} bits per weight -> {saved} ({summary['seconds']} s)")
    return 0


def _ints(text: str, flag: str) -> tuple[int, ...]:
    from mlxlm_core import InvalidArgumentError

    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise InvalidArgumentError(f"{flag} takes comma-separated integers, got {text!r}") from None


def _add_quantize(parser: argparse.ArgumentParser) -> None:
    _add_common(parser, calibrate=True)
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="rtn",
        help="rtn: round to nearest (no calibration); awq, gptq, dwq: learned",
    )
    _add_dwq_args(parser)


def _add_dwq_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("dwq")
    group.add_argument("--steps", type=int, default=200, help="DWQ optimisation steps")
    group.add_argument("--learning-rate", type=float, default=1e-5)


def _add_dynamic(parser: argparse.ArgumentParser) -> None:
    _add_common(parser, calibrate=True)
    parser.add_argument(
        "--target-bpw",
        type=float,
        required=True,
        help="bits per weight to reach, counted as MLX-LM does (scales, biases and float "
        "layers included: uniform 3-bit g64 is 3.5)",
    )
    parser.add_argument("--widths", default="2,3,4,5,6,8", help="candidate bit widths")
    parser.add_argument(
        "--group-sizes",
        default=None,
        help="candidate group sizes (default: the recipe's and, for affine, 128 too)",
    )
    parser.add_argument(
        "--estimator",
        choices=("fisher", "gradient"),
        default="fisher",
        help="how layer sensitivities are estimated",
    )
    parser.add_argument(
        "--quantizer",
        choices=("rtn", "awq", "gptq"),
        default="rtn",
        help="how each layer is quantized at its chosen width",
    )


def _fixed(method: str) -> Any:
    def add(parser: argparse.ArgumentParser) -> None:
        _add_common(parser, calibrate=True)
        if method == "dwq":
            _add_dwq_args(parser)

    return add


QUANTIZE = Command(
    "quantize",
    "quantize a model with a recipe (rtn, awq, gptq or dwq)",
    _add_quantize,
    lambda a: run_method(a, a.method),
)
AWQ = Command(
    "awq", "activation-aware weight quantization", _fixed("awq"), lambda a: run_method(a, "awq")
)
GPTQ = Command("gptq", "GPTQ weight quantization", _fixed("gptq"), lambda a: run_method(a, "gptq"))
DWQ = Command(
    "dwq",
    "distilled weight quantization (needs mlxlm-quant[dwq])",
    _fixed("dwq"),
    lambda a: run_method(a, "dwq"),
)
DYNAMIC = Command(
    "dynamic-quant",
    "per-layer bit widths to a bits-per-weight target",
    _add_dynamic,
    lambda a: run_method(a, a.quantizer),
)

quantize_main = console(QUANTIZE)
awq_main = console(AWQ)
gptq_main = console(GPTQ)
dwq_main = console(DWQ)
dynamic_main = console(DYNAMIC)
