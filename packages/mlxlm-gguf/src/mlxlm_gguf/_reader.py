"""Read a GGUF file: its metadata as plain Python values, its tensors as memory-mapped views.

Our own parser, not `gguf.GGUFReader`: that reader trusts every count in the file (a damaged
array length of 2**40 items makes it loop and allocate until memory runs out, which the
fuzz test found) and spends seconds building a numpy view per vocabulary entry. Here every
count and length is checked against the bytes actually left before anything is read, and
arrays of numbers are read in one go, so a damaged file is refused in one line
(`CheckpointError`, or `UnsupportedError` for a tensor type we do not know) in time
proportional to its real size. The `gguf` package still supplies the type tables, and the
tests check this parser against its reader.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from mlxlm_core import CheckpointError, UnsupportedError

GGUF_MAGIC = b"GGUF"
_SCALARS: dict[int, str] = {
    GGUFValueType.UINT8: "<u1",
    GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4",
    GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.BOOL: "<u1",
    GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8",
}
_MAX_DIMS = 4  # GGML_MAX_DIMS
_FLOAT_DTYPES = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64,
}


@dataclass
class TensorRecord:
    """One tensor: GGUF dims (fastest first), type, and where its bytes are."""

    name: str
    dims: tuple[int, ...]
    tensor_type: GGMLQuantizationType
    data_offset: int
    n_bytes: int
    _buffer: np.ndarray = field(repr=False)

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical (row-major) shape: GGUF's dims reversed."""
        return tuple(reversed(self.dims))

    @property
    def data(self) -> np.ndarray:
        """Floats typed and shaped; block types as (rows, bytes per row) uint8."""
        raw = self._buffer[self.data_offset : self.data_offset + self.n_bytes]
        if self.tensor_type in _FLOAT_DTYPES:
            return raw.view(_FLOAT_DTYPES[self.tensor_type]).reshape(self.shape)
        return raw.reshape(*self.shape[:-1], -1) if len(self.shape) > 1 else raw


@dataclass
class GGUFFile:
    """A parsed GGUF file: its metadata (key → Python value) and its tensor records."""

    path: Path
    metadata: dict[str, Any]
    tensors: list[TensorRecord] = field(repr=False)

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


class _Cursor:
    """Reads little-endian values from a buffer, every read bounds-checked."""

    def __init__(self, buf: mmap.mmap, path: Path):
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

    def string(self) -> str:
        n = self.u64()
        start = self.take(n)
        try:
            return self.buf[start : start + n].decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"invalid UTF-8 in a string at offset {start}") from e

    def value(self, vtype: int, *, nested: bool = False) -> Any:
        if vtype in _SCALARS:
            dtype = np.dtype(_SCALARS[vtype])
            start = self.take(dtype.itemsize)
            return _python(np.frombuffer(self.buf, dtype, 1, start)[0], vtype)
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY and not nested:
            item, count = self.u32(), self.u64()
            if item in _SCALARS:
                dtype = np.dtype(_SCALARS[item])
                start = self.take(count * dtype.itemsize)
                values = np.frombuffer(self.buf, dtype, count, start)
                return [_python(v, item) for v in values.tolist()]
            if item == GGUFValueType.STRING:
                # Every string needs its 8-byte length at least: bound the loop by the file.
                if count * 8 > len(self.buf) - self.pos:
                    raise self.fail(f"an array of {count} strings cannot fit in the file")
                return [self.string() for _ in range(count)]
            raise self.fail(f"unsupported array item type {item}")
        raise self.fail(f"unknown metadata value type {vtype}")


def _python(value: Any, vtype: int) -> Any:
    """float32 values in their shortest decimal form (1e-05, not 9.99999974e-06): configs
    written from them are read by people and compared with the Hugging Face originals."""
    if vtype == GGUFValueType.BOOL:
        return bool(value)
    if vtype == GGUFValueType.FLOAT32:
        return float(str(np.float32(value)))
    if vtype == GGUFValueType.FLOAT64:
        return float(value)
    return int(value)


def _tensor_type(raw: int, name: str, path: Path) -> GGMLQuantizationType:
    try:
        qtype = GGMLQuantizationType(raw)
    except ValueError:
        raise UnsupportedError(f"{path}: tensor {name} has unknown GGUF type {raw}") from None
    if qtype not in GGML_QUANT_SIZES:
        raise UnsupportedError(f"{path}: tensor {name} has GGUF type {qtype.name}")
    return qtype


def open_gguf(path: Path) -> GGUFFile:
    """Parse `path`; raise CheckpointError (one line) when it is not a readable GGUF file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    if not is_gguf_file(path):
        raise CheckpointError(f"{path}: not a GGUF file (missing 'GGUF' magic bytes)")
    size = path.stat().st_size
    if size < 24:
        raise CheckpointError(f"{path}: truncated GGUF file ({size} bytes)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        c = _Cursor(buf, path)
        c.take(4)
        version = c.u32()
        if version not in (2, 3):
            raise CheckpointError(
                f"{path}: GGUF version {version} is not supported (2 and 3 are; big-endian "
                "files are not)"
            )
        n_tensors, n_kv = c.u64(), c.u64()
        if n_kv * 13 > size or n_tensors * 24 > size:  # the smallest possible records
            raise c.fail(f"{n_kv} metadata entries and {n_tensors} tensors cannot fit")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = c.string()
            metadata[key] = c.value(c.u32())
        infos = []
        for _ in range(n_tensors):
            name = c.string()
            n_dims = c.u32()
            if not 0 < n_dims <= _MAX_DIMS:
                raise c.fail(f"tensor {name!r} with {n_dims} dimensions")
            dims = tuple(c.u64() for _ in range(n_dims))
            infos.append((name, dims, c.u32(), c.u64()))
        header_end = c.pos
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise CheckpointError(f"{path}: invalid general.alignment {alignment!r}")
    data_start = -(-header_end // alignment) * alignment
    buffer = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = []
    for name, dims, raw_type, offset in infos:
        qtype = _tensor_type(raw_type, name, path)
        block, type_size = GGML_QUANT_SIZES[qtype]
        count = int(np.prod(dims, dtype=object))
        if dims[0] % block:
            raise CheckpointError(
                f"{path}: tensor {name} rows of {dims[0]} are not whole {qtype.name} blocks"
            )
        n_bytes = count // block * type_size
        start = data_start + offset
        if offset % alignment or start + n_bytes > size:
            raise CheckpointError(
                f"{path}: truncated GGUF file (tensor {name} runs past the end)"
                if start + n_bytes > size
                else f"{path}: tensor {name} is not aligned"
            )
        tensors.append(TensorRecord(name, dims, qtype, start, n_bytes, buffer))
    return GGUFFile(path=path, metadata=metadata, tensors=tensors)
