"""Merging a trained adapter into its base model, and proving the merge kept the adapter.

- Float base: each adapted layer becomes a plain layer with ``W + scale * (A @ B)^T``.
- Quantized base (default): the adapted layers are written as float16 layers and marked
  unquantized in the config, so the adapter survives exactly; the rest stays quantized.
- ``requantize=True``: the adapted layers are quantized again (smaller file), and the
  adapter's effect is *measured*: on probe text, the fraction of the logit change the
  adapter caused that the re-quantized model still shows. A LoRA update smaller than the
  quantization step rounds away entirely (MLX-LM issue #1564), so below ``min_retained``
  the fuse is refused instead of silently writing the base model back.
- ``dequantize=True``: the whole model is written in float.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlxlm_core import InvalidArgumentError
from mlxlm_core.adapters import AdapterLayer, fuse_adapters, load_adapters
from mlxlm_core.quantize import dequantize_model

from ._meta import check_base_model
from ._trainer import scalar

__all__ = ["PROBE_TEXT", "FuseReport", "adapter_effect_retained", "fuse", "fuse_model"]

PROBE_TEXT = (
    "The lighthouse keeper wrote the weather in a green notebook every morning. "
    "Question: what is the capital of France? Answer: Paris. "
    "def add(a, b):\n    return a + b\n"
    "In 1969 people first walked on the Moon, and the pictures reached every country."
)


@dataclass
class FuseReport:
    save_path: Path
    adapted_layers: int
    mode: str  # "float", "float16-layers", "requantized", "dequantized"
    retained: float | None = None
    gguf_path: Path | None = None


def _is_quantized(module: nn.Module) -> bool:
    return "scales" in module


def _adapters(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, AdapterLayer)]


def fuse_model(
    model: nn.Module, *, requantize: bool = False, dequantize: bool = False
) -> list[str]:
    """Merge every adapter of ``model`` in place; returns the paths of the fused layers."""
    paths = [p for p, _ in _adapters(model)]
    if not paths:
        raise InvalidArgumentError("the model has no adapter layers to fuse")
    fuse_adapters(model, requantize=requantize and not dequantize)
    if dequantize:
        dequantize_model(model)
    return paths


def adapter_effect_retained(base: mx.array, adapted: mx.array, fused: mx.array) -> float:
    """``1 - |fused - adapted| / |adapted - base|`` over logits: 1 kept all, 0 none.

    Computed on log-probabilities, so a constant shift of the logits counts as no change.
    """

    def logp(x: mx.array) -> mx.array:
        x = x.astype(mx.float32)
        return x - mx.logsumexp(x, axis=-1, keepdims=True)

    effect = scalar(mx.linalg.norm((logp(adapted) - logp(base)).reshape(-1)))
    lost = scalar(mx.linalg.norm((logp(fused) - logp(adapted)).reshape(-1)))
    if effect == 0.0:
        return 1.0
    return 1.0 - lost / effect


def _probe_logits(model: nn.Module, tokens: mx.array) -> mx.array:
    out = model(tokens)
    mx.eval(out)
    return out


def _base_logits(model: nn.Module, tokens: mx.array) -> mx.array:
    """Logits with every adapter taken out (then put back)."""
    adapters = _adapters(model)
    model.update_modules(tree_unflatten([(p, m.base) for p, m in adapters]))
    try:
        return _probe_logits(model, tokens)
    finally:
        model.update_modules(tree_unflatten(list(adapters)))


def _save_dtype(config: dict[str, Any], dtype: str | None) -> str:
    if dtype is not None:
        if dtype not in ("float16", "bfloat16", "float32"):
            raise InvalidArgumentError(f"dtype must be float16, bfloat16 or float32; got {dtype!r}")
        return dtype
    declared = config.get("torch_dtype") or config.get("dtype")
    return declared if declared in ("float16", "bfloat16", "float32") else "float16"


def _cast(model: nn.Module, dtype: str, *, half: list[str]) -> None:
    """Floating parameters to ``dtype``; the layers in ``half`` to float16 whatever it is."""
    target = getattr(mx, dtype)
    prefixes = tuple(f"{p}." for p in half)
    changed = []
    params: dict[str, mx.array] = dict(tree_flatten(model.parameters()))
    for name, value in params.items():
        if not mx.issubdtype(value.dtype, mx.floating):
            continue
        wanted = mx.float16 if name.startswith(prefixes) else target
        if value.dtype != wanted:
            changed.append((name, value.astype(wanted)))
    if changed:
        model.update(tree_unflatten(changed))


def fuse(
    model: str | Path | None,
    adapter_path: str | Path,
    save_path: str | Path,
    *,
    dequantize: bool = False,
    requantize: bool = False,
    min_retained: float = 0.5,
    force: bool = False,
    probe_text: str | None = None,
    dtype: str | None = None,
    export_gguf: str | Path | None = None,
) -> FuseReport:
    """Load ``model`` + ``adapter_path``, merge, and write an MLX model dir at ``save_path``.

    ``export_gguf`` also writes that GGUF file through mlxlm-gguf (the ``gguf`` extra).
    """
    from mlxlm_core import load, save

    if dequantize and requantize:
        raise InvalidArgumentError("--dequantize and --requantize exclude each other")
    save_dir = Path(save_path)
    if save_dir.exists() and any(save_dir.iterdir()):
        raise InvalidArgumentError(f"{save_dir} exists and is not empty")
    if export_gguf is not None:
        _gguf_exporter()  # fail before the work if the extra is missing
    loaded, tokenizer, config = load(model, return_config=True)
    check_base_model(loaded, adapter_path)
    load_adapters(loaded, Path(adapter_path))
    adapters = _adapters(loaded)
    if not adapters:
        raise InvalidArgumentError(f"{adapter_path}: a full fine-tune has nothing to fuse")
    quantized = [p for p, m in adapters if _is_quantized(m.base)]
    retained = None
    if requantize and quantized:
        tokens = mx.array([tokenizer.encode(probe_text or PROBE_TEXT)])
        adapted = _probe_logits(loaded, tokens)
        base = _base_logits(loaded, tokens)
        fuse_model(loaded, requantize=True)
        retained = adapter_effect_retained(base, adapted, _probe_logits(loaded, tokens))
        if retained < min_retained and not force:
            raise InvalidArgumentError(
                f"re-quantizing kept only {retained:.0%} of the adapter's effect on the logits "
                f"(need {min_retained:.0%}); fuse without --requantize (adapted layers stay "
                "float16) or with --dequantize, or pass --force"
            )
        mode = "requantized"
    else:
        fuse_model(loaded, dequantize=dequantize)
        if dequantize:
            mode = "dequantized"
        elif quantized:
            mode = "float16-layers"
        else:
            mode = "float"
    config = dict(config)
    if dequantize:
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    elif mode == "float16-layers":
        for key in ("quantization", "quantization_config"):
            if isinstance(config.get(key), dict):
                config[key] = {**config[key], **dict.fromkeys(quantized, False)}
    _cast(loaded, _save_dtype(config, dtype), half=quantized if mode == "float16-layers" else [])
    save(save_dir, loaded, tokenizer, config)
    gguf_path = None
    if export_gguf is not None:
        gguf_path = Path(export_gguf)
        if not gguf_path.is_absolute() and gguf_path.parent == Path("."):
            gguf_path = save_dir / gguf_path
        _gguf_exporter()(loaded, tokenizer, gguf_path)
    return FuseReport(save_dir, len(adapters), mode, retained, gguf_path)


def _gguf_exporter() -> Any:
    try:
        from mlxlm_gguf import export  # type: ignore[import-not-found]
    except ImportError:
        raise ImportError(
            "--export-gguf needs mlxlm-gguf: pip install 'mlxlm-tune[gguf]'"
        ) from None
    return export
