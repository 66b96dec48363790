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

import functools
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
    feed_block,
    hooked,
    linear_paths,
    run_block,
    tail_calls,
)
from ._pack import quantized_from_codes
from ._recipe import QuantRecipe, quantize_with_plan

__all__ = ["GPTQConfig", "affine_grid", "gptq_quantize", "gptq_weight"]

Progress = Callable[[str, int, int], None]


# One forward over all calibration sequences at once when the attention scores of one head
# (sequences x length^2 floats) stay under 32 MiB; e.g. 32 x 512 or 128 x 256 tokens.
ONE_PASS_LIMIT = 2**23


@dataclass(frozen=True)
class GPTQConfig:
    damp: float = 0.01  # fraction of the mean Hessian diagonal added for stability
    # Calibration sequences per forward. None: all at once when they fit (ONE_PASS_LIMIT),
    # else 4. All at once, each block runs once and a layer is quantized the moment its
    # input is known (true-sequential); in batches, a block runs twice (once to gather its
    # Hessians, once quantized to feed the next block).
    batch_size: int | None = None


def _inverse_factor(h: mx.array, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """Upper Cholesky factor ``U`` of the damped ``H^-1`` (``H^-1 = U^T U``), dead channels.

    Row ``j`` of ``U`` holds the update coefficients for column ``j``. With ``J`` the
    reversal permutation and ``J H J = L L^T``, ``U = J L^-1 J``: one Cholesky factorization
    and one triangular inverse, in float32 on MLX's CPU stream (LAPACK from the BLAS that
    mlxlm_core put under MLX). That is ~20x faster here than numpy's float64 ``inv`` and two
    ``cholesky``, whose threaded OpenBLAS also stalls when the machine is busy. Should float32
    lose definiteness (NaN), the damping grows tenfold and the factorization is retried.
    """
    with mx.stream(mx.cpu):
        h = h.astype(mx.float32)
        dead = mx.diagonal(h) == 0
        h = h + mx.diag(dead.astype(mx.float32))  # a channel never fed: any positive value
        mean = mx.mean(mx.diagonal(h))
        eye = mx.eye(h.shape[0])
        for attempt in range(4):
            damped = (h + eye * (damp * 10**attempt * mean))[::-1, ::-1]
            u = mx.linalg.tri_inv(mx.linalg.cholesky(damped), upper=False)[::-1, ::-1]
            if not bool(mx.isnan(u).any()):
                break
        return np.array(u), np.array(dead)


def affine_grid(groups: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """MLX's affine scale and bias for each row of ``groups`` (``(n, group)`` float32).

    The same choice as ``mx.quantize`` (a test checks it value for value): the endpoint of
    larger magnitude is the bias and lands exactly on the grid, the step is the range over
    ``2**bits - 1`` adjusted so that zero is a grid point too. Rounded to float16, as saved.
    Computed here because GPTQ needs it once per group on the error-updated weights, and a
    round trip through MLX per group costs more than the arithmetic.
    """
    n_bins = 2**bits - 1
    lo, hi = groups.min(axis=-1), groups.max(axis=-1)
    step = np.maximum((hi - lo) / np.float32(n_bins), np.float32(1e-7))
    low_side = np.abs(lo) > np.abs(hi)
    step = np.where(low_side, step, -step)
    edge = np.where(low_side, lo, hi)
    q0 = np.rint(edge / step)
    at_zero = q0 == 0
    scale = np.where(at_zero, step, edge / np.where(at_zero, 1, q0))
    bias = np.where(at_zero, 0, edge)
    return scale.astype(np.float16).astype(np.float32), bias.astype(np.float16).astype(np.float32)


def gptq_weight(
    w: np.ndarray | mx.array,
    h: np.ndarray | mx.array,
    *,
    bits: int,
    group_size: int,
    damp: float,
) -> tuple[np.ndarray, mx.array, mx.array]:
    """GPTQ one ``(out, in)`` weight against Hessian ``h``: codes, scales, biases.

    Group by group (the lazy batch is the quantization group): a group's grid comes from
    its error-updated columns; inside the group each column first takes the corrections
    owed by the group's earlier columns (one matrix-vector product, "left-looking"), is
    rounded, and its scaled error is kept; then one matrix product pushes the whole group's
    errors onto every later column. Numpy float32 on the transposed weight, so a column is
    a contiguous row: the loop is memory-bound.
    """
    u, dead = _inverse_factor(mx.array(h), damp)
    wt = np.array(mx.array(w).astype(mx.float32)).T.copy()  # (in, out): column j is wt[j]
    cols, rows = wt.shape
    wt[dead] = 0.0
    maxq = np.float32(2**bits - 1)
    inv_diag = (1.0 / np.diag(u)).astype(np.float32)
    codes = np.empty((cols, rows), dtype=np.uint8)
    scales = np.empty((cols // group_size, rows), dtype=np.float32)
    biases = np.empty_like(scales)
    err = np.empty((group_size, rows), dtype=np.float32)
    q = np.empty(rows, dtype=np.float32)
    deq = np.empty(rows, dtype=np.float32)
    for g, start in enumerate(range(0, cols, group_size)):
        end = start + group_size
        sg, bg = affine_grid(np.ascontiguousarray(wt[start:end].T), bits)
        scales[g], biases[g] = sg, bg
        inv_s = (1.0 / np.where(sg == 0, 1.0, sg)).astype(np.float32)
        for k in range(group_size):
            j = start + k
            # einsum, not matmul: numpy's threaded BLAS stalls on a busy machine (a
            # 32 x 49152 product took 16 ms instead of 0.1), einsum's own loop does not.
            wj = wt[j] - np.einsum("k,kr->r", u[start:j, j], err[:k]) if k else wt[j]
            np.subtract(wj, bg, out=q)
            q *= inv_s
            np.rint(q, out=q)
            np.minimum(np.maximum(q, 0, out=q), maxq, out=q)
            codes[j] = q
            np.multiply(q, sg, out=deq)
            deq += bg
            np.subtract(wj, deq, out=err[k])
            err[k] *= inv_diag[j]
        if end < cols:  # on MLX's BLAS (sequential MKL/OpenBLAS), for the same reason
            wt[end:] -= np.array(mx.array(u[start:end, end:]).T @ mx.array(err))
    return codes.T, mx.array(scales.T), mx.array(biases.T)


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

    def quantize_group(
        modules: dict[str, nn.Module], prefix: str, keys: list[str], h: mx.array
    ) -> None:
        """GPTQ the layers ``keys`` (relative to ``prefix``), all fed the input of ``h``."""
        by_spec: dict[QuantSpec, list[str]] = {}
        for key in keys:
            spec = plan.get(prefix + key)
            if spec is not None and prefix + key not in done:
                by_spec.setdefault(spec, []).append(key)
        # Layers sharing the Hessian and a spec are stacked into one GPTQ problem.
        for spec, group in by_spec.items():
            weights = [modules[k].weight.astype(mx.float32) for k in group]
            codes, s, b = gptq_weight(
                mx.concatenate(weights),
                h,
                bits=spec.bits,
                group_size=spec.group_size,
                damp=config.damp,
            )
            start = 0
            for key, w in zip(group, weights):
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
                # What runs next sees this layer's quantized output, computed in float.
                module.weight = _dequantized(layer).astype(module.weight.dtype)

    def quantize_recorded(modules: dict[str, nn.Module], prefix: str, stats: InputStats) -> None:
        for owner, h in stats.h.items():
            keys = [p.removesuffix("#as_linear") for p, o in stats.owner.items() if o == owner]
            quantize_group(modules, prefix, keys, h)

    count, length = tokens.shape
    batch = config.batch_size or (count if count * length**2 <= ONE_PASS_LIMIT else 4)
    extras = block_extras(model, length)
    hidden = block_inputs(model, tokens, batch_size=batch)
    blocks = list(model.layers)
    for i, block in enumerate(blocks):
        prefix = names[id(block)] + "."
        modules = dict(block.named_modules())
        paths = [
            p
            for p in linear_paths(block)
            if isinstance(modules[p], nn.Linear) and plan.get(prefix + p)
        ]
        if len(hidden) == 1:
            quantize = functools.partial(quantize_group, modules, prefix)
            hidden = _block_one_pass(block, paths, hidden, extras[i], quantize)
        else:
            stats = InputStats()
            with hooked(block, paths, stats):
                feed_block(block, hidden, extras[i])
            quantize_recorded(modules, prefix, stats)
            hidden = run_block(block, hidden, extras[i])
        if progress:
            progress("gptq", i + 1, len(blocks) + 1)
    # The layers after the blocks (the head, or the tied embedding used as one), fed the
    # final hidden states.
    stats = InputStats()
    tail_calls(model, hidden, tokens, batch_size=batch, callback=stats)
    quantize_recorded(dict(model.named_modules()), "", stats)
    if progress:
        progress("gptq", len(blocks) + 1, len(blocks) + 1)
    return _finish(model, plan, recipe, done)


def _block_one_pass(
    block: nn.Module,
    paths: list[str],
    hidden: list[mx.array],
    extra: tuple[tuple, dict],
    quantize: Callable[[list[str], mx.array], None],
) -> list[mx.array]:
    """Run ``block`` once on all calibration data, GPTQ-ing each layer group on its call.

    A probe on one sequence finds the layers sharing an input (q/k/v, gate/up) and which of
    them is called first. In the real pass that layer's call computes the group's Hessian
    from its input as it really is (every layer called before is already quantized),
    quantizes the whole group, and the call proceeds with the quantized weights.
    """
    stats = InputStats()
    with hooked(block, paths, stats):
        feed_block(block, [hidden[0][:1]], extra)
    groups: dict[str, list[str]] = {}
    for path, owner in stats.owner.items():
        groups.setdefault(owner, []).append(path)

    def on_call(path: str, x: mx.array, _: None) -> None:
        if path in groups:
            xf = x.reshape(-1, x.shape[-1]).astype(mx.float32)
            quantize(groups[path], xf.T @ xf)

    with hooked(block, paths, on_call, before=True):
        return run_block(block, hidden, extra)


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
