"""Loading and saving models: config, weights, quantization, adapters, tokenizer."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ._errors import CheckpointError, InvalidArgumentError
from ._policy import ExecutionPolicy, apply_policy, choose_policy, dense_copies
from ._resolve import resolve_model_path
from ._tokenizer import TokenizerWrapper, load_tokenizer
from .models import get_model_classes
from .quantize import apply_checkpoint_quantization, quantization_from_config

__all__ = ["load", "load_config", "load_model", "save"]

_SHARD_BYTES = 5 << 30


def load_config(model_path: Path) -> dict[str, Any]:
    path = model_path / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{model_path}: no config.json (not a model directory)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    if "model_type" not in config:
        raise CheckpointError(f"{path}: no model_type")
    return config


def _weight_files(model_path: Path) -> list[Path]:
    index = model_path / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise CheckpointError(f"{index}: invalid index ({exc})") from None
        missing = [n for n in names if not (model_path / n).exists()]
        if missing:
            raise CheckpointError(
                f"{model_path}: shards listed in the index are missing: {missing}"
            )
        return [model_path / n for n in names]
    files = sorted(model_path.glob("*.safetensors"))
    files = [f for f in files if not f.name.startswith("adapters")]
    if not files:
        raise CheckpointError(f"{model_path}: no *.safetensors weights")
    return files


def _read_weights(files: list[Path]) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for file in files:
        try:
            loaded = mx.load(str(file))
        except (RuntimeError, ValueError, OSError) as exc:
            raise CheckpointError(f"{file}: cannot read safetensors ({exc})") from None
        if not isinstance(loaded, dict):  # e.g. a single-array .npy named by an index
            raise CheckpointError(f"{file}: not a safetensors file of named weights")
        weights.update(loaded)
    return weights


def load_model(
    model_path: Path,
    *,
    lazy: bool = False,
    model_config: dict[str, Any] | None = None,
    dtype: str = "auto",
    weight_mode: str = "auto",
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the architecture from ``config.json`` and load its weights.

    ``dtype`` and ``weight_mode`` override the execution policy (see :func:`load`).
    """
    config = load_config(model_path)
    config.update(model_config or {})
    model_cls, args_cls = get_model_classes(config["model_type"])
    quant = quantization_from_config(config)
    try:
        model = model_cls(args_cls.from_dict(config))
    except TypeError as exc:
        raise CheckpointError(f"{model_path}/config.json: {exc}") from None
    weights = model.sanitize(_read_weights(_weight_files(model_path)))
    if quant is not None:
        apply_checkpoint_quantization(model, quant, weights)
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise CheckpointError(f"{model_path}: weights do not match {config['model_type']} ({what})")
    bad = [k for k, v in weights.items() if v.shape != expected[k].shape]
    if bad:
        k = bad[0]
        raise CheckpointError(
            f"{model_path}: {k} has shape {weights[k].shape}, expected {expected[k].shape}"
        )
    model.load_weights(list(weights.items()), strict=False)
    policy = choose_policy(dtype, weight_mode, model=model)
    model.policy = apply_policy(model, policy)  # type: ignore[attr-defined]
    if not lazy:
        _materialise(model, model_path)
    model.eval()
    return model, config


def _materialise(model: nn.Module, model_path: Path) -> None:
    try:
        mx.eval(model.parameters())
        mx.eval(dense_copies(model))  # after the parameters: one copy at a time in memory
    except (RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{model_path}: cannot read weights ({exc})") from None


def load(
    path_or_repo: str | Path | None = None,
    *,
    tokenizer_config: dict[str, Any] | None = None,
    model_config: dict[str, Any] | None = None,
    adapter_path: str | Path | None = None,
    lazy: bool = False,
    dtype: str = "auto",
    weight_mode: str = "auto",
    revision: str | None = None,
    return_config: bool = False,
) -> Any:
    """Load ``(model, tokenizer)`` from a directory, a GGUF file or a Hugging Face repo.

    ``None`` loads the default model (SmolLM2-135M-Instruct). ``adapter_path`` applies a
    LoRA/DoRA adapter. The execution policy (:mod:`._policy`) is chosen per backend:
    ``dtype`` (``auto``, ``keep``, ``float32``, ``float16``, ``bfloat16``) sets the dtype of
    floating parameters (float32 on CPU), ``weight_mode`` how quantized layers multiply
    (``auto``, ``native``: MLX's quantized kernels, ``quantized``: packed weights that
    dequantize on the fly for multi-row inputs, ``dense``: a float copy kept beside them).
    ``model.policy`` records the choice.
    """
    model_path = resolve_model_path(path_or_repo, revision=revision)
    model, config = load_model(
        model_path, lazy=True, model_config=model_config, dtype=dtype, weight_mode=weight_mode
    )
    if adapter_path is not None:
        from .adapters import load_adapters

        load_adapters(model, Path(adapter_path))
        model.policy = apply_policy(model, model.policy)
    if not lazy:
        _materialise(model, model_path)
    eos = config.get("eos_token_id")
    eos_ids = [eos] if isinstance(eos, int) else [e for e in eos or [] if isinstance(e, int)]
    tokenizer = load_tokenizer(
        model_path, tokenizer_config=tokenizer_config, eos_token_ids=eos_ids or None
    )
    model.model_path = model_path  # type: ignore[attr-defined]
    if return_config:
        return model, tokenizer, config
    return model, tokenizer


def save(
    path: str | Path,
    model: nn.Module,
    tokenizer: TokenizerWrapper | None,
    config: dict[str, Any],
    *,
    dtype: str | None = None,
) -> Path:
    """Write an MLX model directory (sharded safetensors, config, tokenizer) atomically."""
    dest = Path(path)
    if dest.exists() and any(dest.iterdir()):
        raise InvalidArgumentError(f"{dest} exists and is not empty")
    dest.parent.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    if dtype is not None:
        target = getattr(mx, dtype)
        weights = {
            k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v
            for k, v in weights.items()
        }
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        _write_shards(staging, weights)
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        if dest.exists():
            dest.rmdir()
        staging.replace(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest


def _write_shards(folder: Path, weights: dict[str, mx.array]) -> None:
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for name in sorted(weights):
        array = weights[name]
        if size + array.nbytes > _SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    if len(shards) == 1:
        mx.save_safetensors(
            str(folder / "model.safetensors"), shards[0], metadata={"format": "mlx"}
        )
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(folder / file), shard, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(a.nbytes for a in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def describe_policy(model: nn.Module) -> str:
    policy: ExecutionPolicy | None = getattr(model, "policy", None)
    return policy.describe() if policy else "unknown"
