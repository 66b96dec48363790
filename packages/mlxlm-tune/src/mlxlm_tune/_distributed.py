"""Data-parallel training over MLX's own distributed group (``mlx.launch``).

Every rank holds the whole model and reads its own slice of every batch: the batch plan is
the single-process one (a pure function of seed and epoch), and rank ``r`` of ``n`` takes
rows ``r, r+n, r+2n, ...`` of each planned batch, so a global batch of ``B`` rows is ``B/n``
rows per rank and the union of the slices is exactly the one-process batch. Gradients are
*summed* token-weighted (each rank's gradient of its summed loss) and divided by the global
token count, which is the one-process step's arithmetic, not an average of per-rank means
(those would weight a short slice like a long one). Every rank then applies the same
update, so the weights stay identical without ever being sent after the start.

The sums travel in as few collectives as possible: arrays of one dtype are flattened into
one buffer (cut into chunks of at most ``CHUNK_BYTES``) and summed with ``all_sum``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from mlxlm_core import InvalidArgumentError
from mlxlm_core.distributed import is_primary, peer_failures, world

__all__ = [
    "CHUNK_BYTES",
    "Group",
    "broadcast_trainable",
    "check_batch_size",
    "is_primary",
    "part",
    "peer_failures",
    "sum_arrays",
    "sum_tree",
    "training_group",
]

Group = mx.distributed.Group
T = TypeVar("T")

#: Largest buffer one ``all_sum`` carries (MLX's own ``average_gradients`` uses 32 MiB).
CHUNK_BYTES = 32 << 20


def training_group() -> Group | None:
    """The processes started by ``mlx.launch`` (any backend), or None when running alone."""
    return world()


def part(group: Group | None) -> tuple[int, int] | None:
    """``(rank, size)`` of this process, or None when alone (what :class:`Batcher` takes)."""
    return None if group is None else (group.rank(), group.size())


def check_batch_size(batch_size: int, group: Group | None) -> None:
    """A global batch must split evenly, or one rank would idle on every step."""
    if group is not None and batch_size % group.size():
        raise InvalidArgumentError(
            f"batch_size {batch_size} does not split over {group.size()} ranks "
            f"(data-parallel training needs a multiple of {group.size()})"
        )


def sum_arrays(arrays: Sequence[mx.array], group: Group) -> list[mx.array]:
    """``all_sum`` of every array, packed into one flat buffer per dtype (chunked)."""
    out: list[mx.array | None] = [None] * len(arrays)
    by_dtype: dict[Any, list[int]] = {}
    for i, a in enumerate(arrays):
        by_dtype.setdefault(a.dtype, []).append(i)
    for indices in by_dtype.values():
        chunk: list[int] = []
        size = 0
        for i in indices:
            nbytes = arrays[i].nbytes
            if chunk and size + nbytes > CHUNK_BYTES:
                _sum_chunk(arrays, chunk, out, group)
                chunk, size = [], 0
            chunk.append(i)
            size += nbytes
        if chunk:
            _sum_chunk(arrays, chunk, out, group)
    assert all(a is not None for a in out)
    return out  # type: ignore[return-value]


def _sum_chunk(
    arrays: Sequence[mx.array], chunk: list[int], out: list[mx.array | None], group: Group
) -> None:
    if len(chunk) == 1:
        out[chunk[0]] = mx.distributed.all_sum(arrays[chunk[0]], group=group)
        return
    flat = mx.concatenate([arrays[i].reshape(-1) for i in chunk])
    summed = mx.distributed.all_sum(flat, group=group)
    at = 0
    for i in chunk:
        n = arrays[i].size
        out[i] = summed[at : at + n].reshape(arrays[i].shape)
        at += n


def sum_tree(tree: T, group: Group) -> T:
    """``all_sum`` of every array of a parameter/gradient tree (same structure back)."""
    flat: dict[str, mx.array] = dict(tree_flatten(tree))
    summed = iter(sum_arrays(list(flat.values()), group))
    # tree_map visits leaves in tree_flatten's order, so the structure (empty subtrees of
    # frozen blocks included) comes back exactly as the optimizer expects it.
    return tree_map(lambda _: next(summed), tree)  # type: ignore[no-any-return]


def broadcast_trainable(model: nn.Module, group: Group | None) -> None:
    """Give every rank rank 0's trainable weights (e.g. freshly initialised adapters).

    Ranks seed their generators alike, so the weights should already agree; sending them
    once makes that a guarantee rather than an assumption about random streams.
    """
    if group is None:
        return
    params = model.trainable_parameters()
    if not is_primary(group):
        params = tree_map(mx.zeros_like, params)
    flat: dict[str, mx.array] = dict(tree_flatten(params))
    with peer_failures():
        shared = sum_arrays(list(flat.values()), group)
        mx.eval(shared)
    model.load_weights(list(zip(flat, shared)), strict=False)
