"""Data-parallel pieces that run in one process (two real ranks: tests-integration).

A group of one rank (``mx.distributed.init()`` outside ``mlx.launch``) makes ``all_sum``
the identity, so the packing of many arrays into few collectives can be checked here: every
array must come back where it was, with its shape and dtype. The batch slices of the ranks
must together be exactly the one-process batch.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlxlm_core import InvalidArgumentError
from mlxlm_tune import Batcher, Dataset
from mlxlm_tune import _distributed as dp


def test_sum_tree_packs_and_unpacks_every_array(monkeypatch: pytest.MonkeyPatch) -> None:
    group = mx.distributed.init()
    assert group.size() == 1
    monkeypatch.setattr(dp, "CHUNK_BYTES", 64)  # several chunks per dtype
    rng = np.random.default_rng(0)
    tree = {
        "a": [mx.array(rng.normal(size=(3, 4)).astype(np.float32)), {}],
        "b": {"c": mx.array(rng.normal(size=(5,)).astype(np.float16)), "d": {}},
        "e": [{}, {"f": mx.array(rng.normal(size=(2, 2, 3)).astype(np.float32))}],
        "g": mx.array(rng.normal(size=(40,)).astype(np.float32)),  # alone over the chunk size
    }
    out = dp.sum_tree(tree, group)
    assert out["a"][1] == {} and out["b"]["d"] == {} and out["e"][0] == {}
    for (k1, v1), (k2, v2) in zip(tree_flatten(tree), tree_flatten(out), strict=True):
        assert k1 == k2 and v1.shape == v2.shape and v1.dtype == v2.dtype
        np.testing.assert_array_equal(np.array(v1), np.array(v2))


def test_rank_slices_make_up_the_one_process_batch() -> None:
    rng = np.random.default_rng(1)
    tokens = [list(rng.integers(3, 90, int(rng.integers(3, 12)))) for _ in range(9)]
    batcher = Batcher(Dataset.from_token_lists(tokens), batch_size=4, seed=5)
    whole = list(batcher.batches(loop=False))
    parts = [list(batcher.batches(loop=False, part=(r, 2))) for r in range(2)]
    assert len(whole) == len(parts[0]) == len(parts[1]) == 3
    for (batch, pos), (b0, p0), (b1, p1) in zip(whole, *parts):
        assert pos == p0 == p1  # positions stay global: every rank resumes alike
        rows = {tuple(np.array(r)[np.array(m)]) for r, m in zip(batch.tokens, batch.mask)}
        mine = [
            tuple(np.array(r)[np.array(m)])
            for b in (b0, b1)
            if not b.empty
            for r, m in zip(b.tokens, b.mask)
        ]
        assert sorted(mine) == sorted(rows) and len(mine) == batch.shape[0]
        assert b0.num_tokens + b1.num_tokens == batch.num_tokens
    # 9 rows plan as 4, 4, 1: rank 1's slice of the one-row batch is empty.
    assert sum(b.empty for b, _ in parts[1]) == 1
    assert not any(b.empty for b, _ in parts[0])


def test_a_global_batch_must_split_over_the_ranks() -> None:
    class Two:
        def size(self) -> int:
            return 2

    dp.check_batch_size(4, None)
    dp.check_batch_size(4, Two())  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="does not split over 2 ranks"):
        dp.check_batch_size(5, Two())  # type: ignore[arg-type]
