"""Progress bars for long CLI work, shown only when stderr is a terminal.

Piped or captured output (scripts, CI, tests) stays free of carriage-return noise.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["progress_bar"]


def progress_bar(total: int, *, unit: str, desc: str | None = None) -> Any:
    """A tqdm bar on stderr, or None when nobody is watching."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, leave=False)
