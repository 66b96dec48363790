"""GGUF file → MLX model directory (config.json, safetensors, tokenizer files)."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as QType
from mlx.utils import tree_flatten
from mlxlm_core import CheckpointError, InvalidArgumentError
from mlxlm_core.models import get_model_classes
from tokenizers import Tokenizer

from ._arch import NON_PARAMETERS, ArchSpec, qk_heads, spec_for_gguf, unpermute_rows
from ._config import build_config
from ._reader import GGUFFile, open_gguf
from ._tensors import GROUP_SIZE, Converted, convert_tensor
from ._tokenizer import SpecialTokens, build_tokenizer, write_tokenizer_files

logger = logging.getLogger("mlxlm_gguf")
_BLOCK_TENSOR = re.compile(r"^blk\.\d+\.")

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# Above this many bytes the weights are split into shards, as Hugging Face and mlx-lm do.
SHARD_BYTES = 5 << 30


def importer_version() -> str:
    try:
        return importlib.metadata.version("mlxlm-gguf")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        return "unknown"


def _to_mx(a: np.ndarray, dtype: mx.Dtype | None) -> mx.array:
    arr = mx.array(a)
    return arr if dtype is None or arr.dtype == dtype else arr.astype(dtype)


def _convert_weights(
    f: GGUFFile, spec: ArchSpec, config: dict[str, Any], dtype: mx.Dtype
) -> tuple[dict[str, mx.array], dict[str, int | None], dict[str, str]]:
    """(weights by HF name, bits per module (None = float), dequantized module → type)."""
    weights: dict[str, mx.array] = {}
    module_bits: dict[str, int | None] = {}
    dequantized: dict[str, str] = {}
    for t in f.tensors:
        if t.name in NON_PARAMETERS:
            continue
        module, param = spec.hf_name(t.name)
        c: Converted = convert_tensor(t)
        arrays = {param: c.weight}
        if c.scales is not None and c.biases is not None:
            arrays |= {"scales": c.scales, "biases": c.biases}
        part = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        n_heads = qk_heads(
            part, n_heads=config["num_attention_heads"], n_kv_heads=config["num_key_value_heads"]
        )
        if spec.rope_interleaved and n_heads is not None:
            arrays = {k: unpermute_rows(v, n_heads) for k, v in arrays.items()}
        if spec.norm_offset and spec.is_norm(f"{module}.{param}") and c.bits is None:
            arrays[param] = arrays[param].astype(np.float32) - spec.norm_offset
        for k, v in arrays.items():
            # Packed uint32 weights stay as they are; every float goes to `dtype`.
            weights[f"{module}.{k}"] = _to_mx(v, None if v.dtype == np.uint32 else dtype)
        if param == "weight" and len(t.shape) >= 2:
            module_bits[module] = c.bits
        if c.dequantized:
            dequantized[module] = QType(t.tensor_type).name
    return weights, module_bits, dequantized


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the architecture `config` describes (nothing is allocated).

    MLX arrays are lazy: building the model only records shapes until something is
    evaluated, so this costs microseconds even for a large model.
    """
    model_cls, args_cls = get_model_classes(config["model_type"])
    try:
        model = model_cls(args_cls.from_dict(config))
        flat: list[tuple[str, mx.array]] = tree_flatten(model.parameters())  # type: ignore[assignment]
        return {k: tuple(v.shape) for k, v in flat}
    except Exception as e:  # whatever the architecture code says about impossible sizes
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"metadata describes no valid {config['model_type']} model ({msg})"
        ) from e
    finally:
        # Initialising parameters draws from MLX's global generator, lazily: evaluate its key
        # now, or every check leaves a longer chain of pending splits behind (the fuzz test
        # saw gigabytes after 10,000 checks).
        mx.eval(mx.random.state)


def check_tensor_shapes(f: GGUFFile, spec: ArchSpec, config: dict[str, Any]) -> None:
    """Every tensor named and shaped as the metadata's architecture needs, before any work."""
    # Count blocks from the tensor names first: a damaged block count must not make us
    # build (even lazily) a model of millions of layers.
    blocks = {int(t.name.split(".")[1]) for t in f.tensors if _BLOCK_TENSOR.match(t.name)}
    n = config["num_hidden_layers"]
    if len(blocks) != n or min(blocks, default=0) != 0 or max(blocks, default=-1) != n - 1:
        raise CheckpointError(
            f"{f.path}: the metadata says {config['num_hidden_layers']} blocks but the file "
            f"has tensors for {len(blocks)}"
        )
    expected = _expected_shapes(config)
    seen: set[str] = set()
    for t in f.tensors:
        if t.name in NON_PARAMETERS:
            continue
        module, param = spec.hf_name(t.name)
        name = f"{module}.{param}"
        shape = t.shape
        if name not in expected:
            raise CheckpointError(f"{f.path}: tensor {t.name} does not belong to this model")
        if shape != expected[name]:
            raise CheckpointError(
                f"{f.path}: tensor {t.name} has shape {list(shape)} but the metadata "
                f"implies {list(expected[name])}"
            )
        seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"{f.path}: missing tensors for {missing[:3]}")


def _quantization_block(module_bits: dict[str, int | None]) -> dict[str, Any] | None:
    """MLX's quantization config: the most common bit width, with per-module exceptions."""
    counts = Counter(b for b in module_bits.values() if b is not None)
    if not counts:
        return None
    bits = max(counts, key=lambda b: (counts[b], -b))
    block: dict[str, Any] = {"group_size": GROUP_SIZE, "bits": bits, "mode": "affine"}
    for module, b in sorted(module_bits.items()):
        if b is None:
            block[module] = False  # stored as floats: leave this layer unquantized
        elif b != bits:
            block[module] = {"group_size": GROUP_SIZE, "bits": b}
    return block


def _save_weights(weights: dict[str, mx.array], out: Path) -> None:
    total = sum(a.nbytes for a in weights.values())
    if total <= SHARD_BYTES:
        mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
        return
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for name in sorted(weights):
        if size and size + weights[name].nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = weights[name]
        size += weights[name].nbytes
    index: dict[str, Any] = {"metadata": {"total_size": total}, "weight_map": {}}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(out / fname), shard, metadata={"format": "mlx"})
        index["weight_map"] |= dict.fromkeys(shard, fname)
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


Parsed = tuple[ArchSpec, dict[str, Any], Tokenizer, SpecialTokens]


def parse_gguf(f: GGUFFile) -> Parsed:
    """Everything import needs from the metadata, validated: (spec, config, tokenizer, ids).

    No tensor data is read here (only the tensor records), so damaged metadata is
    reported before any slow work, and this is what the fuzz test exercises.
    """
    try:
        spec = spec_for_gguf(f.architecture, expert_count=int(f.arch_key("expert_count", 0) or 0))
        # Build the tokenizer first: an unsupported tokenizer should fail before slow work.
        tokenizer, special = build_tokenizer(f)
        tensors = {t.name: t for t in f.tensors}
        rope_tables = {
            name: np.asarray(convert_tensor(tensors[name]).weight, dtype=np.float32).reshape(-1)
            for name in NON_PARAMETERS
            if name in tensors
        }
        embed = tensors.get("token_embd.weight")
        vocab_size = (
            int(embed.shape[0]) if embed is not None else len(f.get("tokenizer.ggml.tokens"))
        )
        config = build_config(
            f, spec=spec, tensor_names=set(tensors), vocab_size=vocab_size, rope_tables=rope_tables
        )
        if len(special.eos_ids) > 1:
            config["eos_token_id"] = special.eos_ids
        check_tensor_shapes(f, spec, config)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError) as e:
        # Metadata of the wrong type or out of range (int("x"), a list where a number
        # belongs, ...): the file is damaged, say so in one line.
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{f.path}: malformed GGUF metadata ({msg})") from e
    return spec, config, tokenizer, special


def _build(f: GGUFFile, parsed: Parsed, out: Path, dtype_name: str) -> None:
    """Write every file of the imported model into `out` (an empty directory)."""
    spec, config, tokenizer, special = parsed
    weights, module_bits, dequantized = _convert_weights(f, spec, config, DTYPES[dtype_name])
    if quant := _quantization_block(module_bits):
        config["quantization"] = quant
        config["quantization_config"] = quant
    type_counts = Counter(QType(t.tensor_type).name for t in f.tensors)
    notes = []
    if dequantized:
        kinds = ", ".join(sorted(set(dequantized.values())))
        notes.append(
            f"{len(dequantized)} tensors of GGUF type {kinds} have no MLX equivalent and "
            f"were dequantized to {dtype_name}"
        )
    config["gguf_import"] = {
        "importer": f"mlxlm-gguf {importer_version()}",
        "source": f.path.name,
        "source_size": f.path.stat().st_size,
        "file_type": f.get("general.file_type"),
        "tensor_types": dict(sorted(type_counts.items())),
        "dequantized": dequantized,
        "dtype": dtype_name,
        "notes": notes,
    }
    for note in notes:
        logger.warning("%s: %s", f.path.name, note)

    _save_weights(weights, out)
    write_tokenizer_files(
        f,
        out,
        tokenizer=tokenizer,
        special=special,
        context_length=config["max_position_embeddings"],
    )
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def import_gguf(
    gguf_path: Path, out_dir: Path, *, dtype: str = "float32", overwrite: bool = False
) -> Path:
    """Convert a GGUF file into an MLX model directory and return that directory.

    Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 tensors stay quantized (MLX affine, group size 32, the
    file's own values); other quantized types are dequantized, which config.json's "gguf_import"
    block records. Scales, biases and float tensors are stored as `dtype`: float32 by
    default because MLX's CPU backend runs it ~30x faster than float16.

    The directory appears complete or not at all: it is built in a temporary directory
    next to `out_dir` and renamed into place. An existing `out_dir` is replaced only with
    `overwrite=True`.
    """
    if dtype not in DTYPES:
        raise InvalidArgumentError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise InvalidArgumentError(
            f"{out_dir} already exists (use --overwrite, or overwrite=True, to replace it)"
        )
    f = open_gguf(Path(gguf_path))
    parsed = parse_gguf(f)  # every metadata problem surfaces here, before anything is written
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        _build(f, parsed, tmp, dtype)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary directory
        _publish(tmp, out_dir, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _publish(tmp: Path, out_dir: Path, *, overwrite: bool) -> None:
    """Rename the finished directory into place (replacing an old one when asked)."""
    old: Path | None = None
    if overwrite and out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
        os.rmdir(old)
        out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except OSError as e:
        if old is not None:
            old.rename(out_dir)
        if out_dir.exists():  # another process finished the same import first
            raise InvalidArgumentError(f"{out_dir} already exists") from e
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
