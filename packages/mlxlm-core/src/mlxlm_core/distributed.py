"""Running one model over several processes with MLX's own distributed engine.

Two strategies, chosen per run (``--shard tensor|pipeline``):

- **tensor**: every rank holds a slice of every block (whole KV groups of heads, a slice of
  the MLP) and the ranks sum partial outputs twice per block (``Model.shard``). Every rank
  ends with the full logits.
- **pipeline**: rank ``r`` holds a contiguous range of blocks; activations go from rank to
  rank with ``send``/``recv`` and the last rank's logits are shared with an ``all_sum``.
  Works for any architecture whose blocks are called in sequence as ``layer(h, mask, cache)``.

Processes are started by ``mlx.launch`` (or anything that sets MLX's ring/MPI/NCCL
variables); :func:`world` joins them. Weights are loaded lazily and sharded before they are
evaluated, so a rank reads whole tensors one at a time but keeps only its part. Sampling
is identical on every rank (same logits, same seed: :func:`agree_seed`), so all ranks step
the same engine and only rank 0 prints or serves. A rank that dies makes the collective
operations fail on the others; :func:`peer_failures` turns that into one clear error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ._errors import InvalidArgumentError, MlxlmError
from ._mx_typed import item_int
from .cache import KVCache, QuantizedKVCache
from .models.sharding import split_ranges

__all__ = [
    "STRATEGIES",
    "PeerLostError",
    "agree_seed",
    "is_primary",
    "load_sharded",
    "peer_failures",
    "pipeline",
    "shard_model",
    "world",
]

STRATEGIES = ("tensor", "pipeline")


class PeerLostError(MlxlmError):
    """Another rank stopped answering (it exited or crashed)."""


def world(backend: str = "any") -> mx.distributed.Group | None:
    """The group of all launched processes, or None when running alone."""
    if not mx.distributed.is_available():
        return None
    group = mx.distributed.init(backend=backend)
    return group if group.size() > 1 else None


def is_primary(group: mx.distributed.Group | None) -> bool:
    return group is None or group.rank() == 0


def agree_seed(group: mx.distributed.Group | None, seed: int | None) -> int:
    """One seed for every rank: the given one, or rank 0's random choice shared by all_sum."""
    if seed is not None or group is None:
        chosen = seed if seed is not None else item_int(mx.random.randint(0, 2**31 - 1, ()))
    else:
        mine = mx.random.randint(0, 2**31 - 1, ()) if group.rank() == 0 else mx.array(0)
        chosen = item_int(mx.distributed.all_sum(mine, group=group))
    mx.random.seed(chosen)
    return chosen


@contextlib.contextmanager
def peer_failures() -> Iterator[None]:
    """Turn a collective that failed because a peer vanished into :class:`PeerLostError`."""
    try:
        yield
    except RuntimeError as exc:
        text = str(exc)
        if "peer" in text or "[ring]" in text or "[mpi]" in text or "nccl" in text.lower():
            raise PeerLostError(f"another rank stopped: {text.strip().splitlines()[0]}") from None
        raise


def shard_model(model: nn.Module, group: mx.distributed.Group, strategy: str) -> nn.Module:
    """Shard ``model`` in place for this rank of ``group``; returns it."""
    if strategy == "tensor":
        if not hasattr(model, "shard"):
            raise InvalidArgumentError(f"{type(model).__module__} cannot be tensor-sharded")
        model.shard(group)
    elif strategy == "pipeline":
        pipeline(model, group)
    else:
        raise InvalidArgumentError(f"--shard must be one of {', '.join(STRATEGIES)}")
    model.shard_strategy = strategy  # type: ignore[attr-defined]
    return model


def load_sharded(
    path_or_repo: Any, *, strategy: str, group: mx.distributed.Group, **load_options: Any
) -> tuple[nn.Module, Any]:
    """``load()`` for one rank: lazy weights, sharded, then only this rank's part evaluated."""
    from ._loading import load

    if load_options.get("adapter_path") is not None:
        raise InvalidArgumentError("adapters cannot be combined with --shard yet")
    model, tokenizer = load(path_or_repo, lazy=True, **load_options)
    shard_model(model, group, strategy)
    with peer_failures():
        mx.eval(model.parameters())
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# Pipeline parallelism


class _Skipped(nn.Module):
    """A block another rank runs: passes activations through, keeps cache positions.

    Its cache stores zero-width keys and values, so masks and positions stay right for the
    layers that do run here while this rank spends no memory on the block. Blocks are
    called as ``layer(h, mask, cache)``.
    """

    def __call__(self, x: mx.array, mask: Any = None, cache: KVCache | None = None) -> mx.array:
        if cache is not None:
            empty = mx.zeros((x.shape[0], 1, x.shape[1], 0), dtype=x.dtype)
            cache.update_and_fetch(empty, empty)
        return x


class _Receive(nn.Module):
    """This rank's first block: its input comes from the previous rank."""

    def __init__(self, block: nn.Module, source: int, group: mx.distributed.Group):
        super().__init__()
        self.block = block
        self.source = source
        self.group = group

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        x = mx.distributed.recv_like(x, self.source, group=self.group)
        return self.block(x, *args, **kwargs)


class _Send(nn.Module):
    """This rank's last block: its output goes on to the next rank.

    The send happens when its result is evaluated; ``sent`` keeps the latest one so a
    prefill (which evaluates only caches) can evaluate it too.
    """

    def __init__(self, block: nn.Module, target: int, group: mx.distributed.Group):
        super().__init__()
        self.block = block
        self.target = target
        self.group = group
        self._sent: list[mx.array] = []

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        out = mx.distributed.send(self.block(x, *args, **kwargs), self.target, group=self.group)
        self._sent = [out]
        return out


def pipeline_ranges(n_layers: int, size: int) -> list[tuple[int, int]]:
    """Contiguous block ranges, rank 0 first."""
    return split_ranges(n_layers, size)


def pipeline(model: nn.Module, group: mx.distributed.Group) -> None:
    """Keep this rank's contiguous range of blocks; the rest pass through.

    The model keeps its interface: calling it returns the last rank's logits on every rank.
    """
    layers = model.layers
    size, rank = group.size(), group.rank()
    start, stop = pipeline_ranges(len(layers), size)[rank]
    for i in range(len(layers)):
        if not start <= i < stop:
            layers[i] = _Skipped()
    if rank > 0:
        layers[start] = _Receive(layers[start], rank - 1, group)
    sender = None
    if rank < size - 1:
        sender = layers[stop - 1] = _Send(layers[stop - 1], rank + 1, group)
    last = rank == size - 1
    original_call = type(model).__call__

    # Route calls on this instance through the pipeline (the class itself stays untouched).
    class _Pipelined(type(model)):  # type: ignore[misc, valid-type]
        def __call__(self, inputs: mx.array, cache: Any = None, **kw: Any) -> mx.array:
            # A receive has no inputs, so nothing in the graph orders it after the previous
            # call's collectives: with two calls in one graph (a batch that merges admitted
            # rows builds a step on the tokens of a step not yet evaluated) the ranks could
            # pair different messages and hang. The inputs hold the previous step's tokens,
            # so evaluating them first finishes that step on every rank, in the same order.
            mx.eval(inputs)
            logits = original_call(self, inputs, cache=cache, **kw)
            # `* 0`, not zeros_like: the product keeps this rank's send in the graph.
            return mx.distributed.all_sum(logits if last else logits * 0, group=group)

        def make_cache(self, policy: Any, **kw: Any) -> list[KVCache]:
            caches = super().make_cache(policy, **kw)
            if any(isinstance(c, QuantizedKVCache) for c in caches):
                raise InvalidArgumentError("pipeline sharding does not support kv_bits")
            return caches

        def pending_outputs(self) -> list[mx.array]:
            """Arrays a prefill must evaluate besides the caches (this rank's send)."""
            return list(sender._sent) if sender is not None else []

    _Pipelined.__name__ = f"Pipelined{type(model).__name__}"
    model.__class__ = _Pipelined
