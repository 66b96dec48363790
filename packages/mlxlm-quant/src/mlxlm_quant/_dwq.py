"""DWQ: distil a quantized model's scales and biases against the float model's logits.

The integer codes of a round-to-nearest quantization stay fixed; every affine layer's
per-group scales and biases (and the model's remaining float parameters: norms, biases)
are trained to minimise the KL divergence from the float model's next-token distribution
on calibration text. Training runs on a float stand-in of each quantized layer
(``W = codes * scale + bias`` rebuilt per step, one BLAS matmul), because MLX's quantized
CPU kernels are slow and have no gradients for scales; at the end the trained scales and
biases are written back into ordinary quantized layers with the same codes.

The training loop is mlxlm-tune's (:class:`mlxlm_tune.Trainer`, ``build_optimizer``,
``Batch``), installed by the ``dwq`` extra: ``pip install "mlxlm-quant[dwq]"``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from ._pack import pack_codes
from ._recipe import QuantRecipe

__all__ = ["DWQConfig", "dwq_quantize"]

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class DWQConfig:
    steps: int = 200
    learning_rate: float = 1e-5
    batch_size: int = 1
    temperature: float = 2.0  # softened targets, as MLX-LM distils


def _require_tune() -> Any:
    try:
        import mlxlm_tune
    except ImportError:
        raise ImportError('DWQ trains with mlxlm-tune: pip install "mlxlm-quant[dwq]"') from None
    return mlxlm_tune


class _FakeQuant(nn.Module):
    """A quantized linear/embedding as float: fixed codes, trainable scales and biases."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.bits, self.group_size = layer.bits, layer.group_size
        self.embedding = isinstance(layer, nn.QuantizedEmbedding)
        w = mx.dequantize(
            layer.weight, layer.scales, layer.biases, group_size=self.group_size, bits=self.bits
        )
        s = mx.repeat(layer.scales, self.group_size, axis=-1)
        b = mx.repeat(layer.biases, self.group_size, axis=-1)
        self._codes = mx.round((w - b) / s)  # frozen: not a parameter (leading underscore)
        self.scales, self.biases = layer.scales, layer.biases
        if "bias" in layer:
            self.bias = layer.bias

    def dense(self) -> mx.array:
        rows, cols = self._codes.shape
        groups = cols // self.group_size
        q = self._codes.reshape(rows, groups, self.group_size)
        w = q * self.scales[..., None] + self.biases[..., None]
        return w.reshape(rows, cols)

    def __call__(self, x: mx.array) -> mx.array:
        if self.embedding:
            return self.dense()[x]
        y = x @ self.dense().T
        return y + self.bias if "bias" in self else y

    def as_linear(self, x: mx.array) -> mx.array:
        return x @ self.dense().T

    def back(self, original: nn.Module) -> nn.Module:
        """``original`` (the quantized layer this replaced) carrying the trained values."""
        codes = np.array(self._codes).astype(np.int64)
        original.weight = mx.array(pack_codes(codes, self.bits))
        original.scales, original.biases = self.scales, self.biases
        return original


def dwq_quantize(
    model: nn.Module,
    tokens: mx.array,
    recipe: QuantRecipe,
    *,
    config: DWQConfig | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Round-to-nearest per ``recipe``, then distil scales/biases; the config block."""
    tune = _require_tune()
    config = config or DWQConfig()
    teacher = copy.deepcopy(model)
    teacher.freeze()
    block = recipe.apply(model)
    swapped: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear | nn.QuantizedEmbedding) and (
            getattr(module, "mode", "affine") == "affine"
        ):
            swapped[path] = module
    model.update_modules(tree_unflatten([(p, _FakeQuant(m)) for p, m in swapped.items()]))
    model.freeze()
    model.unfreeze(keys=["scales", "biases"])  # quantization parameters only
    t = config.temperature

    def kl_loss(student: nn.Module, batch: Any) -> tuple[mx.array, mx.array]:
        logits = student(batch.tokens).astype(mx.float32) / t
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        target = batch.reference
        kl = (mx.exp(target) * (target - logp)).sum(axis=-1)
        count = mx.array(kl.size, dtype=mx.float32)
        return kl.mean(), count

    optimizer = tune.build_optimizer("adam", config.learning_rate)
    trainer = tune.Trainer(
        model,
        optimizer,
        loss=kl_loss,
        options=tune.TrainerOptions(iters=config.steps, compile=False),
    )
    n = tokens.shape[0]
    # The teacher's targets are reused on later passes over the data when they fit in
    # about 2 GB; otherwise they are recomputed each step.
    vocab = teacher(tokens[:1, :2]).shape[-1]
    keep = tokens.size * vocab * 4 <= 2 << 30
    cache: dict[int, mx.array] = {}

    def target(i: int) -> mx.array:
        if i in cache:
            return cache[i]
        logits = teacher(tokens[i : i + 1]).astype(mx.float32) / t
        out = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        mx.eval(out)
        if keep:
            cache[i] = out
        return out

    try:
        for step in range(config.steps):
            rows = [(step * config.batch_size + i) % n for i in range(config.batch_size)]
            batch_tokens = tokens[mx.array(rows)]
            batch = tune.Batch(
                tokens=batch_tokens,
                mask=mx.ones(batch_tokens.shape),
                reference=mx.concatenate([target(i) for i in rows]),
            )
            trainer.train_step([batch])
            if progress:
                progress("dwq", step + 1, config.steps)
    finally:
        model.unfreeze()
        current = dict(model.named_modules())
        model.update_modules(tree_unflatten([(p, current[p].back(m)) for p, m in swapped.items()]))
    return block
