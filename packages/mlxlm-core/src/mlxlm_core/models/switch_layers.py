"""Mixture-of-experts layers shared by the sparse architectures.

Every expert's projection is one slice of a stacked weight ``(num_experts, out, in)``; a
token's chosen experts are applied with ``mx.gather_mm`` (``mx.gather_qmm`` once quantized),
so no per-expert Python loop runs. Quantization is a module swap: :class:`SwitchLinear`
has ``to_quantized`` so ``nn.quantize`` turns it into :class:`QuantizedSwitchLinear`, the
same way it turns ``nn.Linear`` into ``nn.QuantizedLinear``.

Checkpoints store one tensor per expert (``...experts.3.gate_proj.weight``);
:func:`stack_experts` gathers them into the stacked ``...switch_mlp.gate_proj.weight``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace

from .._errors import CheckpointError, InvalidArgumentError

__all__ = [
    "QuantizedSwitchLinear",
    "SparseMoE",
    "SwitchGLU",
    "SwitchLinear",
    "shard_sparse_moe",
    "stack_experts",
]

# Default (group_size, bits) per quantization mode, as mx.quantize documents them.
_MODE_DEFAULTS: dict[str, tuple[int, int]] = {
    "affine": (64, 4),
    "mxfp4": (32, 4),
    "nvfp4": (16, 4),
    "mxfp8": (32, 8),
}

# Sorting tokens by expert makes the gathers contiguous; below this many (token, expert)
# pairs the sort costs more than it saves.
_SORT_THRESHOLD = 64


class SwitchLinear(nn.Module):
    """``num_experts`` linear layers in one ``(E, out, in)`` weight, picked per token."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, *, bias: bool = False):
        super().__init__()
        scale = input_dims**-0.5
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))
        if bias:
            self.bias = mx.zeros((num_experts, output_dims))

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    @property
    def output_dims(self) -> int:
        return self.weight.shape[1]

    def __call__(self, x: mx.array, indices: mx.array, *, sorted_indices: bool = False) -> mx.array:
        dtype, weight = x.dtype, self["weight"]
        if dtype != mx.float32 and mx.default_device() == mx.cpu:
            # MLX's CPU gather_mm only takes float32 (0.32); compute there, hand back `dtype`.
            x, weight = x.astype(mx.float32), weight.astype(mx.float32)
        y = mx.gather_mm(
            x, weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices
        )
        if "bias" in self:
            y = y + mx.expand_dims(self["bias"][indices], -2)
        return y.astype(dtype)

    def to_quantized(
        self,
        group_size: int | None = None,
        bits: int | None = None,
        mode: str = "affine",
        quantize_input: bool = False,
    ) -> QuantizedSwitchLinear:
        """The quantized twin of this layer (what ``nn.quantize`` calls)."""
        if quantize_input:
            raise InvalidArgumentError("expert layers do not support activation quantization")
        return QuantizedSwitchLinear.from_switch_linear(
            self, group_size=group_size, bits=bits, mode=mode
        )


class QuantizedSwitchLinear(nn.Module):
    """:class:`SwitchLinear` with packed weights (``weight``/``scales``/``biases``)."""

    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        num_experts: int,
        *,
        bias: bool = False,
        group_size: int | None = None,
        bits: int | None = None,
        mode: str = "affine",
    ):
        super().__init__()
        if mode not in _MODE_DEFAULTS:
            raise InvalidArgumentError(
                f"unknown quantization mode {mode!r} (known: {', '.join(_MODE_DEFAULTS)})"
            )
        default_group, default_bits = _MODE_DEFAULTS[mode]
        self.group_size = group_size or default_group
        self.bits = bits or default_bits
        self.mode = mode
        # Placeholder values of the right shapes; real ones come from a checkpoint or
        # from from_switch_linear().
        self._set_weight(mx.zeros((num_experts, output_dims, input_dims)))
        if bias:
            self.bias = mx.zeros((num_experts, output_dims))
        self.freeze()

    def _set_weight(self, weight: mx.array) -> None:
        packed, scales, *biases = mx.quantize(weight, self.group_size, self.bits, mode=self.mode)
        self.weight, self.scales = packed, scales
        if biases:
            self.biases = biases[0]

    @classmethod
    def from_switch_linear(
        cls,
        layer: SwitchLinear,
        *,
        group_size: int | None = None,
        bits: int | None = None,
        mode: str = "affine",
    ) -> QuantizedSwitchLinear:
        num_experts, output_dims, input_dims = layer.weight.shape
        out = cls(input_dims, output_dims, num_experts, group_size=group_size, bits=bits, mode=mode)
        out._set_weight(layer.weight)
        if "bias" in layer:
            out.bias = layer.bias
        out.freeze()
        return out

    def dequantized(self) -> SwitchLinear:
        """A float :class:`SwitchLinear` with these weights (for fusing or export)."""
        weight = mx.dequantize(
            self["weight"],
            self["scales"],
            self.get("biases"),
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        )
        num_experts, output_dims, input_dims = weight.shape
        out = SwitchLinear(input_dims, output_dims, num_experts, bias="bias" in self)
        out.weight = weight
        if "bias" in self:
            out.bias = self.bias
        return out

    def __call__(self, x: mx.array, indices: mx.array, *, sorted_indices: bool = False) -> mx.array:
        y = mx.gather_qmm(
            x,
            self["weight"],
            self["scales"],
            self.get("biases"),
            rhs_indices=indices,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            sorted_indices=sorted_indices,
        )
        if "bias" in self:
            y = y + mx.expand_dims(self["bias"][indices], -2)
        return y


class SwitchGLU(nn.Module):
    """SwiGLU experts: ``down(silu(gate(x)) * up(x))`` with each token's chosen experts."""

    def __init__(self, input_dims: int, hidden_dims: int, num_experts: int, *, bias: bool = False):
        super().__init__()
        self.gate_proj = SwitchLinear(input_dims, hidden_dims, num_experts, bias=bias)
        self.up_proj = SwitchLinear(input_dims, hidden_dims, num_experts, bias=bias)
        self.down_proj = SwitchLinear(hidden_dims, input_dims, num_experts, bias=bias)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """``x``: ``(..., dim)``, ``indices``: ``(..., k)`` -> ``(..., k, dim)``."""
        indices = mx.stop_gradient(indices)
        # (..., 1, 1, dim): one row vector per token, broadcast against its k experts.
        x = mx.expand_dims(x, (-2, -3))
        do_sort = indices.size >= _SORT_THRESHOLD
        idx, restore = indices, None
        if do_sort:
            k = indices.shape[-1]
            flat = indices.flatten()
            order = mx.argsort(flat)
            restore = mx.argsort(order)
            x = x.flatten(0, -3)[order // k]  # one row per (token, expert) pair, by expert
            idx = flat[order]
        h = nn.silu(self.gate_proj(x, idx, sorted_indices=do_sort)) * self.up_proj(
            x, idx, sorted_indices=do_sort
        )
        y = self.down_proj(h, idx, sorted_indices=do_sort)
        if restore is not None:
            y = mx.unflatten(y[restore], 0, indices.shape)
        return y.squeeze(-2)


class SparseMoE(nn.Module):
    """Router (``gate``) + experts (``switch_mlp``): softmax, top-k, weighted sum.

    ``normalize_top_k`` rescales the k kept probabilities to sum to one (Mixtral always
    does; Qwen3-MoE when ``norm_topk_prob``). Routing runs in float32 so low-precision
    weights do not flip which experts are chosen.
    """

    def __init__(
        self, dim: int, hidden: int, num_experts: int, *, top_k: int, normalize_top_k: bool
    ):
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise InvalidArgumentError(f"top_k={top_k} must be in 1..{num_experts}")
        self.top_k = top_k
        self.normalize_top_k = normalize_top_k
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.switch_mlp = SwitchGLU(dim, hidden, num_experts)
        self.group: mx.distributed.Group | None = None  # set by shard_sparse_moe()

    def __call__(self, x: mx.array) -> mx.array:
        probs = mx.softmax(self.gate(x).astype(mx.float32), axis=-1, precise=True)
        k = self.top_k
        indices = mx.stop_gradient(mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k])
        scores = mx.take_along_axis(probs, indices, axis=-1)
        if self.normalize_top_k:
            scores = scores / scores.sum(axis=-1, keepdims=True)
        y = self.switch_mlp(x, indices)
        y = (y * scores[..., None].astype(y.dtype)).sum(axis=-2)
        if self.group is not None:
            y = mx.distributed.all_sum(y, group=self.group)
        return y


def shard_sparse_moe(moe: SparseMoE, group: mx.distributed.Group) -> None:
    """Give each rank a slice of every expert's hidden dimension; the router is replicated.

    gate/up are split by output rows and down by input columns, so each rank's output is a
    partial sum that one all-reduce at the end of :meth:`SparseMoE.__call__` completes.
    """
    hidden = moe.switch_mlp.gate_proj.output_dims
    if hidden % group.size():
        raise InvalidArgumentError(
            f"expert hidden size {hidden} cannot be split over {group.size()} ranks"
        )
    shard_inplace(moe.switch_mlp.gate_proj, "all-to-sharded", group=group)
    shard_inplace(moe.switch_mlp.up_proj, "all-to-sharded", group=group)
    shard_inplace(moe.switch_mlp.down_proj, "sharded-to-all", group=group)
    moe.group = group


_PER_EXPERT = re.compile(
    r"^(?P<block>.+)\.experts\.(?P<expert>\d+)\.(?P<proj>[^.]+)\.(?P<leaf>[^.]+)$"
)
_FUSED = re.compile(r"^(?P<block>.+)\.experts\.(?P<proj>gate_up_proj|down_proj)$")


def stack_experts(
    weights: dict[str, mx.array],
    *,
    num_experts: int,
    renames: Mapping[str, str] | None = None,
) -> dict[str, mx.array]:
    """Stack per-expert tensors into ``<block>.switch_mlp.<proj>.<leaf>`` of shape (E, ...).

    ``renames`` maps checkpoint projection names to ours (Mixtral's ``w1`` -> ``gate_proj``).
    Also accepts the fused layout transformers 5 uses in memory
    (``<block>.experts.gate_up_proj`` of shape (E, 2*hidden, dim)). A block missing some of
    its experts is a broken checkpoint, reported as such.
    """
    renames = renames or {}
    groups: dict[tuple[str, str, str], dict[int, mx.array]] = {}
    out: dict[str, mx.array] = {}
    for key, value in weights.items():
        if match := _PER_EXPERT.match(key):
            slot = (match["block"], renames.get(match["proj"], match["proj"]), match["leaf"])
            groups.setdefault(slot, {})[int(match["expert"])] = value
        elif match := _FUSED.match(key):
            block = f"{match['block']}.switch_mlp"
            if match["proj"] == "down_proj":
                out[f"{block}.down_proj.weight"] = value
            else:
                gate, up = mx.split(value, 2, axis=1)
                out[f"{block}.gate_proj.weight"], out[f"{block}.up_proj.weight"] = gate, up
        else:
            out[key] = value
    for (block, proj, leaf), experts in groups.items():
        if sorted(experts) != list(range(num_experts)):
            raise CheckpointError(
                f"{block}: expected experts 0..{num_experts - 1} for {proj}.{leaf}, "
                f"found {len(experts)}"
            )
        out[f"{block}.switch_mlp.{proj}.{leaf}"] = mx.stack(
            [experts[e] for e in range(num_experts)]
        )
    return out
