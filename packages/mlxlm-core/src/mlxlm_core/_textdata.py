"""Evaluation text from local files, cut into fixed-length token windows.

``mlxlm perplexity`` must work offline, so it reads plain files rather than hub datasets:
a ``.txt`` file is one document, a ``.jsonl`` file holds one JSON object per line with a
``"text"`` field. Without a file it uses ``data/eval.txt``, a few paragraphs of prose written
for this package (original text, released with it under its licence), so a fresh install can
measure a model with no download.
"""

from __future__ import annotations

import importlib.resources
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._errors import InvalidArgumentError

__all__ = ["BUILTIN_TEXT_NAME", "builtin_text", "read_texts", "token_windows"]

BUILTIN_TEXT_NAME = "mlxlm_core/data/eval.txt"


def builtin_text() -> str:
    """The evaluation prose shipped with the package."""
    return importlib.resources.files("mlxlm_core").joinpath("data/eval.txt").read_text("utf-8")


def read_texts(path: str | Path) -> list[str]:
    """Documents of a ``.txt`` (the whole file) or ``.jsonl`` (``"text"`` per line) file."""
    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"{path}: no such file")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(f"{path}: cannot read as UTF-8 text ({exc})") from None
    if path.suffix.lower() != ".jsonl":
        if not raw.strip():
            raise InvalidArgumentError(f"{path}: the file is empty")
        return [raw]
    texts = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise InvalidArgumentError(f'{path}:{number}: expected an object with a "text" string')
        texts.append(record["text"])
    if not texts:
        raise InvalidArgumentError(f"{path}: no records")
    return texts


def token_windows(
    tokenizer: Any,
    texts: Sequence[str],
    *,
    sequence_length: int,
    num_samples: int = -1,
) -> list[list[int]]:
    """Consecutive windows of ``sequence_length`` tokens over the documents, in order.

    Each document is encoded on its own and followed by an end-of-sequence token (as
    training data is), so the model is scored on document boundaries too. ``num_samples``
    caps the number of windows (``-1``: all); a trailing partial window is dropped so every
    window scores the same number of predictions.
    """
    if sequence_length < 2:
        raise InvalidArgumentError(f"sequence length must be >= 2, got {sequence_length}")
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    wanted = sequence_length * num_samples if num_samples > 0 else None
    for text in texts:
        ids = list(tokenizer.encode(text))
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(int(eos))
        stream.extend(ids)
        if wanted is not None and len(stream) >= wanted:
            break
    count = len(stream) // sequence_length
    if count == 0:
        raise InvalidArgumentError(
            f"the text has {len(stream)} tokens, fewer than one window of {sequence_length}; "
            "lower --sequence-length or give more text"
        )
    if num_samples > 0:
        count = min(count, num_samples)
    return [stream[i * sequence_length : (i + 1) * sequence_length] for i in range(count)]
