"""Helpers of core's model unit tests: a tiny random model of any architecture
(_zoo_configs.py), token inputs and the comparisons the tests make.

Loaded by path (the tests run with --import-mode=importlib, so no test folder is on
sys.path) and, by the two-rank sharding test's worker processes, by module name.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlxlm_core.cache import make_prompt_cache
from mlxlm_core.models import get_model_classes


def load_sibling(name: str) -> ModuleType:
    """The module ``name``.py of this folder, loaded once per process."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


configs = load_sibling("_zoo_configs")
CONFIGS: dict[str, dict[str, Any]] = configs.CONFIGS
ARCHS: list[str] = configs.ARCHS
WINDOW: int = configs.WINDOW


def model_args(name: str, **overrides: Any) -> Any:
    """The parsed ``ModelArgs`` of ``CONFIGS[name]`` with ``overrides``."""
    config = {**copy.deepcopy(CONFIGS[name]), **overrides}
    return get_model_classes(config["model_type"])[1].from_dict(config)


def build(name: str, *, seed: int = 0, **overrides: Any) -> nn.Module:
    """Our float32 model of ``CONFIGS[name]`` (with ``overrides``), random parameters.

    Every vector parameter (norm scales, biases, router biases) moves by 0.2 N(0, 1):
    fresh ones (ones, zeros, constants) would hide a norm or bias misplaced or never used.
    """
    config = {**copy.deepcopy(CONFIGS[name]), **overrides}
    model_cls, args_cls = get_model_classes(config["model_type"])
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    params = [
        (k, v + 0.2 * mx.random.normal(v.shape) if v.ndim == 1 else v)
        for k, v in tree_flatten(model.parameters())
    ]
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    return model


def is_moe(config: dict[str, Any]) -> bool:
    """Whether the config asks for routed experts (SwitchLinear layers)."""
    return any(k in config for k in ("num_experts", "num_local_experts", "n_routed_experts"))


def is_mla(config: dict[str, Any]) -> bool:
    """Whether the config asks for DeepSeek's latent attention (MultiLinear layers)."""
    return "kv_lora_rank" in config


def toks(shape: tuple[int, ...], seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, 128, size=shape))


def max_diff(a: mx.array, b: mx.array) -> float:
    return float(mx.max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32))).item())


def rel_diff(a: mx.array, b: mx.array) -> float:
    """The largest difference as a fraction of ``b``'s largest magnitude."""
    return max_diff(a, b) / float(mx.max(mx.abs(b)).item())


def rel_l2(a: mx.array, b: mx.array) -> float:
    """``|a - b| / |b|`` in the L2 norm."""
    return float((mx.linalg.norm(a - b) / mx.linalg.norm(b)).item())


def to_numpy(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32), dtype=np.float64)


def windows(model: nn.Module) -> list[int | None]:
    """Each layer's sliding window, as the model's own caches bound it (None: global)."""
    return [getattr(c, "max_size", None) for c in make_prompt_cache(model)]


def dequantized_copy(name: str, quantized: nn.Module) -> nn.Module:
    """A float model of ``name`` holding exactly the values ``quantized`` computes with."""
    weights = dict(tree_flatten(quantized.parameters()))
    for path, module in quantized.named_modules():
        if "scales" in module:
            prefix = f"{path}." if path else ""
            for leaf in ("scales", "biases"):
                weights.pop(prefix + leaf, None)
            weights[prefix + "weight"] = mx.dequantize(
                module["weight"],
                module["scales"],
                module.get("biases"),
                group_size=module.group_size,
                bits=module.bits,
                mode=module.mode,
            )
    model = build(name)
    model.load_weights(list(weights.items()), strict=True)
    return model
