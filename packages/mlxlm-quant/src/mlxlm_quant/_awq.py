"""AWQ (Lin et al., 2023): scale salient input channels up before quantizing, then clip.

Multiplying a linear layer's input channel ``c`` by ``s_c`` and its weight column by
``1/s_c`` changes nothing in float but lets the channels that carry large activations keep
more precision after quantization. The ``1/s`` has to be folded into whatever produces
the input (a norm's weight, or the rows of a linear whose output feeds the group
elementwise-linearly, like ``up_proj`` into ``down_proj``).

Nothing here is per-family. In each block the producers are discovered: layers fed the
same activation form a group, the leaf module whose output equals that activation (or a
linear of matching width) is a candidate producer, and a candidate is accepted only if
folding random scales through it leaves the block's output unchanged on a probe input.
A group without a verified producer is only clipped. The scale search minimises the
group's output error on calibration activations over ``s = mean|x|^a`` for a grid of ``a``
(``a = 0`` is plain rounding, so it never does worse on that objective); the clip search
then picks, per output row and group, the shrink of the weight range with the least
output error. The head (or tied embedding) is clipped against the final hidden states.
Each block is calibrated on what it will be fed once quantized: the rounded embedding's
lookups, then the outputs of the blocks before it as quantized.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
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
from ._pack import round_trip
from ._recipe import QuantRecipe

__all__ = ["AWQConfig", "awq_quantize"]

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class AWQConfig:
    n_grid: int = 20  # scale exponents tried in [0, 1)
    clip_grid: int = 20  # clip shrinks tried: 1, 1 - 1/clip_grid, ... down to max_shrink
    max_shrink: float = 0.5
    batch_size: int = 4


# -- producer discovery -------------------------------------------------------------------


def _same(a: object, b: object) -> bool:
    if a is b:
        return True
    if not isinstance(a, mx.array) or not isinstance(b, mx.array):
        return False  # e.g. a router returning (indices, weights)
    if a.size != b.size or a.shape[-1] != b.shape[-1]:
        return False
    return bool(mx.array_equal(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])))


def _fold(producer: nn.Module, variant: str, group: list[nn.Module], s: mx.array) -> None:
    """Divide the producer's output channels by ``s``; multiply the group's columns."""
    if variant == "rows":
        producer.weight = producer.weight / s[:, None]
    elif variant == "norm":
        producer.weight = producer.weight / s
    elif variant == "offset-norm":  # norms computing x * (1 + weight)
        producer.weight = (1.0 + producer.weight) / s - 1.0
    if "bias" in producer:
        producer.bias = producer.bias / s
    for layer in group:
        layer.weight = layer.weight * s


def _variants(module: nn.Module) -> list[str]:
    w = getattr(module, "weight", None)
    if not isinstance(w, mx.array) or isinstance(module, nn.Embedding):
        return []
    if w.ndim == 2 and isinstance(module, nn.Linear):
        return ["rows"]
    if w.ndim == 1:
        return ["norm", "offset-norm"]
    return []


def _discover(
    block: nn.Module, probe: mx.array, extra: tuple[tuple, dict], targets: list[str]
) -> list[tuple[list[str], str | None, str | None]]:
    """``(group paths, producer path, fold variant)`` for the block's target layers."""
    modules = dict(block.named_modules())
    leaves = [p for p, m in modules.items() if (p and not m.children()) or p in targets]
    leaves = [p for p in leaves if p and not modules[p].children()]
    seen: dict[str, tuple[mx.array, mx.array]] = {}

    def record(path: str, x: mx.array, y: mx.array) -> None:
        seen.setdefault(path, (x, y))

    with hooked(block, leaves, record):
        ref = run_block(block, [probe], extra)[0]
    groups: list[list[str]] = []
    for path in targets:
        if path not in seen:
            continue
        for group in groups:
            if _same(seen[group[0]][0], seen[path][0]):
                group.append(path)
                break
        else:
            groups.append([path])
    found: list[tuple[list[str], str | None, str | None]] = []
    for group in groups:
        x = seen[group[0]][0]
        exact = [p for p in leaves if p in seen and p not in group and _same(seen[p][1], x)]
        wide = [
            p
            for p in leaves
            if p in seen
            and isinstance(modules[p], nn.Linear)
            and p not in group
            and isinstance(seen[p][1], mx.array)
            and seen[p][1].shape[-1] == x.shape[-1]
            and p not in exact
        ]
        choice: tuple[str | None, str | None] = (None, None)
        for cand in exact + wide:
            for variant in _variants(modules[cand]):
                if _verified(block, probe, extra, ref, modules, cand, variant, group, x.shape[-1]):
                    choice = (cand, variant)
                    break
            if choice[0] is not None:
                break
        found.append((group, *choice))
    return found


def _verified(block, probe, extra, ref, modules, cand, variant, group, dim) -> bool:
    """Folding random scales through ``cand`` leaves the block output unchanged.

    The error is measured per output channel, against that channel's own magnitude: the
    residual stream of later blocks carries a few massive channels (100x the rest), and an
    error relative to the largest value overall let a wrong producer pass (``down_proj``
    for ``o_proj``, whose widths match, seen on SmolLM2 from block 11 on).
    """
    saved = block.parameters()
    s = mx.random.uniform(0.5, 2.0, (dim,), key=mx.random.key(dim))
    try:
        _fold(modules[cand], variant, [modules[p] for p in group], s)
        out = run_block(block, [probe], extra)[0]
        width = ref.shape[-1]
        scale = mx.abs(ref).reshape(-1, width).max(axis=0)
        diff = mx.abs(out - ref).reshape(-1, width).max(axis=0)
        err = float((diff / (scale + 1e-3 * mx.mean(scale) + 1e-12)).max())
        return err < 1e-3
    finally:
        block.update(saved)


# -- searches -----------------------------------------------------------------------------


def _output_error(delta: mx.array, h: mx.array) -> mx.array:
    """``sum_n (x_n . delta_o)^2`` for every row ``o``: the quadratic form with ``H = X^T X``."""
    return ((delta @ h) * delta).sum(axis=-1)


def _search_scale(
    h: mx.array, x_mean: mx.array, layers: list[nn.Module], specs: list[QuantSpec], n_grid: int
) -> mx.array:
    """The ``s = mean|x|^a`` with the least output error of the group, over ``a``'s grid.

    Exact over every calibration token: ``||X W^T - (X/s) Q(W s)^T||^2`` is
    ``tr(D H D^T)`` with ``D = W - Q(W s)/s``.
    """
    best, best_s = float("inf"), mx.ones_like(x_mean)
    for step in range(n_grid):
        s = mx.maximum(x_mean ** (step / n_grid), 1e-4)
        s = s / mx.sqrt(s.max() * s.min())
        loss = mx.array(0.0)
        for layer, spec in zip(layers, specs):
            w = layer.weight
            loss = loss + _output_error(w - round_trip(w * s, spec) / s, h).sum()
        value = float(loss)
        if value < best:
            best, best_s = value, s
    return best_s


def _search_clip(h: mx.array, w: mx.array, spec: QuantSpec, config: AWQConfig) -> mx.array:
    """``w`` clipped per (row, group) to the range with the least output error.

    A group's error only involves its own inputs, so the diagonal blocks of ``H`` suffice.
    """
    g = spec.group_size
    groups = w.shape[-1] // g
    idx = mx.arange(groups)
    blocks = h.reshape(groups, g, groups, g)[idx, :, idx, :]  # (groups, g, g)
    wg = w.reshape(w.shape[0], groups, g)
    top = mx.abs(wg).max(axis=-1, keepdims=True)
    best_err = mx.full(wg.shape[:2], float("inf"))
    best_top = top
    for i in range(int(config.max_shrink * config.clip_grid)):
        limit = top * (1 - i / config.clip_grid)
        clipped = mx.clip(wg, -limit, limit).reshape(w.shape)
        delta = (w - round_trip(clipped, spec)).reshape(wg.shape).transpose(1, 0, 2)  # (G, o, g)
        err = ((delta @ blocks) * delta).sum(axis=-1).T  # (o, G)
        better = err < best_err
        best_err = mx.where(better, err, best_err)
        best_top = mx.where(better[..., None], limit, best_top)
        mx.eval(best_err, best_top)
    return mx.clip(wg, -best_top, best_top).reshape(w.shape)


class _BlockJudge:
    """Keeps whichever candidate weights give the block output closest to the float one.

    The searches minimise each layer's own output error; attention and gating are not
    linear in those outputs, so (as MLX-LM's AWQ does) the block's real output error on
    calibration data decides between plain rounding and scaling with clipping. Scaling
    without clipping is not offered: it wins on the judge's batch only where clipping
    overfits that batch (block 11 of 30 on the default model, with float inputs), and
    offering it measured worse (tools/bench_quant.py, 4-bit g64, held-out perplexity
    eval.txt / unused calibration windows / together: 34.70 / 33.62 / 33.95 against
    34.84 / 33.04 / 33.58, both with the sequential calibration of :func:`_rounded_outputs`).
    """

    def __init__(self, block, probe, target, extra, modules, specs) -> None:
        self.block, self.probe, self.target, self.extra = block, probe, target, extra
        self.modules, self.specs = modules, specs
        self.best: tuple[float, Any] | None = None

    def consider(self) -> None:
        params = self.block.parameters()
        out = _rounded_outputs(self.block, [self.probe], self.extra, self.modules, self.specs)
        err = float(((out[0] - self.target) ** 2).mean())
        if self.best is None or err < self.best[0]:
            self.best = (err, params)

    def keep_best(self) -> None:
        assert self.best is not None
        self.block.update(self.best[1])


def _rounded_outputs(
    block: nn.Module,
    hidden: list[mx.array],
    extra: tuple[tuple, dict],
    modules: dict[str, nn.Module],
    specs: dict[str, QuantSpec],
) -> list[mx.array]:
    """The block's outputs with its layers rounded as they will be (its float weights are
    restored after): what the judge compares, and the next block's inputs.

    Calibrating each block on the quantized model's own hidden states (not the float
    model's) lets its scales and clips see the error that reaches it, as the rounded
    embedding lookups do for the first block. Measured on the default model
    (tools/bench_quant.py, 4-bit g64, held-out perplexity eval.txt / unused calibration
    windows / together): 34.84 / 33.04 / 33.58 against 34.91 / 33.38 / 33.84 when the
    float block outputs fed the next block (MLX-LM's AWQ, which does that: 35.27 / 32.89
    / 33.60).
    """
    params = block.parameters()
    try:
        for path, spec in specs.items():
            modules[path].weight = round_trip(modules[path].weight, spec)
        return run_block(block, hidden, extra)
    finally:
        block.update(params)


# -- driver -------------------------------------------------------------------------------


def _quantized_lookups(
    model: nn.Module, tokens: mx.array, plan: dict[str, QuantSpec | None], batch_size: int
) -> list[mx.array]:
    """The first block's inputs as the quantized model will compute them.

    The embedding table is only rounded (a lookup has no input statistics to weigh), so its
    rounding error is known before any block is searched: calibrating on the rounded
    lookups lets the first blocks' scales and clips account for it, as MLX-LM's AWQ does
    (measured on the default model: held-out perplexity 33.94 against 34.45 at 4-bit g64,
    tools/bench_quant.py's two sets together; 59.20 against 60.32 at 3-bit g64 on eval.txt).
    """
    inside = {id(m) for b in model.layers for _, m in b.named_modules()}
    saved = []
    for path, module in model.named_modules():
        spec = plan.get(path)
        if isinstance(module, nn.Embedding) and id(module) not in inside and spec is not None:
            saved.append((module, module.weight))
            module.weight = round_trip(module.weight, spec)
    try:
        return block_inputs(model, tokens, batch_size=batch_size)
    finally:
        for module, weight in saved:
            module.weight = weight


def awq_quantize(
    model: nn.Module,
    tokens: mx.array,
    recipe: QuantRecipe,
    *,
    config: AWQConfig | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Scale, clip, then quantize ``model`` in place per ``recipe``; the config block."""
    config = config or AWQConfig()
    plan = recipe.plan(model)
    names = {id(m): p for p, m in model.named_modules()}
    extras = block_extras(model, tokens.shape[1])
    hidden = _quantized_lookups(model, tokens, plan, config.batch_size)
    blocks = list(model.layers)
    for i, block in enumerate(blocks):
        prefix = names[id(block)] + "."
        modules = dict(block.named_modules())
        specs_of = {
            p: spec
            for p in linear_paths(block)
            if isinstance(modules[p], nn.Linear) and (spec := plan.get(prefix + p)) is not None
        }
        targets = list(specs_of)
        stats = InputStats()
        with hooked(block, targets, stats):
            outputs = run_block(block, hidden, extras[i])
        judge = _BlockJudge(block, hidden[0], outputs[0], extras[i], modules, specs_of)
        judge.consider()  # plain rounding
        clips: list[tuple[nn.Module, Any, mx.array]] = []
        for group, producer, variant in _discover(block, hidden[0][:1], extras[i], targets):
            layers = [modules[p] for p in group]
            specs = [plan[prefix + p] for p in group]
            h, x_mean = stats.for_layer(group[0])
            if producer is not None:
                s = _search_scale(h, x_mean, layers, specs, config.n_grid)  # type: ignore[arg-type]
                _fold(modules[producer], variant or "", layers, s)
                h = h / (s[:, None] * s[None, :])  # the group's inputs are now x / s
            clips.extend((layer, spec, h) for layer, spec in zip(layers, specs))
        for layer, spec, h in clips:
            layer.weight = _search_clip(h, layer.weight, spec, config)  # type: ignore[arg-type]
        judge.consider()  # scaled and clipped
        judge.keep_best()
        mx.eval(block.parameters())
        hidden = _rounded_outputs(block, hidden, extras[i], modules, specs_of)
        if progress:
            progress("awq", i + 1, len(blocks) + 1)
    stats = InputStats()
    tail_calls(model, hidden, tokens, batch_size=config.batch_size, callback=stats)
    modules = dict(model.named_modules())
    for path in stats.owner:
        key = path.removesuffix("#as_linear")
        head_spec = plan.get(key)
        if head_spec is not None:  # the head (or tied embedding): clipped, not scaled
            h, _ = stats.for_layer(path)
            modules[key].weight = _search_clip(h, modules[key].weight, head_spec, config)
    if progress:
        progress("awq", len(blocks) + 1, len(blocks) + 1)
    return recipe.apply(model, plan=plan)
