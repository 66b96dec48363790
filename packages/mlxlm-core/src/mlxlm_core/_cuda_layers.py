"""Fused one-row decoding for llama-style blocks on CUDA (see :mod:`._cuda_kernels`).

A pre-norm block with separate q/k/v projections and a SwiGLU MLP, in bfloat16/float16 or
4-bit (MLX's affine packing, as ``nn.QuantizedLinear`` holds it), runs as 4 launches of ours
plus MLX's attention, instead of ~25 MLX operations:

    q, k, v = rope(rms_norm(x) @ [Wq, Wk, Wv].T)     one launch, norm and rotary fused; k and
                                                      v written into the cache in place
    h       = x + attention(q, k, v) @ Wo.T           residual fused
    g       = silu(rms_norm(h) @ Wg.T) * (.. @ Wu.T)  one launch, norm fused
    out     = h + g @ Wd.T                            residual fused

The launches before and after attention are each one ``mx.compile``d function, so their
Python wrappers run only when traced. Only one-row inputs take this path (decoding a batch
of one); prompts and larger batches run the block's own code (MLX's matmuls suit them).

Eligible blocks are switched in place to a subclass (same object, same parameters), as
:mod:`._policy_layers` does for quantized layers. A block qualifies only if it is exactly the
llama block (no subclass that may compute something else), with projections that are all
plain ``nn.Linear`` or all 4-bit ``nn.QuantizedLinear`` without bias, ``nn.RMSNorm`` norms,
a SwiGLU MLP and a stateless rope; what a call sees is re-checked whenever a module or weight
changed (adapters can wrap a projection after loading).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from . import _cuda_kernels as ck
from .cache import KVCache
from .models import llama
from .models.base import attention, rope_offset
from .models.rope import Rope

__all__ = [
    "DEFAULT_TUNINGS",
    "FusedDecoderLayer",
    "FusedQuantizedEmbedding",
    "FusedQuantizedLinear",
    "Tunings",
    "convert_decode_layers",
    "eligible",
]

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_DENSE = ("weight",)
_PACKED = ("weight", "scales", "biases")


def _format(module: Any) -> tuple[int, ...] | None:
    """``()`` for a plain bias-free linear, ``(group_size,)`` for a 4-bit one, else None."""
    if "bias" in module:
        return None
    if type(module) is nn.Linear:
        return ()
    if (
        type(module) is nn.QuantizedLinear
        and module.bits == 4
        and getattr(module, "mode", "affine") == "affine"
        and module.get("biases") is not None
        and module.group_size in ck.Q4_GROUPS
    ):
        return (module.group_size,)
    return None


def _projection_format(modules: Sequence[Any]) -> tuple[int, ...] | None:
    """The one format every projection shares, else None."""
    formats = {_format(m) for m in modules}
    return formats.pop() if len(formats) == 1 and None not in formats else None


def eligible(layer: nn.Module) -> bool:
    """Whether ``layer`` is a block whose computation the fused path reproduces."""
    if type(layer) not in (llama.DecoderLayer, FusedDecoderLayer):
        return False
    attn, mlp = layer.get("self_attn"), layer.get("mlp")
    if type(attn) is not llama.Attention or type(mlp) is not llama.MLP:
        return False
    if "q_norm" in attn or getattr(attn, "softcap", None) is not None:
        return False
    rope = attn.get("rope")
    if type(rope) is not Rope or rope.dims != attn.head_dim or rope.input_scale != 1.0:
        return False  # other ropes keep state between calls (dynamic NTK) or scale inputs
    norms = (layer.get("input_layernorm"), layer.get("post_attention_layernorm"))
    if not all(type(n) is nn.RMSNorm for n in norms):
        return False
    projections = [attn.get(n) for n in _ATTN] + [mlp.get(n) for n in _MLP]
    return _projection_format(projections) is not None


# Device times on an H200 (ncu, tools/cuda_lab.py sweepncu): 8 warps, two rows each, the
# dot products split over 4 warps won for every dense shape but gate/up, which reads two
# matrices. ``ksplit`` is lowered automatically where K has fewer steps (4-bit weights).
_SPLIT = ck.Tuning(warps=8, rows_per_warp=2, ksplit=4)
_GATE_UP = ck.Tuning(warps=4, rows_per_warp=1)
# 4-bit (a step covers 1024 features, so K = 2048 has only two): four rows per warp share
# the activation work; on an H100 (ncu) gate/up went 48 -> 21 us, down 16 -> 12.5 us.
_Q4_QKV = ck.Tuning(warps=8, rows_per_warp=2, unroll=2, ksplit=2)  # rotary pairs: two rows
_Q4_WIDE = ck.Tuning(warps=8, rows_per_warp=4, unroll=2, ksplit=2)
_Q4_DOWN = ck.Tuning(warps=8, rows_per_warp=4, unroll=2, ksplit=4)


@dataclass(frozen=True)
class Tunings:
    """Launch shapes per projection (see :class:`._cuda_kernels.Tuning`)."""

    qkv: ck.Tuning = _SPLIT  # two rows per warp: the rotary epilogue needs both of a pair
    o: ck.Tuning = _SPLIT
    gate_up: ck.Tuning = _GATE_UP
    down: ck.Tuning = _SPLIT
    q4_qkv: ck.Tuning = _Q4_QKV
    q4_o: ck.Tuning = _Q4_WIDE
    q4_gate_up: ck.Tuning = _Q4_WIDE
    q4_down: ck.Tuning = _Q4_DOWN

    def for_format(self, fmt: tuple[int, ...]) -> tuple[ck.Tuning, ck.Tuning, ck.Tuning, ck.Tuning]:
        """(qkv, o, gate/up, down) for dense (``()``) or 4-bit projections."""
        if fmt:
            return self.q4_qkv, self.q4_o, self.q4_gate_up, self.q4_down
        return self.qkv, self.o, self.gate_up, self.down


DEFAULT_TUNINGS = Tunings()

# Small arrays are a trap for a kernel that reads them: MLX's CUDA allocator puts arrays of
# up to 8 bytes in one shared managed-memory pool that the host writes whenever it makes a
# scalar, so a kernel reading the rope position from there paid a page migration, ~17 us,
# at every launch (ncu, H200 and H100). Position and periods therefore live in arrays of
# more than 8 bytes, written on the device.
_SIDE = 16  # elements of the position buffer
_positions = threading.local()  # per thread: the last rope position, its buffer, and ones
_period_buffers: dict[tuple, mx.array] = {}


def _offset_array(offset: int | mx.array) -> mx.array:
    """The rope position as an int32 buffer (element 0 is read), made on the device.

    An array enters the compiled functions (a Python int would retrace them every step),
    derived on the GPU from the previous step's (``+ 1``) without a host-written operand.
    """
    if isinstance(offset, mx.array):
        return mx.tile(offset.reshape(-1)[:1].astype(mx.int32), (_SIDE,))
    last = getattr(_positions, "last", None)
    if last is not None and last[0] == offset:
        return last[1]
    if last is not None and last[0] + 1 == offset:
        array = last[1] + _positions.ones
    else:
        array = mx.full((_SIDE,), offset, dtype=mx.int32)
        if getattr(_positions, "ones", None) is None:
            _positions.ones = mx.ones((_SIDE,), dtype=mx.int32)
    _positions.last = (offset, array)
    return array


def _periods(rope: Rope) -> mx.array:
    """Per pair, the position divisor of its angle (what ``mx.fast.rope`` uses), in a buffer
    shared by every layer with the same table."""
    freqs = getattr(rope, "_freqs", None)
    if freqs is not None:
        periods = freqs.astype(mx.float32)
    else:
        assert rope.base is not None
        periods = rope.base ** (mx.arange(0, rope.dims, 2, dtype=mx.float32) / rope.dims)
    key = tuple(periods.tolist())  # evaluated on the device: never written by the host
    return _period_buffers.setdefault(key, periods)


@dataclass(frozen=True)
class _Parts:
    fmt: tuple[int, ...]  # the projections' format the functions were built for
    before: Any  # (x, norm, q/k/v arrays..., offset) -> roped q, k and v, (1, heads, 1, D)
    # (x, norm, q/k/v arrays..., offset, keys, values) -> roped q; k and v are written into
    # the cache buffers at slot offset[0] (returns the 1-tuple (q,))
    before_in_place: Any
    after: Any  # (attention out, x, norm, o/gate/up/down arrays...) -> the block's output


def _in_place_slot(cache: Any, x: mx.array, attn: Any) -> bool:
    """Whether the q/k/v launch can write this step's keys and values into ``cache`` itself.

    A plain batch-1 cache whose slot is the rope position (no padding, nothing dropped), in
    ``x``'s dtype: then two slice updates per layer leave the step (see
    ``KVCache.append_in_place``).
    """
    if type(cache) is not KVCache or cache.length != cache.offset or cache.batch_size != 1:
        return False
    keys = cache.keys
    return (
        isinstance(keys, mx.array)
        and isinstance(cache.values, mx.array)
        and keys.dtype == x.dtype
        and keys.shape[1] == attn.n_kv_heads
        and keys.shape[3] == attn.head_dim
        and not isinstance(cache.positions(), mx.array)
    )


class FusedDecoderLayer(llama.DecoderLayer):
    """``llama.DecoderLayer`` whose one-row calls run the fused kernels."""

    _tunings: Tunings = DEFAULT_TUNINGS
    _compiled: _Parts | None = None
    _checked: tuple = ()  # (key, format or None) of the last eligibility check

    def _check(self, x: mx.array, modules: Sequence[Any]) -> tuple[int, ...] | None:
        """The projections' format if the kernels can run this block on ``x``, else None."""
        attn = self["self_attn"]
        rope = attn.get("rope")
        if type(rope) is not Rope or rope.dims != attn.head_dim or rope.input_scale != 1.0:
            return None
        if not all(type(n) is nn.RMSNorm for n in modules[7:]):
            return None
        fmt = _projection_format(modules[:7])
        if fmt is None:
            return None  # e.g. an adapter wraps a projection
        weights = [_weight(m, fmt) for m in modules[:7]]
        if not ck.supported(x, *weights[:3]) or not ck.supported(x, *weights[4:6]):
            return None
        heads = attn.n_heads * attn.head_dim
        if not ck.supported(mx.zeros((heads,), x.dtype), weights[3]):
            return None
        if not ck.supported(mx.zeros((weights[6].shape[1],), x.dtype), weights[6]):
            return None
        per_warp = [t.rows_per_warp for t in self._tunings.for_format(fmt)]
        needs = [per_warp[0]] * 3 + [per_warp[1], per_warp[2], per_warp[2], per_warp[3]]
        if any(w.shape[0] % n for w, n in zip(weights, needs, strict=True)):
            return None
        if not all(n["weight"].dtype == x.dtype for n in modules[7:]):
            return None
        return fmt

    def _functions(self, fmt: tuple[int, ...]) -> _Parts:
        if self._compiled is None or self._compiled.fmt != fmt:
            # object.__setattr__: an nn.Module would file a container value as a child.
            object.__setattr__(self, "_compiled", _compile_parts(self, fmt, self._tunings))
        return self._compiled  # type: ignore[return-value]

    def __call__(self, x: mx.array, mask: Any, cache: Any) -> mx.array:
        if x.size != x.shape[-1] or (x.dtype != mx.bfloat16 and x.dtype != mx.float16):
            # One row only: the rotary epilogue and the output layouts assume it.
            return super().__call__(x, mask, cache)
        attn, mlp = self["self_attn"], self["mlp"]
        modules = (
            attn["q_proj"],
            attn["k_proj"],
            attn["v_proj"],
            attn["o_proj"],
            mlp["gate_proj"],
            mlp["up_proj"],
            mlp["down_proj"],
            self["input_layernorm"],
            self["post_attention_layernorm"],
        )
        names = _PACKED if "scales" in modules[0] else _DENSE
        arrays = [m.get(name) for m in modules[:7] for name in names]
        norms = [modules[7].get("weight"), modules[8].get("weight")]
        # The full check runs only when a module, an array or the input's type changed: it
        # costs ~10% of a step's host time, and the step is bound by host time.
        key = (x.shape, x.dtype, *map(id, modules), *map(id, arrays), *map(id, norms))
        if not self._checked or self._checked[0] != key:
            object.__setattr__(self, "_checked", (key, self._check(x, modules)))
        fmt = self._checked[1]
        if fmt is None:
            return super().__call__(x, mask, cache)
        parts = self._functions(fmt)
        per = len(names)
        offset = _offset_array(rope_offset(cache))
        if mask is None and _in_place_slot(cache, x, attn):
            keys, values, slot = cache.append_in_place(1)
            (q,) = parts.before_in_place(x, norms[0], *arrays[: 3 * per], offset, keys, values)
            # Attention takes q, so MLX orders it after the launch that wrote the slot.
            k, v = keys[..., : slot + 1, :], values[..., : slot + 1, :]
            out = attention(q, k, v, cache=None, scale=attn.scale, mask=None)
        else:
            q, k, v = parts.before(x, norms[0], *arrays[: 3 * per], offset)
            if cache is not None:
                k, v = cache.update_and_fetch(k, v)
            out = attention(q, k, v, cache=cache, scale=attn.scale, mask=mask)
        return parts.after(out, x, norms[1], *arrays[3 * per :])


def _weight(module: Any, fmt: tuple[int, ...]) -> ck.Weight:
    if not fmt:
        return module["weight"]
    return ck.Q4(module["weight"], module["scales"], module["biases"], fmt[0])


def _compile_parts(layer: FusedDecoderLayer, fmt: tuple[int, ...], tunings: Tunings) -> _Parts:
    attn = layer["self_attn"]
    rope = attn["rope"]
    heads, kv_heads, dim = attn.n_heads, attn.n_kv_heads, attn.head_dim
    eps1, eps2 = layer["input_layernorm"].eps, layer["post_attention_layernorm"].eps
    periods = _periods(rope)
    shapes = [(1, heads, 1, dim), (1, kv_heads, 1, dim), (1, kv_heads, 1, dim)]
    t_qkv, t_o, t_gate_up, t_down = tunings.for_format(fmt)

    def weights(arrays: Sequence[mx.array]) -> list[ck.Weight]:
        if not fmt:
            return list(arrays)
        return [
            ck.Q4(arrays[i], arrays[i + 1], arrays[i + 2], fmt[0]) for i in range(0, len(arrays), 3)
        ]

    def qkv(in_place: bool) -> Any:
        """The q/k/v launch; ``in_place``: its last two inputs are the cache buffers that
        take k and v, and only q is returned."""

        def launch(x, norm, *rest):
            cache = (rest[-2], rest[-1]) if in_place else None
            *arrays, offset = rest[:-2] if in_place else rest
            rotary = ck.Rotary(periods, offset, dim, scale=rope.scale, traditional=rope.traditional)
            kw = dict(norm=norm, eps=eps1, rope=rotary, shapes=shapes, tune=t_qkv, cache=cache)
            return tuple(ck.multi_linear(x, weights(arrays), **kw))

        return mx.compile(launch)

    def after(out, x, norm, *arrays):
        wo, wg, wu, wd = weights(arrays)
        # ``out`` is (1, heads, 1, head_dim): for one row, the same memory as (1, 1, hidden).
        h = ck.linear(out, wo, residual=x, tune=t_o)
        g = ck.swiglu(h, wg, wu, norm=norm, eps=eps2, tune=t_gate_up)
        return ck.linear(g, wd, residual=h, tune=t_down)

    return _Parts(fmt, qkv(in_place=False), qkv(in_place=True), mx.compile(after))


_HEAD_TUNING = ck.Tuning(warps=8, rows_per_warp=4, unroll=2, ksplit=2)


def _q4_head(module: Any, x: mx.array) -> Any:
    """A compiled one-row 4-bit output projection for ``module``, or None if it cannot run."""
    if x.size != x.shape[-1] or module.bits != 4 or getattr(module, "mode", "affine") != "affine":
        return None
    weight = ck.Q4(module["weight"], module["scales"], module.get("biases"), module.group_size)
    if weight.biases is None or not ck.supported(x, weight) or weight.shape[0] % 4:
        return None
    fn = getattr(module, "_fused_head", None)
    if fn is None:
        group = module.group_size

        def head(x, w, s, b):
            return ck.linear(x, ck.Q4(w, s, b, group), tune=_HEAD_TUNING)

        fn = mx.compile(head)
        object.__setattr__(module, "_fused_head", fn)
    return fn


class FusedQuantizedEmbedding(nn.QuantizedEmbedding):
    """A 4-bit tied output projection (``as_linear``) in one of our launches for one row.

    MLX's quantized matrix-vector kernel made the step's CUDA graph one that cannot be
    updated in place (re-instantiated every step, a host cost that grows with the graph),
    and streamed the 131 MB Llama-3.2-1B head at ~0.9 TB/s.
    """

    def as_linear(self, x: mx.array) -> mx.array:
        fn = _q4_head(self, x)
        if fn is None:
            return super().as_linear(x)
        return fn(x, self["weight"], self["scales"], self["biases"])


class FusedQuantizedLinear(nn.QuantizedLinear):
    """The same for an untied 4-bit ``lm_head``."""

    def __call__(self, x: mx.array) -> mx.array:
        fn = None if "bias" in self else _q4_head(self, x)
        if fn is None:
            return super().__call__(x)
        return fn(x, self["weight"], self["scales"], self["biases"])


def _convert_heads(model: nn.Module, enabled: bool) -> None:
    """Quantized embeddings (their ``as_linear`` is a tied head) and a top-level ``lm_head``."""
    heads = [
        m for m in model.modules() if type(m) in (nn.QuantizedEmbedding, FusedQuantizedEmbedding)
    ]
    lm_head = model.get("lm_head") if isinstance(model, dict) else None
    if type(lm_head) in (nn.QuantizedLinear, FusedQuantizedLinear):
        heads.append(lm_head)
    for module in heads:
        if enabled:
            fused = (
                FusedQuantizedEmbedding
                if isinstance(module, nn.QuantizedEmbedding)
                else FusedQuantizedLinear
            )
            module.__class__ = fused
        else:
            base = (
                nn.QuantizedEmbedding
                if isinstance(module, nn.QuantizedEmbedding)
                else nn.QuantizedLinear
            )
            module.__class__ = base


def convert_decode_layers(
    model: nn.Module,
    *,
    enabled: bool,
    tunings: Tunings | None = None,
) -> int:
    """Switch eligible blocks to the fused path (or back when not ``enabled``); returns how many.

    With at least one fused block, a 4-bit output projection is switched too.
    """
    count = 0
    for module in model.modules():
        if type(module) is FusedDecoderLayer and not enabled:
            module.__class__ = llama.DecoderLayer  # type: ignore[assignment]
        elif enabled and eligible(module):
            module.__class__ = FusedDecoderLayer  # type: ignore[assignment]
            object.__setattr__(module, "_compiled", None)
            object.__setattr__(module, "_checked", ())
            if tunings is not None:
                module._tunings = tunings
            count += 1
    _convert_heads(model, enabled and count > 0)
    return count
