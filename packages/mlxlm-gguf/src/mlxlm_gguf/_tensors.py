"""GGUF tensors → MLX arrays.

Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 blocks are exactly MLX's affine quantization with group
size 32 (see `_affine`): every block becomes one group of a (weight, scales, biases)
triple, bit for bit the values the file describes (for Q4_0/Q4_1/Q8_0, the same triple
`mx.load` produces). Re-quantizing instead would add 8–11 % weight error (MLX anchors its
grid differently). Every other type is dequantized with the `gguf` package's reference
code and stored as a float tensor. Names and the Q/K row layout live in `_arch`.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType
from mlxlm_core import CheckpointError, UnsupportedError

from ._affine import BLOCK_KINDS, blocks_to_affine
from ._reader import TensorRecord

GROUP_SIZE = 32
# GGUF types kept as MLX affine triples, with their bit width.
KEPT_BITS: dict[QType, int] = {qtype: bits for qtype, (bits, _) in BLOCK_KINDS.items()}
# Types that are plain floats in the file (stored, not "dequantized").
FLOAT_TYPES = {QType.F32, QType.F16, QType.BF16, QType.F64}


@dataclass
class Converted:
    """One tensor in MLX form: a float array, or an affine triple when `bits` is set."""

    weight: np.ndarray
    scales: np.ndarray | None = None
    biases: np.ndarray | None = None
    bits: int | None = None
    dequantized: bool = False


def _quantized_triple(raw: np.ndarray, qtype: QType, shape: tuple[int, ...]) -> Converted:
    packed, scales, biases = blocks_to_affine(raw, qtype, shape)
    return Converted(weight=packed, scales=scales, biases=biases, bits=KEPT_BITS[qtype])


def convert_tensor(t: TensorRecord) -> Converted:
    """Convert one GGUF tensor record; the logical shape is GGUF's dims reversed."""
    qtype = QType(t.tensor_type)
    shape = t.shape
    try:
        if qtype in KEPT_BITS:
            if shape[-1] % GROUP_SIZE:
                raise CheckpointError(
                    f"tensor {t.name}: row length {shape[-1]} is not a multiple of 32"
                )
            return _quantized_triple(t.data, qtype, shape)
        if qtype in (QType.F32, QType.F16, QType.F64):
            return Converted(weight=np.asarray(t.data).reshape(shape))
        values = gguf.quants.dequantize(np.asarray(t.data), qtype)
    except NotImplementedError as e:
        raise UnsupportedError(f"tensor {t.name}: GGUF type {qtype.name} cannot be read") from e
    except (ValueError, IndexError) as e:
        raise CheckpointError(f"tensor {t.name} ({qtype.name}): corrupt data ({e})") from e
    return Converted(
        weight=np.asarray(values, dtype=np.float32).reshape(shape),
        dequantized=qtype not in FLOAT_TYPES,
    )
