"""MLX parameters -> GGUF tensor data: choosing each tensor's type and encoding it.

Float tensors go through the `gguf` package's reference quantizers. MLX affine triples are
rewritten block for block when the target type has the same grid (see `_affine`): 2-4 bit
as Q4_1 (Q4_0 when symmetric), 5 bit as Q5_1 (Q5_0), 8 bit as Q8_0 when symmetric. Where
the grids differ (MLX's asymmetric 8-bit, 6-bit, the micro-scaled float modes, or a target
the caller forced) the values are dequantized and re-quantized, and the caller is told.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as QType
from mlxlm_core import InvalidArgumentError

from ._affine import GROUP, affine_to_blocks, unpack_bits

FLOAT_OUT = {"f32": QType.F32, "f16": QType.F16, "bf16": QType.BF16}
QUANT_OUT = {
    "q8_0": QType.Q8_0,
    "q4_0": QType.Q4_0,
    "q4_1": QType.Q4_1,
    "q5_0": QType.Q5_0,
    "q5_1": QType.Q5_1,
}
OUT_TYPES = ("auto", *FLOAT_OUT, *QUANT_OUT)

# GGUF parts llama.cpp wants in float32 whatever the file type: norms, biases and the MoE
# router (routing decisions are sensitive; llama.cpp's converter keeps it F32 too).
_ALWAYS_F32_PARTS = ("ffn_gate_inp",)


@dataclass
class Quantized:
    """An MLX quantized parameter: packed weight with its scales (and biases)."""

    weight: np.ndarray
    scales: np.ndarray
    biases: np.ndarray | None
    group_size: int
    bits: int
    mode: str

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.weight.shape[:-1], self.weight.shape[-1] * 32 // self.bits)

    def take_rows(self, fn) -> Quantized:  # type: ignore[no-untyped-def]
        """The same tensor with `fn` applied to the rows of every part (Q/K permutation)."""
        return Quantized(
            fn(self.weight),
            fn(self.scales),
            None if self.biases is None else fn(self.biases),
            self.group_size,
            self.bits,
            self.mode,
        )

    def values(self) -> np.ndarray:
        return unpack_bits(self.weight, self.bits)

    def dequantize(self) -> np.ndarray:
        if self.mode == "affine" and self.biases is not None:
            rep = self.group_size
            v = self.values().astype(np.float32)
            scales = np.repeat(self.scales, rep, axis=-1)
            return v * scales + np.repeat(self.biases, rep, axis=-1)
        w = mx.dequantize(
            mx.array(self.weight),
            mx.array(self.scales),
            None if self.biases is None else mx.array(self.biases),
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        )
        return np.array(w.astype(mx.float32))


Source = np.ndarray | Quantized


@dataclass
class Encoded:
    data: np.ndarray
    qtype: QType
    note: str | None = None  # "re-quantized", "kept", ... for the export report


def _is_always_f32(gguf_name: str, ndim: int) -> bool:
    parts = gguf_name.split(".")
    return ndim < 2 or any(p in parts for p in _ALWAYS_F32_PARTS)


def _float_bytes(a: np.ndarray, qtype: QType) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.float32)
    if qtype == QType.F32:
        return a
    if qtype == QType.F16:
        return a.astype(np.float16)
    return gguf.quants.quantize(a, qtype)


def _exact_blocks(q: Quantized, qtype: QType) -> np.ndarray | None:
    """`q` written block for block as `qtype` when the grids agree, else None."""
    if q.mode != "affine" or q.biases is None or q.group_size % GROUP:
        return None
    rows = int(np.prod(q.shape[:-1]))
    rep = q.group_size // GROUP
    values = q.values().reshape(rows, -1)
    scales = np.repeat(q.scales.reshape(rows, -1).astype(np.float32), rep, axis=-1)
    biases = np.repeat(q.biases.reshape(rows, -1).astype(np.float32), rep, axis=-1)
    raw = affine_to_blocks(values, scales, biases, qtype)
    return None if raw is None else raw.reshape(*q.shape[:-1], -1)


def _closest(q: Quantized) -> list[QType]:
    """GGUF types to try for an MLX quantized tensor, nearest grid first."""
    if q.mode != "affine":
        return [QType.Q8_0]
    if q.bits <= 4:
        return [QType.Q4_0, QType.Q4_1]
    if q.bits == 5:
        return [QType.Q5_0, QType.Q5_1]
    return [QType.Q8_0]


def describe(q: Quantized) -> str:
    return f"MLX {q.mode} {q.bits}-bit (group {q.group_size})"


def encode(gguf_name: str, src: Source, out_type: str) -> Encoded:
    """Choose the GGUF type of one tensor under `out_type` and produce its data."""
    if out_type not in OUT_TYPES:
        raise InvalidArgumentError(
            f"out_type must be one of {', '.join(OUT_TYPES)}, not {out_type!r}"
        )
    shape = src.shape
    if _is_always_f32(gguf_name, len(shape)):
        values = src.dequantize() if isinstance(src, Quantized) else src
        return Encoded(_float_bytes(values, QType.F32), QType.F32)
    if out_type in FLOAT_OUT:
        values = src.dequantize() if isinstance(src, Quantized) else src
        return Encoded(_float_bytes(values, FLOAT_OUT[out_type]), FLOAT_OUT[out_type])
    if out_type == "auto" and not isinstance(src, Quantized):
        return Encoded(_float_bytes(src, QType.F16), QType.F16)
    if shape[-1] % GROUP:
        # No 32-value blocks fit this row; llama.cpp's converter falls back the same way.
        values = src.dequantize() if isinstance(src, Quantized) else src
        return Encoded(_float_bytes(values, QType.F16), QType.F16, note="row not a multiple of 32")
    if not isinstance(src, Quantized):
        qtype = QUANT_OUT[out_type]
        return Encoded(gguf.quants.quantize(np.asarray(src, np.float32), qtype), qtype)
    candidates = _closest(src) if out_type == "auto" else [QUANT_OUT[out_type]]
    for qtype in candidates:
        raw = _exact_blocks(src, qtype)
        if raw is not None:
            return Encoded(raw, qtype, note="kept")
    qtype = candidates[-1]
    raw = gguf.quants.quantize(src.dequantize(), qtype)
    return Encoded(raw, qtype, note="re-quantized")
