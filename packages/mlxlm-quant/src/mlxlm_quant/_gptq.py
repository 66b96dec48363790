"""GPTQ (Frantar et al., 2022): quantize each weight column, push its error onto the rest.

For a layer with inputs ``X`` the output error of a weight change ``D`` is
``tr(D H D^T)`` with ``H = X^T X``. GPTQ quantizes columns left to right and, after each,
corrects the columns not yet quantized by the optimal compensation ``-err * Hinv[j, j:] /
Hinv[j, j]`` (computed from the upper Cholesky factor of ``H^-1``), in blocks of 128
columns so most of the work is one matrix product per block. Group scales come from the
error-updated weights when a group starts, through ``mx.quantize`` so the grid is MLX's.

Blocks are processed in order and each block's Hessians come from the inputs produced by
the blocks already quantized (sequential GPTQ), found by hooking the layers, so any
architecture works. The output head (or a tied embedding used as the head) gets GPTQ with
the final hidden states as inputs; expert (switch) layers and untied input embeddings,
whose inputs are not a dense activation matrix, fall back to round-to-nearest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten
from mlxlm_core import UnsupportedError
from mlxlm_core.quantize import QuantSpec

from ._blocks import (
    InputStats,
    block_extras,
    block_inputs,
    hooked,
    linear_paths,
    run_block,
    tail_calls,
)
from ._pack import affine_params, quantized_from_codes
from ._recipe import QuantRecipe, quantize_with_plan

__all__ = ["GPTQConfig", "gptq_quantize", "gptq_weight"]

Progress = Callable[[str, int, int], None]
DT = np.float32  # the column loop is memory-bound; float32 halves its traffic


@dataclass(frozen=True)
class GPTQConfig:
    damp: float = 0.01  # fraction of the mean Hessian diagonal added for stability
    block_size: int = 128  # columns per lazy update
    batch_size: int = 4  # calibration sequences per forward


def gptq_weight(
    w: np.ndarray, h: np.ndarray, *, bits: int, group_size: int, damp: float, block_size: int
) -> tuple[np.ndarray, mx.array, mx.array]:
    """GPTQ one ``(out, in)`` weight against Hessian ``h``: codes, scales, biases."""
    w = w.astype(np.float64).copy()
    h = h.astype(np.float64).copy()
    rows, cols = w.shape
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(cols)] += damp * np.mean(np.diag(h))
    # Upper Cholesky factor of H^-1: row j holds the update coefficients for column j.
    hinv = np.linalg.inv(np.linalg.cholesky(h))
    hinv = hinv.T @ hinv
    u = np.linalg.cholesky(hinv).T.astype(DT)
    w = w.astype(DT)
    step = max(block_size // group_size, 1) * group_size
    maxq = 2**bits - 1
    codes = np.zeros((rows, cols), dtype=np.int64)
    scales = np.zeros((rows, cols // group_size), dtype=DT)
    biases = np.zeros_like(scales)
    for i1 in range(0, cols, step):
        i2 = min(i1 + step, cols)
        w1 = w[:, i1:i2]
        err = np.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = i1 + j
            g = col // group_size
            if col % group_size == 0:
                s, b = affine_params(
                    mx.array(w1[:, j : j + group_size].astype(np.float32)),
                    bits=bits,
                    group_size=group_size,
                )
                # Saved checkpoints keep float16 scales; choose codes against those.
                scales[:, g] = np.array(s.astype(mx.float16).astype(mx.float32))[:, 0]
                biases[:, g] = np.array(b.astype(mx.float16).astype(mx.float32))[:, 0]
            sg, bg = scales[:, g], biases[:, g]
            q = np.clip(np.rint((w1[:, j] - bg) / sg), 0, maxq)
            codes[:, col] = q
            e = (w1[:, j] - (q * sg + bg)) / u1[j, j]
            w1[:, j:] -= np.outer(e, u1[j, j:])
            err[:, j] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return codes, mx.array(scales.astype(np.float32)), mx.array(biases.astype(np.float32))


def gptq_quantize(
    model: nn.Module,
    tokens: mx.array,
    recipe: QuantRecipe,
    *,
    config: GPTQConfig | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Quantize ``model`` in place with GPTQ on calibration ``tokens``; the config block."""
    config = config or GPTQConfig()
    plan = recipe.plan(model)
    for path, spec in plan.items():
        if spec is not None and spec.mode != "affine":
            raise UnsupportedError(
                f"gptq supports affine quantization only; {path} asks for {spec.mode}"
            )
    names = {id(m): p for p, m in model.named_modules()}
    done: dict[str, nn.Module] = {}  # full path -> quantized layer

    def gptq_layers(root: nn.Module, prefix: str, hess: InputStats) -> None:
        modules = dict(root.named_modules())
        for owner, h in hess.h.items():
            # Layers sharing this Hessian and a spec are stacked into one GPTQ problem.
            by_spec: dict[QuantSpec, list[str]] = {}
            for rel, o in hess.owner.items():
                key = rel.removesuffix("#as_linear")
                spec = plan.get(prefix + key)
                if o == owner and spec is not None and prefix + key not in done:
                    by_spec.setdefault(spec, []).append(key)
            h_np = np.array(h)
            for spec, keys in by_spec.items():
                weights = [np.array(modules[k].weight.astype(mx.float32)) for k in keys]
                codes, s, b = gptq_weight(
                    np.concatenate(weights),
                    h_np,
                    bits=spec.bits,
                    group_size=spec.group_size,
                    damp=config.damp,
                    block_size=config.block_size,
                )
                start = 0
                for key, w in zip(keys, weights):
                    rows = slice(start, start + w.shape[0])
                    start += w.shape[0]
                    module = modules[key]
                    layer = quantized_from_codes(
                        module,
                        codes[rows],
                        s[rows],
                        b[rows],
                        bits=spec.bits,
                        group_size=spec.group_size,
                    )
                    done[prefix + key] = layer
                    # Later blocks see this layer's quantized output, computed in float.
                    module.weight = _dequantized(layer).astype(module.weight.dtype)

    extras = block_extras(model, tokens.shape[1])
    hidden = block_inputs(model, tokens, batch_size=config.batch_size)
    blocks = list(model.layers)
    for i, block in enumerate(blocks):
        prefix = names[id(block)] + "."
        paths = [
            p
            for p in linear_paths(block)
            if isinstance(dict(block.named_modules())[p], nn.Linear) and plan.get(prefix + p)
        ]
        hess = InputStats()
        with hooked(block, paths, hess):
            run_block(block, hidden, extras[i])
        gptq_layers(block, prefix, hess)
        hidden = run_block(block, hidden, extras[i])
        if progress:
            progress("gptq", i + 1, len(blocks) + 1)
    _gptq_head(model, blocks, hidden, gptq_layers, tokens, config)
    if progress:
        progress("gptq", len(blocks) + 1, len(blocks) + 1)
    return _finish(model, plan, recipe, done)


def _gptq_head(model, blocks, hidden, gptq_layers, tokens, config) -> None:
    """GPTQ for the layers after the blocks (the head), fed the final hidden states."""
    hess = InputStats()
    tail_calls(model, hidden, tokens, batch_size=config.batch_size, callback=hess)
    gptq_layers(model, "", hess)


def _dequantized(layer: nn.Module) -> mx.array:
    return mx.dequantize(
        layer.weight, layer.scales, layer.biases, group_size=layer.group_size, bits=layer.bits
    )


def _finish(
    model: nn.Module,
    plan: dict[str, QuantSpec | None],
    recipe: QuantRecipe,
    done: dict[str, nn.Module],
) -> dict[str, Any]:
    """Round-to-nearest for what GPTQ did not cover, then swap the GPTQ layers in."""
    rest = {p: (None if p in done else s) for p, s in plan.items()}
    config = quantize_with_plan(model, rest, default=recipe.spec)
    model.update_modules(tree_unflatten(list(done.items())))
    for path in done:
        spec = plan[path]
        assert spec is not None
        if spec != recipe.spec:
            config[path] = spec.as_config()
    return config
