"""Keep freed CPU buffers in the process heap so MLX's per-step buffers are reused.

MLX's CPU allocator is plain ``malloc``/``free``. glibc serves a block above its mmap
threshold (128 KB at first, raised dynamically up to 32 MB) with freshly mapped pages and
returns heap memory beyond its trim threshold to the system, so the few-MB temporaries of
a decoding step (a quantized matrix-vector product's partial sums, attention scores) were
mapped, zero-filled through page faults and unmapped again on every step. Measured on
BENCHMARKS.md's machine with the one-row quantized kernel (:mod:`._quant_matvec`): ~100 ms
of CPU per SmolLM2-135M token with glibc's defaults, ~60 ms with the two thresholds set.
Either threshold alone is worse than the defaults (setting one turns off glibc's dynamic
adjustment of both).

:func:`keep_heap` sets ``M_MMAP_THRESHOLD`` to 32 MB (glibc's maximum: larger blocks, such
as weights, are still mapped on their own) and ``M_TRIM_THRESHOLD`` to 256 MB (at most that
much freed memory stays in the process). It is called by :func:`._policy.apply_policy` on
the CPU backend, never at import. ``MLXLM_MALLOC=off`` leaves glibc's defaults; on a C
library other than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["ENV_VAR", "MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_heap"]

ENV_VAR = "MLXLM_MALLOC"
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_state: str | None = None


def keep_heap() -> str:
    """Set glibc's thresholds once per process; returns what was done, for ``--verbose``."""
    global _state
    if _state is not None:
        return _state
    if os.environ.get(ENV_VAR, "").lower() in ("off", "0", "no", "false"):
        _state = f"default ({ENV_VAR}=off)"
    elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _state = "default (not glibc)"
    else:
        try:
            libc = ctypes.CDLL("libc.so.6")
            ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            ok = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
        except (OSError, AttributeError):
            ok = False
        _state = (
            f"heap reuse (mmap >= {MMAP_THRESHOLD >> 20} MB, trim >= {TRIM_THRESHOLD >> 20} MB)"
            if ok
            else "default (mallopt refused)"
        )
    return _state
