"""User-facing errors.

Everything a user can cause by bad input (a wrong path, a corrupt file, an unsupported
architecture, an impossible option) raises a subclass of :class:`MlxlmError` with a message
that fits on one line. The CLI prints that line and exits non-zero; a traceback means a bug.
"""

from __future__ import annotations


class MlxlmError(Exception):
    """Base class for errors caused by input rather than by a bug."""


class ModelNotFoundError(MlxlmError):
    """A model reference resolved to nothing (no directory, file, cache entry or repo)."""


class CheckpointError(MlxlmError):
    """A checkpoint exists but cannot be read: corrupt, incomplete or inconsistent files."""


class UnsupportedError(MlxlmError):
    """Something well-formed that we deliberately do not implement (architecture, format)."""


class InvalidArgumentError(MlxlmError):
    """An option or argument out of its valid range."""


class ContextLengthError(InvalidArgumentError):
    """A prompt longer than the model's context window."""
