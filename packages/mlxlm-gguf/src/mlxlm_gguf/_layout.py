"""A bounds-checked walk over a GGUF header before the `gguf` package parses it.

`gguf.GGUFReader` trusts the counts in the file: a damaged array length (say 2**40 items)
makes it loop and allocate until memory runs out, which the fuzz test found. This walk
reads the same structure with every count checked against the bytes actually left, so a
damaged header is refused in one line, in time proportional to the file's real size.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from gguf import GGUFValueType as V
from mlxlm_core import CheckpointError

_SCALAR = {
    V.UINT8: 1,
    V.INT8: 1,
    V.BOOL: 1,
    V.UINT16: 2,
    V.INT16: 2,
    V.UINT32: 4,
    V.INT32: 4,
    V.FLOAT32: 4,
    V.UINT64: 8,
    V.INT64: 8,
    V.FLOAT64: 8,
}
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 4


class _Walker:
    def __init__(self, buf: mmap.mmap | bytes, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: corrupt or truncated GGUF file ({what})")

    def take(self, n: int) -> int:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail(f"needs {n} bytes at offset {self.pos}, file ends at {len(self.buf)}")
        start = self.pos
        self.pos += n
        return start

    def u32(self) -> int:
        return struct.unpack_from("<I", self.buf, self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack_from("<Q", self.buf, self.take(8))[0]

    def string(self) -> None:
        self.take(self.u64())

    def value(self, vtype: int, depth: int = 0) -> None:
        if vtype in _SCALAR:
            self.take(_SCALAR[V(vtype)])
        elif vtype == V.STRING:
            self.string()
        elif vtype == V.ARRAY:
            if depth >= _MAX_NESTING:
                raise self.fail("arrays nested too deeply")
            item = self.u32()
            count = self.u64()
            left = len(self.buf) - self.pos
            if item in _SCALAR:
                self.take(count * _SCALAR[V(item)])
            elif item in (V.STRING, V.ARRAY):
                # Each item needs at least its 8-byte length prefix (or 12-byte array head).
                if count * 8 > left:
                    raise self.fail(f"array of {count} items cannot fit in {left} bytes")
                for _ in range(count):
                    self.value(item, depth + 1)
            else:
                raise self.fail(f"unknown array item type {item}")
        else:
            raise self.fail(f"unknown metadata value type {vtype}")


def check_layout(path: Path) -> None:
    """Walk header, metadata and tensor records of `path`; CheckpointError if damaged."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 24:
            raise CheckpointError(f"{path}: truncated GGUF file ({size} bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            w = _Walker(buf, path)
            w.take(4)  # magic, checked by the caller
            version = w.u32()
            if version not in (2, 3):
                raise CheckpointError(
                    f"{path}: GGUF version {version} is not supported (2 and 3 are; "
                    "big-endian files are not)"
                )
            n_tensors, n_kv = w.u64(), w.u64()
            if n_kv * 13 > size or n_tensors * 24 > size:  # smallest possible records
                raise w.fail(f"{n_kv} metadata entries and {n_tensors} tensors cannot fit")
            for _ in range(n_kv):
                w.string()
                w.value(w.u32())
            for _ in range(n_tensors):
                w.string()
                n_dims = w.u32()
                if n_dims > _MAX_DIMS:
                    raise w.fail(f"tensor with {n_dims} dimensions")
                w.take(8 * n_dims + 4 + 8)  # dims, type, offset
