"""GGUF tensors → MLX arrays: names, layouts and quantized blocks.

Q4_0, Q4_1 and Q8_0 blocks hold 32 values with one float16 scale (and for Q4_1 a float16
minimum) each, which is exactly MLX's affine quantization with group size 32: every
block becomes one group of a (weight, scales, biases) triple, bit for bit the values the
file describes, the same triple `mx.load` produces for such a tensor. Re-quantizing instead
would add 8–11 % weight error (MLX anchors its grid differently). Every other type is
dequantized with the `gguf` package's reference code and stored as a float tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType
from mlxlm_core import CheckpointError, UnsupportedError

GROUP_SIZE = 32
# GGUF types kept as MLX affine triples, with their bit width.
KEPT_BITS: dict[QType, int] = {QType.Q4_0: 4, QType.Q4_1: 4, QType.Q8_0: 8}
# Types that are plain floats in the file (stored, not "dequantized").
FLOAT_TYPES = {QType.F32, QType.F16, QType.BF16, QType.F64}

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^([a-z_]+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> tuple[str, str]:
    """Map a llama GGUF tensor name to (HF module path, parameter) or raise UnsupportedError.

    `rope_freqs.weight` is not a parameter (it encodes rope scaling) and is handled by the
    config builder; callers filter it out before asking.
    """
    if m := _BLOCK_RE.match(gguf_name):
        layer, part, param = m.groups()
        if part in _BLOCK_NAMES:
            return f"model.layers.{layer}.{_BLOCK_NAMES[part]}", param
        if part.endswith("_exps") or part == "ffn_gate_inp":
            raise UnsupportedError(
                f"mixture-of-experts llama GGUF files are not supported yet ({gguf_name})"
            )
    elif (m := _GLOBAL_RE.match(gguf_name)) and m.group(1) in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[m.group(1)], m.group(2)
    raise UnsupportedError(f"unexpected tensor {gguf_name!r} in a llama GGUF file")


@dataclass
class Converted:
    """One tensor in MLX form: a float array, or an affine triple when `bits` is set."""

    weight: np.ndarray
    scales: np.ndarray | None = None
    biases: np.ndarray | None = None
    bits: int | None = None
    dequantized: bool = False


def _split_blocks(raw: np.ndarray, qtype: QType) -> tuple[np.ndarray, int]:
    """View a (rows…, bytes) uint8 tensor as (rows, blocks, block_bytes)."""
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    rows = int(np.prod(raw.shape[:-1])) if raw.ndim > 1 else 1
    return np.ascontiguousarray(raw).reshape(rows, -1, block_bytes), rows


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte `start` of every block, widened (exactly) to float32."""
    return (
        np.ascontiguousarray(blocks[..., start : start + 2])
        .view(np.float16)[..., 0]
        .astype(np.float32)
    )


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """(rows, blocks, 32) values in 0..15 → (rows, blocks*4) uint32, MLX's 4-bit layout.

    MLX stores element j of each 8-element word in bits 4j..4j+3; on a little-endian
    machine that is two elements per byte, low nibble first, bytes in order.
    """
    v = values.astype(np.uint8)
    packed = (v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(packed).view("<u4").reshape(packed.shape[0], -1)


def _quantized_triple(raw: np.ndarray, qtype: QType, shape: tuple[int, ...]) -> Converted:
    blocks, rows = _split_blocks(raw, qtype)
    d = _f16(blocks, 0)
    if qtype == QType.Q8_0:
        # w = d * q with q int8; MLX 8-bit affine stores u = q + 128 and bias = -128 d.
        q = blocks[..., 2:34].view(np.int8).astype(np.int16) + 128
        packed = np.ascontiguousarray(q.astype(np.uint8)).view("<u4").reshape(rows, -1)
        biases = -128.0 * d
    else:
        start = 2 if qtype == QType.Q4_0 else 4
        qs = blocks[..., start : start + 16]
        # Within a block, byte i holds element i (low nibble) and element i + 16 (high).
        values = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
        packed = _pack_nibbles(values)
        biases = -8.0 * d if qtype == QType.Q4_0 else _f16(blocks, 2)
    lead = shape[:-1]
    return Converted(
        weight=packed.reshape(*lead, -1),
        scales=d.reshape(*lead, -1),
        biases=biases.reshape(*lead, -1),
        bits=KEPT_BITS[qtype],
    )


def convert_tensor(t: gguf.ReaderTensor) -> Converted:
    """Convert one GGUF tensor record; the logical shape is GGUF's dims reversed."""
    qtype = QType(t.tensor_type)
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
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


def unpermute_rows(a: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's rope permutation of a Q or K projection (rows only).

    llama.cpp's converter interleaves each head's rows pairwise (row p*half + i of a head
    goes to 2i + p) so its kernels can use the "traditional" rope. Viewing each head as
    (half, 2) rows and swapping gives back the Hugging Face order. Only whole rows move,
    so this applies equally to packed quantized weights, their scales and their biases.
    """
    rows = a.shape[0]
    if rows % (2 * n_heads):
        raise CheckpointError(f"cannot split {rows} rows into {n_heads} rope heads")
    half = rows // n_heads // 2
    return a.reshape(n_heads, half, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
