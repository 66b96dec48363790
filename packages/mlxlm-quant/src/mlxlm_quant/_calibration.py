"""Calibration data: token windows from a local file or the built-in corpus, offline.

Reading and windowing are core's (:mod:`mlxlm_core.data`), the same loader ``mlxlm
perplexity`` and mlxlm-tune use. The built-in corpus, ``data/calibration.txt`` in this
package, is original prose, dialogue, instructions, code and lists written for mlxlm and
released under its licence (nothing is downloaded at run time); it shares no text with
core's evaluation file, so perplexity measured on that file is held out.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlxlm_core import InvalidArgumentError
from mlxlm_core.data import read_texts, token_windows

__all__ = ["BUILTIN_CALIBRATION_NAME", "builtin_calibration_text", "calibration_windows"]

BUILTIN_CALIBRATION_NAME = "mlxlm_quant/data/calibration.txt"


def builtin_calibration_text() -> str:
    return (
        importlib.resources.files("mlxlm_quant").joinpath("data/calibration.txt").read_text("utf-8")
    )


def calibration_windows(
    tokenizer: Any,
    *,
    data_path: str | Path | None = None,
    num_samples: int = 32,
    sequence_length: int = 256,
) -> mx.array:
    """``(N, sequence_length)`` token ids for calibration (``num_samples`` -1: all).

    Windows are consecutive, so a run is deterministic; a text too short for one window,
    or an empty file, is a one-line :class:`InvalidArgumentError` before any work starts.
    """
    if num_samples == 0 or num_samples < -1:
        raise InvalidArgumentError(f"--num-samples must be positive or -1, got {num_samples}")
    if data_path is not None:
        texts = read_texts(data_path)
    else:
        # One document per paragraph block, so each ends with an end-of-sequence token.
        texts = [t for t in builtin_calibration_text().split("\n\n\n") if t.strip()]
    windows = token_windows(
        tokenizer, texts, sequence_length=sequence_length, num_samples=num_samples
    )
    return mx.array(windows)
