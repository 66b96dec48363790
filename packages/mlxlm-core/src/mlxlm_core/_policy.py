"""Backend-aware execution policy: which dtype parameters and activations use.

Measured on MLX's Linux CPU backend (see DESIGN.md §8): a 4-bit matrix-vector product runs
~2 GFLOP/s with float32 activations, ~0.05 with float16 and ~0.25 with bfloat16, and
bfloat16 made SmolLM2's output degenerate. So on CPU every floating parameter (weights,
quantization scales and biases, norms) is cast to float32; on GPU backends the checkpoint's
own half-precision dtype is kept, as MLX-LM does.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ._errors import InvalidArgumentError

__all__ = ["ExecutionPolicy", "apply_policy", "choose_policy"]

_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


@dataclass(frozen=True)
class ExecutionPolicy:
    device: str  # "cpu" or "gpu"
    dtype: str | None  # target dtype of floating parameters; None keeps the checkpoint's
    reason: str

    def describe(self) -> str:
        target = self.dtype or "checkpoint dtype"
        return f"device={self.device} params={target} ({self.reason})"


def choose_policy(dtype: str = "auto") -> ExecutionPolicy:
    """``auto`` picks per backend; an explicit dtype (or ``keep``) overrides it."""
    device = "gpu" if mx.default_device() == mx.gpu else "cpu"
    if dtype == "auto":
        if device == "cpu":
            return ExecutionPolicy(device, "float32", "CPU kernels are 20-40x faster in float32")
        return ExecutionPolicy(device, None, "GPU kernels run half precision natively")
    if dtype == "keep":
        return ExecutionPolicy(device, None, "requested")
    if dtype not in _DTYPES:
        raise InvalidArgumentError(f"dtype must be auto, keep, {', '.join(_DTYPES)}; got {dtype!r}")
    return ExecutionPolicy(device, dtype, "requested")


def apply_policy(model: nn.Module, policy: ExecutionPolicy) -> None:
    """Cast the model's floating parameters to the policy's dtype, in place."""
    if policy.dtype is None:
        return
    target = _DTYPES[policy.dtype]
    changed = [
        (name, value.astype(target))
        for name, value in tree_flatten(model.parameters())
        if mx.issubdtype(value.dtype, mx.floating) and value.dtype != target
    ]
    if changed:
        model.update(tree_unflatten(changed))
