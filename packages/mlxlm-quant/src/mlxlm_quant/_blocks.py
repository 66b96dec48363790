"""Architecture-agnostic access to a model's blocks and to what flows into its layers.

The learned quantizers never consult per-family tables. They rely only on the model
contract (``model.layers`` is the list of blocks, each called with the residual stream as
its first argument) and discover the rest by hooking the module tree: a :class:`Recorder`
temporarily replaces a leaf layer, sees its input and output, and passes the call through.

Blocks run one at a time: :func:`block_inputs` stops the model at its first block to
collect the hidden states there, and :func:`block_extras` records, from one short probe,
what else each block is called with (its attention mask, which may be a sliding window
for some layers, and ``cache=None``), so a block can be replayed on any hidden state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

__all__ = [
    "Recorder",
    "block_extras",
    "block_inputs",
    "feed_block",
    "hooked",
    "run_block",
]

Callback = Callable[[str, mx.array, Any], None]


class _Stop(Exception):
    """Raised by a catcher to cut a forward pass short."""


class Recorder(nn.Module):
    """Stands in for a leaf layer: calls it, then reports ``(path, input, output)``.

    With ``before``, it reports ``(path, input, None)`` first and then calls the layer, so
    the callback may change the layer's weights for this very call (GPTQ in one pass).
    """

    def __init__(self, path: str, module: nn.Module, callback: Callback, *, before: bool = False):
        super().__init__()
        self._path = path
        self._callback = callback
        self._before = before
        self.inner = module

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        if self._before:
            self._callback(self._path, x, None)
            return self.inner(x, *args, **kwargs)
        y = self.inner(x, *args, **kwargs)
        self._callback(self._path, x, y)
        return y

    def as_linear(self, x: mx.array) -> mx.array:
        # A tied embedding used as the output head.
        if self._before:
            self._callback(self._path + "#as_linear", x, None)
            return self.inner.as_linear(x)
        y = self.inner.as_linear(x)
        self._callback(self._path + "#as_linear", x, y)
        return y


@contextmanager
def hooked(
    root: nn.Module, paths: Sequence[str], callback: Callback, *, before: bool = False
) -> Iterator[None]:
    """Within the block, calls of the leaves at ``paths`` (relative to ``root``) report."""
    modules = dict(root.named_modules())
    originals = [(p, modules[p]) for p in paths]
    root.update_modules(
        tree_unflatten([(p, Recorder(p, m, callback, before=before)) for p, m in originals])
    )
    try:
        yield
    finally:
        root.update_modules(tree_unflatten(originals))


def block_inputs(model: nn.Module, tokens: mx.array, *, batch_size: int) -> list[mx.array]:
    """The hidden states entering the first block, one array per batch of ``tokens``."""
    blocks = model.layers
    first = blocks[0]
    caught: list[mx.array] = []

    class Catcher(nn.Module):
        def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
            caught.append(x)
            raise _Stop

    blocks[0] = Catcher()
    try:
        for start in range(0, tokens.shape[0], batch_size):
            with suppress(_Stop):
                model(tokens[start : start + batch_size])
            mx.eval(caught[-1])
    finally:
        blocks[0] = first
    return caught


def block_extras(model: nn.Module, length: int) -> list[tuple[tuple, dict]]:
    """What each block is called with besides the hidden state, for inputs of ``length``."""
    blocks = model.layers
    extras: list[tuple[tuple, dict]] = []
    originals = list(blocks)

    class Spy(nn.Module):
        def __init__(self, block: nn.Module):
            super().__init__()
            self.block = block

        def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
            extras.append((args, kwargs))
            if len(extras) == len(originals):
                raise _Stop
            return x  # the values do not matter, only the call signature

    for i, block in enumerate(originals):
        blocks[i] = Spy(block)
    try:
        model(mx.zeros((1, length), dtype=mx.int32))
    except _Stop:
        pass
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    if len(extras) != len(originals):
        raise RuntimeError("the model did not call each of its blocks once")
    return extras


def run_block(
    block: nn.Module, hidden: Sequence[mx.array], extra: tuple[tuple, dict]
) -> list[mx.array]:
    """``block`` applied to each hidden batch, evaluated batch by batch to bound memory."""
    args, kwargs = extra
    out = []
    for h in hidden:
        y = block(h, *args, **kwargs)
        mx.eval(y)
        out.append(y)
    return out


def feed_block(block: nn.Module, hidden: Sequence[mx.array], extra: tuple[tuple, dict]) -> None:
    """Call ``block`` on each hidden batch for its hooks only: the output is never evaluated.

    MLX is lazy, so what no hook evaluates (the last layer's product, the residual add) is
    never computed; a pass that only gathers input statistics skips that work.
    """
    args, kwargs = extra
    for h in hidden:
        block(h, *args, **kwargs)


def linear_paths(block: nn.Module) -> list[str]:
    """Paths (relative to ``block``) of its layers with a 2-D or expert weight to quantize."""
    return [
        p
        for p, m in block.named_modules()
        if hasattr(m, "to_quantized") and getattr(m, "weight", None) is not None and p
    ]


def tail_calls(
    model: nn.Module,
    hidden: Sequence[mx.array],
    tokens: mx.array,
    *,
    batch_size: int,
    callback: Callback,
) -> None:
    """Run the model past its blocks on ``hidden`` (the last block's outputs), reporting
    the calls of every quantizable layer outside the blocks (head, tied embedding)."""
    blocks = model.layers
    inside = {id(m) for b in blocks for _, m in b.named_modules()}
    outside = [
        p
        for p, m in model.named_modules()
        if hasattr(m, "to_quantized") and id(m) not in inside and p
    ]
    if not outside:
        return
    replay = iter(hidden)

    class Replay(nn.Module):
        def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
            return next(replay)

    class Skip(nn.Module):
        def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
            return x

    originals = list(blocks)
    blocks[0] = Replay()
    for i in range(1, len(originals)):
        blocks[i] = Skip()
    try:
        with hooked(model, outside, callback):
            for start in range(0, tokens.shape[0], batch_size):
                # Not evaluated: the callback evaluates what it needs from the inputs, and
                # the logits (a vocabulary-wide product per token) are never computed.
                model(tokens[start : start + batch_size])
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block


class InputStats:
    """A :class:`Recorder` callback summing, per distinct input, ``X^T X`` and ``sum |x|``.

    Layers fed the same array (q/k/v, gate/up) share one entry: ``owner[path]`` names the
    layer whose statistics ``path`` uses. Both learned quantizers need only these sums, so
    no activation is kept and any amount of calibration data fits in memory.
    """

    def __init__(self) -> None:
        self.h: dict[str, mx.array] = {}
        self.abs_sum: dict[str, mx.array] = {}
        self.count: dict[str, int] = {}
        self.owner: dict[str, str] = {}
        self._last: tuple[mx.array, str] | None = None

    def __call__(self, path: str, x: mx.array, y: mx.array) -> None:
        if not mx.issubdtype(x.dtype, mx.floating):
            return  # an embedding lookup: its input is token ids, not activations
        if self._last is not None and self._last[0] is x:
            self.owner.setdefault(path, self._last[1])
            return
        owner = self.owner.setdefault(path, path)
        xf = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        xtx, absx = xf.T @ xf, mx.abs(xf).sum(axis=0)
        if owner in self.h:
            xtx, absx = self.h[owner] + xtx, self.abs_sum[owner] + absx
        self.h[owner], self.abs_sum[owner] = xtx, absx
        self.count[owner] = self.count.get(owner, 0) + xf.shape[0]
        mx.eval(xtx, absx)
        self._last = (x, owner)

    def for_layer(self, path: str) -> tuple[mx.array, mx.array]:
        """``(X^T X, mean |x| per channel)`` of the input ``path`` was fed."""
        owner = self.owner[path]
        return self.h[owner], self.abs_sum[owner] / self.count[owner]
