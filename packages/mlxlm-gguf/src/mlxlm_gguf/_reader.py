"""Open a GGUF file and expose its metadata as plain Python values.

The `gguf` package's reader parses the header in pure Python and memory-maps the tensor
data, so a damaged file raises an ordinary exception (never a crash in native code, which
`mx.load` can do on a truncated file); `_layout` checks every count first, since the
reader would otherwise loop on a damaged one until memory runs out. Every such exception becomes one `CheckpointError`
line here, so callers only see errors that name the file and what is wrong with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGUFValueType
from mlxlm_core import CheckpointError

from ._layout import check_layout

GGUF_MAGIC = b"GGUF"


@dataclass
class GGUFFile:
    """A parsed GGUF file: its metadata (key → Python value) and its tensor records."""

    path: Path
    metadata: dict[str, Any]
    tensors: list[gguf.ReaderTensor] = field(repr=False)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def arch_key(self, suffix: str, default: Any = None) -> Any:
        """A key under the architecture's prefix, e.g. ``llama.block_count``."""
        return self.metadata.get(f"{self.architecture}.{suffix}", default)


def is_gguf_file(path: Path) -> bool:
    """True when `path` is a regular file starting with the GGUF magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _field_value(f: gguf.ReaderField) -> Any:
    """Decode one metadata field.

    float32 values are rounded to their shortest decimal form (1e-05, not
    9.999999747378752e-06) because configs written from them are read by people and
    compared with the Hugging Face originals.
    """
    value = f.contents()
    if not f.types:
        return value
    leaf = f.types[-1]
    if leaf == GGUFValueType.FLOAT32:
        if isinstance(value, list):
            return [float(str(np.float32(v))) for v in value]
        return float(str(np.float32(value)))
    return value


def open_gguf(path: Path) -> GGUFFile:
    """Parse `path`; raise CheckpointError (one line) when it is not a readable GGUF file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    if not is_gguf_file(path):
        raise CheckpointError(f"{path}: not a GGUF file (missing 'GGUF' magic bytes)")
    check_layout(path)  # the `gguf` reader trusts counts in the file; we check them first
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, KeyError, IndexError, …
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: corrupt or truncated GGUF file ({msg})") from e
    if reader.byte_order != "I":
        raise CheckpointError(f"{path}: big-endian GGUF files are not supported")
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise CheckpointError(
                f"{path}: truncated GGUF file (tensor {t.name} runs past the end)"
            )
    try:
        metadata = {
            name: _field_value(f)
            for name, f in reader.fields.items()
            if not name.startswith("GGUF.")
        }
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable GGUF metadata ({e})") from e
    return GGUFFile(path=path, metadata=metadata, tensors=list(reader.tensors))
