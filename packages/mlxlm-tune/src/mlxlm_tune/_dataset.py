"""Datasets: encoded samples of one split, and loaders for local jsonl and Hugging Face data.

``--data DIR`` reads ``DIR/train.jsonl``, ``DIR/valid.jsonl`` and ``DIR/test.jsonl`` (only
train is required for training); a single ``.jsonl`` file is a training set on its own.
Anything else is taken as a Hugging Face dataset id, which needs the ``datasets`` extra.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from mlxlm_core import InvalidArgumentError

from ._encode import PreferenceSample, Sample, encode_preference, encode_record
from ._records import Record, parse_records, read_records

__all__ = [
    "Dataset",
    "DatasetSplits",
    "encode_records",
    "load_dataset",
    "load_hf_dataset",
    "load_jsonl",
]

SPLITS = ("train", "valid", "test")


@dataclass
class Dataset:
    """Encoded examples of one split: :class:`Sample` (SFT) or :class:`PreferenceSample`."""

    samples: list[Any]
    name: str = "data"
    #: Preference data only: the reference model's log-likelihood of each (chosen,
    #: rejected) answer, ``(N, 2)``, set by :func:`mlxlm_tune.compute_reference` for DPO.
    reference: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Any:
        return self.samples[index]

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(s) for s in self.samples], dtype=np.int64)

    @property
    def is_preference(self) -> bool:
        return bool(self.samples) and isinstance(self.samples[0], PreferenceSample)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    @classmethod
    def from_token_lists(
        cls, sequences: Iterable[Sequence[int]], *, name: str = "tokens"
    ) -> Dataset:
        """Plain token sequences, every token (but the first) a target — e.g. calibration text."""
        samples = []
        for i, seq in enumerate(sequences):
            ids = np.asarray(seq, dtype=np.int32)
            mask = np.ones(ids.shape[0], bool)
            if mask.size:
                mask[0] = False
            samples.append(Sample(ids, mask, f"{name}[{i}]"))
        if not samples:
            raise InvalidArgumentError(f"{name}: no sequences")
        return cls(samples, name)


@dataclass
class DatasetSplits:
    train: Dataset | None
    valid: Dataset | None
    test: Dataset | None


def _check_length(sample: Any, max_seq_length: int | None, truncate: bool) -> Any:
    if max_seq_length is None or len(sample) <= max_seq_length:
        return sample
    if isinstance(sample, PreferenceSample):
        if not truncate:
            raise InvalidArgumentError(
                f"{sample.source}: {len(sample)} tokens, longer than the maximum sequence length "
                f"{max_seq_length}; raise --max-seq-length or pass --truncate"
            )
        return PreferenceSample(
            _check_length(sample.chosen, max_seq_length, True),
            _check_length(sample.rejected, max_seq_length, True),
            sample.source,
        )
    if not truncate:
        raise InvalidArgumentError(
            f"{sample.source}: {len(sample)} tokens, longer than the maximum sequence length "
            f"{max_seq_length}; raise --max-seq-length or pass --truncate"
        )
    cut = Sample(sample.tokens[:max_seq_length], sample.mask[:max_seq_length], sample.source)
    if not cut.num_targets:
        raise InvalidArgumentError(
            f"{sample.source}: no target token is left within the first {max_seq_length} "
            "tokens; raise --max-seq-length"
        )
    return cut


def encode_records(
    records: Sequence[Record],
    tokenizer: Any,
    *,
    max_seq_length: int | None = 2048,
    mask_prompt: bool = True,
    truncate: bool = False,
    preference: bool | None = None,
    name: str = "data",
) -> Dataset:
    """Encode validated records; ``preference`` None: as the records' format says."""
    if preference is None:
        preference = records[0].format == "preference"
    samples: list[Any] = []
    for record in records:
        if preference:
            sample: Any = encode_preference(record, tokenizer)
        else:
            sample = encode_record(record, tokenizer, mask_prompt=mask_prompt)
        if not preference and not sample.num_targets:
            raise InvalidArgumentError(f"{record.source}: no token to train on")
        samples.append(_check_length(sample, max_seq_length, truncate))
    return Dataset(samples, name)


def load_jsonl(
    path: str | Path,
    tokenizer: Any,
    *,
    max_seq_length: int | None = 2048,
    mask_prompt: bool = True,
    truncate: bool = False,
    fmt: str | None = None,
) -> Dataset:
    """One jsonl file, validated line by line and encoded."""
    records = read_records(path, fmt=fmt)
    return encode_records(
        records,
        tokenizer,
        max_seq_length=max_seq_length,
        mask_prompt=mask_prompt,
        truncate=truncate,
        name=str(path),
    )


def load_dataset(
    data: str | Path,
    tokenizer: Any,
    *,
    max_seq_length: int | None = 2048,
    mask_prompt: bool = True,
    truncate: bool = False,
    fmt: str | None = None,
    splits: Sequence[str] = SPLITS,
) -> DatasetSplits:
    """Train / valid / test from a directory of jsonl files, one jsonl file, or the hub."""
    options: dict[str, Any] = {
        "max_seq_length": max_seq_length,
        "mask_prompt": mask_prompt,
        "truncate": truncate,
        "fmt": fmt,
    }
    path = Path(data)
    found: dict[str, Dataset | None] = dict.fromkeys(SPLITS)
    if path.is_file():
        found["train"] = load_jsonl(path, tokenizer, **options)
    elif path.is_dir():
        for split in splits:
            file = path / f"{split}.jsonl"
            if file.is_file():
                found[split] = load_jsonl(file, tokenizer, **options)
        if not any(found.values()):
            raise InvalidArgumentError(f"{path}: no train.jsonl, valid.jsonl or test.jsonl")
    else:
        return load_hf_dataset(str(data), tokenizer, **options)
    return DatasetSplits(found["train"], found["valid"], found["test"])


def load_hf_dataset(
    name: str,
    tokenizer: Any,
    *,
    max_seq_length: int | None = 2048,
    mask_prompt: bool = True,
    truncate: bool = False,
    fmt: str | None = None,
) -> DatasetSplits:
    """A Hugging Face dataset's train/valid(ation)/test splits (needs the ``datasets`` extra)."""
    if "/" not in name or name.startswith((".", "/")):
        raise InvalidArgumentError(f"{name}: no such data file or directory")
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise ImportError(
            f"{name} is not a local path; loading Hugging Face datasets needs the "
            "'datasets' extra: pip install 'mlxlm-tune[datasets]'"
        ) from None
    try:
        loaded = datasets.load_dataset(name)
    except Exception as exc:  # the hub client raises many types
        raise InvalidArgumentError(f"{name}: cannot load the dataset ({exc})") from None
    out: dict[str, Dataset | None] = dict.fromkeys(SPLITS)
    aliases = {"train": ("train",), "valid": ("valid", "validation"), "test": ("test",)}
    for split, keys in aliases.items():
        key = next((k for k in keys if k in loaded), None)
        if key is None:
            continue
        rows = ((f"{name}[{key}][{i}]", dict(row)) for i, row in enumerate(loaded[key]))
        records = parse_records(rows, fmt=fmt, name=f"{name}[{key}]")
        out[split] = encode_records(
            records,
            tokenizer,
            max_seq_length=max_seq_length,
            mask_prompt=mask_prompt,
            truncate=truncate,
            name=f"{name}[{key}]",
        )
    return DatasetSplits(out["train"], out["valid"], out["test"])
