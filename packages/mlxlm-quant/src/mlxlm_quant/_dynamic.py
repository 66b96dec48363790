"""Dynamic quantization: per-layer bit widths that meet a bits-per-weight budget.

Each layer's sensitivity to quantization at width ``b`` is estimated to second order with
the empirical Fisher information of the calibration loss: ``dL(b) ~ 1/2 sum(F * (Q_b(W) -
W)^2)``, where ``F`` is the mean squared gradient of the next-token cross-entropy with
respect to ``W`` (one backward pass per calibration sequence, at the float model). The
widths are then allocated greedily: every layer starts at the narrowest candidate and the
upgrade with the largest estimated loss reduction per added bit is taken while the budget
allows. The result is a :class:`QuantRecipe` with one exact rule per layer, so it can be
saved, inspected, edited, and applied by rounding or by a learned quantizer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlxlm_core import InvalidArgumentError
from mlxlm_core.quantize import QuantSpec

from ._recipe import LayerRule, QuantRecipe


def _flat(tree: Any) -> list[tuple[str, mx.array]]:
    return tree_flatten(tree)  # type: ignore[return-value]


__all__ = ["bits_per_weight", "dynamic_recipe", "layer_sensitivities", "spec_bits"]

Progress = Callable[[str, int, int], None]


def spec_bits(spec: QuantSpec | None) -> float:
    """Stored bits per weight of a layer: codes plus 16-bit (affine) or 8-bit (mx) scales."""
    if spec is None:
        return 16.0
    if spec.mode == "affine":
        return spec.bits + 32 / spec.group_size  # float16 scale and bias per group
    return spec.bits + 8 / spec.group_size  # one 8-bit scale per group


def bits_per_weight(model: nn.Module) -> float:
    """Bits per weight of ``model`` as saved (float parameters at 16 bits)."""
    quantized = {p: m for p, m in model.named_modules() if hasattr(m, "bits") and "scales" in m}
    total_bits = 0.0
    count = 0
    for name, value in _flat(model.parameters()):
        owner, _, leaf = name.rpartition(".")
        module = quantized.get(owner)
        if module is not None and leaf == "weight":
            count += value.size * 32 // module.bits
            total_bits += value.size * 32
        elif module is not None:
            total_bits += value.size * (16 if mx.issubdtype(value.dtype, mx.floating) else 8)
        else:
            count += value.size
            total_bits += value.size * 16
    return total_bits / max(count, 1)


def _qdq(w: mx.array, spec: QuantSpec) -> mx.array:
    q = mx.quantize(w, group_size=spec.group_size, bits=spec.bits, mode=spec.mode)
    return mx.dequantize(*q, group_size=spec.group_size, bits=spec.bits, mode=spec.mode)


def layer_sensitivities(
    model: nn.Module,
    tokens: mx.array,
    layers: Sequence[str],
    candidates: Sequence[QuantSpec],
    *,
    progress: Progress | None = None,
) -> dict[str, list[float]]:
    """Estimated loss increase of quantizing each layer alone at each candidate spec."""
    modules = dict(model.named_modules())
    model.freeze()
    for path in layers:
        modules[path].unfreeze(keys=["weight"], recurse=False)

    def loss_fn(batch: mx.array) -> mx.array:
        logits = model(batch[:, :-1]).astype(mx.float32)
        return nn.losses.cross_entropy(logits, batch[:, 1:], reduction="mean")

    grad_fn = nn.value_and_grad(model, loss_fn)
    fisher: dict[str, mx.array] = {}
    try:
        for i in range(tokens.shape[0]):
            _, grads = grad_fn(tokens[i : i + 1])
            for name, g in _flat(grads):
                path = name.removesuffix(".weight")
                fisher[path] = fisher[path] + g * g if path in fisher else g * g
            mx.eval(fisher)
            if progress:
                progress("sensitivity", i + 1, tokens.shape[0])
    finally:
        model.unfreeze()
    out: dict[str, list[float]] = {}
    for path in layers:
        w = modules[path].weight
        f = fisher[path] / tokens.shape[0]
        out[path] = [float(0.5 * (f * (_qdq(w, c) - w) ** 2).sum()) for c in candidates]
    return out


def dynamic_recipe(
    model: nn.Module,
    tokens: mx.array,
    *,
    target_bpw: float,
    base: QuantRecipe | None = None,
    bits: Sequence[int] = (2, 3, 4, 5, 6, 8),
    progress: Progress | None = None,
) -> tuple[QuantRecipe, dict[str, list[float]]]:
    """A recipe choosing each layer's width from ``bits`` to meet ``target_bpw``."""
    base = base or QuantRecipe(bits=min(bits), group_size=64)
    plan = base.plan(model)
    layers = [p for p, spec in plan.items() if spec is not None]
    group = base.group_size or 64
    candidates = [QuantSpec(bits=b, group_size=group, mode=base.mode) for b in sorted(bits)]
    sizes = {p: dict(model.named_modules())[p].weight.size for p in layers}
    counted = set(layers)
    # Everything not quantized (norms, biases, layers kept float) is stored at 16 bits.
    other = sum(
        v.size
        for name, v in _flat(model.parameters())
        if name.removesuffix(".weight") not in counted
    )
    total = other + sum(sizes.values())
    budget = target_bpw * total - 16.0 * other
    floor = sum(spec_bits(candidates[0]) * n for n in sizes.values())
    ceiling = sum(spec_bits(candidates[-1]) * n for n in sizes.values())
    if budget < floor or budget > ceiling:
        low = (floor + 16.0 * other) / total
        high = (ceiling + 16.0 * other) / total
        raise InvalidArgumentError(
            f"target {target_bpw} bits per weight is out of reach: this model can take "
            f"{low:.2f} to {high:.2f} with widths {list(bits)} and group size {group}"
        )
    sens = layer_sensitivities(model, tokens, layers, candidates, progress=progress)
    choice = dict.fromkeys(layers, 0)
    used = floor
    while True:
        best, best_gain = None, 0.0
        for p in layers:
            k = choice[p]
            if k + 1 >= len(candidates):
                continue
            extra = (spec_bits(candidates[k + 1]) - spec_bits(candidates[k])) * sizes[p]
            if used + extra > budget:
                continue
            gain = (sens[p][k] - sens[p][k + 1]) / extra
            if best is None or gain > best_gain:
                best, best_gain = p, gain
        if best is None:
            break
        k = choice[best]
        used += (spec_bits(candidates[k + 1]) - spec_bits(candidates[k])) * sizes[best]
        choice[best] = k + 1
    rules = tuple(LayerRule(match=p, bits=candidates[k].bits) for p, k in choice.items())
    recipe = QuantRecipe(
        bits=candidates[0].bits,
        group_size=group,
        mode=base.mode,
        rules=rules,
        keep_float=base.keep_float,
        name=f"dynamic_{target_bpw:g}bpw",
    )
    return recipe, sens
