"""Batches: shuffling, length bucketing, sequence packing, padding; resumable positions.

An epoch's batches are a pure function of ``(seed, epoch)``, so a run is resumed exactly by
remembering only ``DataPosition(epoch, index)`` — no iterator state to pickle.

- Length bucketing sorts examples by length before cutting batches (then shuffles the
  batches), so examples of similar length share a batch and little compute goes to padding.
- Packing fills each row with several examples up to ``max_seq_length`` tokens. Every token
  carries the id of its example (``segments``) and attention is block-diagonal over them, so
  an example never sees its neighbours; with rotary positions, which only enter attention
  as differences, a packed example computes exactly what it would alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from mlxlm_core import InvalidArgumentError

from ._dataset import Dataset
from ._encode import PreferenceSample, Sample

__all__ = ["Batch", "Batcher", "DataPosition"]


@dataclass(frozen=True)
class DataPosition:
    """Where the data stream is: batch ``index`` of epoch ``epoch`` comes next."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}


@dataclass
class Batch:
    """Padded token rows and the mask of target tokens.

    ``tokens`` and ``mask`` are ``(B, L)``; ``mask[b, i]`` trains the prediction of
    ``tokens[b, i]`` from the tokens before it. ``segments`` (packing only) numbers the
    examples of each row from 1, padding 0. Preference batches hold the chosen rows first,
    then the rejected rows in the same order; ``reference`` may carry the reference model's
    log-likelihood of each row (DPO).
    """

    tokens: mx.array
    mask: mx.array
    segments: mx.array | None = None
    reference: mx.array | None = None
    num_tokens: int = 0
    preference: bool = False
    #: Arrays a custom loss needs per batch (e.g. a teacher's logits for distillation).
    #: They reach the loss through the compiled step as inputs: a loss that closed over
    #: arrays instead would be refused by ``mx.compile``.
    extra: dict[str, mx.array] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.tokens.shape[0]), int(self.tokens.shape[1]))

    @property
    def empty(self) -> bool:
        """No rows: a data-parallel rank whose slice of a short batch came up empty."""
        return int(self.tokens.shape[0]) == 0


def _pad(length: int, pad_to: int, cap: int | None) -> int:
    padded = -(-length // pad_to) * pad_to
    return min(padded, cap) if cap else padded


def collate(
    rows: Sequence[Sequence[Sample]],
    *,
    pad_to: int = 8,
    max_length: int | None = None,
    pad_id: int = 0,
    packed: bool = False,
) -> Batch:
    """Pack each row's samples side by side and pad all rows to one length."""
    lengths = [sum(len(s) for s in row) for row in rows]
    width = max(_pad(max(lengths), pad_to, max_length), max(lengths))
    tokens = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), bool)
    segments = np.zeros((len(rows), width), np.int32)
    for r, row in enumerate(rows):
        at = 0
        for k, sample in enumerate(row, 1):
            n = len(sample)
            tokens[r, at : at + n] = sample.tokens
            mask[r, at : at + n] = sample.mask
            segments[r, at : at + n] = k
            at += n
    return Batch(
        tokens=mx.array(tokens),
        mask=mx.array(mask),
        segments=mx.array(segments) if packed else None,
        num_tokens=int(mask.sum()),
    )


class Batcher:
    """Deterministic batches of a :class:`Dataset`, epoch after epoch."""

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        max_seq_length: int | None = None,
        pack: bool = False,
        bucket: bool = True,
        shuffle: bool = True,
        seed: int = 0,
        pad_to: int = 8,
        pad_id: int = 0,
    ) -> None:
        if batch_size < 1:
            raise InvalidArgumentError(f"batch size must be >= 1, got {batch_size}")
        if not len(dataset):
            raise InvalidArgumentError(f"{dataset.name}: no examples")
        self.preference = dataset.is_preference
        if pack and self.preference:
            raise InvalidArgumentError("packing does not apply to preference pairs")
        if pack and not max_seq_length:
            raise InvalidArgumentError("packing needs a maximum sequence length")
        longest = int(dataset.lengths.max())
        if max_seq_length and longest > max_seq_length:
            raise InvalidArgumentError(
                f"{dataset.name}: an example has {longest} tokens, more than the maximum "
                f"sequence length {max_seq_length}"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.max_seq_length = max_seq_length
        self.pack, self.bucket, self.shuffle = pack, bucket, shuffle
        self.seed, self.pad_to, self.pad_id = seed, pad_to, pad_id
        self._plans: dict[int, list[list[list[int]]]] = {}

    # -- planning ----------------------------------------------------------------------------

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch])

    def _rows(self, order: np.ndarray) -> list[list[int]]:
        """Each row's example indices: one example per row, or packed greedily (first fit)."""
        if not self.pack:
            return [[int(i)] for i in order]
        lengths = self.dataset.lengths
        cap = int(self.max_seq_length or 0)
        rows: list[list[int]] = []
        room: list[int] = []
        for i in order:
            n = int(lengths[i])
            for r, left in enumerate(room):
                if n <= left:
                    rows[r].append(int(i))
                    room[r] -= n
                    break
            else:
                rows.append([int(i)])
                room.append(cap - n)
        return rows

    def plan(self, epoch: int) -> list[list[list[int]]]:
        """Epoch ``epoch``'s batches, each a list of rows of example indices."""
        if epoch in self._plans:
            return self._plans[epoch]
        rng = self._rng(epoch)
        n = len(self.dataset)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        rows = self._rows(order)
        if self.bucket:
            lengths = self.dataset.lengths
            size = [sum(int(lengths[i]) for i in row) for row in rows]
            rows = [rows[i] for i in np.argsort(size, kind="stable")]
        batches = [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        if self.bucket and self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._plans = {epoch: batches}  # only the current epoch is kept
        return batches

    def __len__(self) -> int:
        return len(self.plan(0))

    # -- batches -----------------------------------------------------------------------------

    def make_batch(self, rows: Sequence[Sequence[int]]) -> Batch:
        data = self.dataset
        if not rows:
            nothing = mx.zeros((0, 0), mx.int32)
            return Batch(tokens=nothing, mask=nothing.astype(mx.bool_), preference=self.preference)
        if self.preference:
            pairs: list[PreferenceSample] = [data[row[0]] for row in rows]
            batch = collate(
                [[p.chosen] for p in pairs] + [[p.rejected] for p in pairs],
                pad_to=self.pad_to,
                max_length=self.max_seq_length,
                pad_id=self.pad_id,
            )
            batch.preference = True
            if data.reference is not None:
                idx = [row[0] for row in rows]
                ref = np.concatenate([data.reference[idx, 0], data.reference[idx, 1]])
                batch.reference = mx.array(ref.astype(np.float32))
            return batch
        return collate(
            [[data[i] for i in row] for row in rows],
            pad_to=self.pad_to,
            max_length=self.max_seq_length,
            pad_id=self.pad_id,
            packed=self.pack,
        )

    def batches(
        self,
        start: DataPosition | None = None,
        *,
        loop: bool = True,
        part: tuple[int, int] | None = None,
    ) -> Iterator[tuple[Batch, DataPosition]]:
        """``(batch, position after it)`` from ``start``; one epoch unless ``loop``.

        ``part=(rank, size)`` (data-parallel training) yields only rows ``rank, rank+size,
        ...`` of each planned batch; positions stay global, so every rank resumes alike.
        A slice can be empty (a short last batch): its batch has no rows (``empty``).
        """
        start = start or DataPosition()
        epoch, index = start.epoch, start.index
        rank, size = part or (0, 1)
        while True:
            plan = self.plan(epoch)
            while index < len(plan):
                batch = self.make_batch(plan[index][rank::size])
                index += 1
                yield batch, DataPosition(epoch, index)
            if not loop:
                return
            epoch, index = epoch + 1, 0
