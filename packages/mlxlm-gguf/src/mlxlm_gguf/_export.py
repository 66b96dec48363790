"""MLX model + tokenizer -> one GGUF v3 file that llama.cpp runs (export direction)."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as QType
from mlx.utils import tree_flatten
from mlxlm_core import InvalidArgumentError, UnsupportedError
from mlxlm_core.adapters import AdapterLayer

from ._arch import ArchSpec, permute_rows, qk_heads, spec_for_model_type, unpermute_rows
from ._encode import OUT_TYPES, Encoded, Quantized, Source, describe, encode
from ._metadata import hyperparameters
from ._vocab import vocab_from_tokenizer, write_vocab

logger = logging.getLogger("mlxlm_gguf")

_FILE_TYPES = {
    QType.F32: gguf.LlamaFileType.ALL_F32,
    QType.F16: gguf.LlamaFileType.MOSTLY_F16,
    QType.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    QType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    QType.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    QType.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    QType.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0,
    QType.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
}


@dataclass
class ExportReport:
    """What :func:`export` wrote, and what it had to change to write it."""

    path: Path
    architecture: str
    model_type: str
    out_type: str
    file_type: str
    tensor_types: dict[str, int]
    kept: list[str] = field(default_factory=list)  # quantized tensors copied block for block
    requantized: list[str] = field(default_factory=list)  # quantized tensors re-quantized
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _numpy(a: mx.array) -> np.ndarray:
    if a.dtype in (mx.uint32, mx.uint8):
        return np.array(a)
    return np.array(a.astype(mx.float32))


def _sources(model: Any) -> dict[str, Source]:
    """Every parameter by HF path; a quantized module's triple under its `.weight` path."""
    if any(isinstance(m, AdapterLayer) for _, m in model.named_modules()):
        raise UnsupportedError(
            "the model carries unfused LoRA/DoRA adapters; fuse them first "
            "(mlxlm_core.adapters.fuse_adapters, or `mlxlm gguf export --adapter-path`)"
        )
    params = dict(tree_flatten(model.parameters()))
    out: dict[str, Source] = {}
    taken: set[str] = set()
    for path, module in model.named_modules():
        if not (isinstance(module.get("scales"), mx.array) and hasattr(module, "bits")):
            continue
        biases = module.get("biases")
        out[f"{path}.weight"] = Quantized(
            weight=_numpy(module["weight"]),
            scales=_numpy(module["scales"]),
            biases=None if biases is None else _numpy(biases),
            group_size=int(module.group_size),
            bits=int(module.bits),
            mode=str(getattr(module, "mode", "affine")),
        )
        taken |= {f"{path}.weight", f"{path}.scales", f"{path}.biases"}
    for name, value in params.items():
        if name not in taken:
            out[name] = _numpy(value)
    return out


def _rope_layout(spec: ArchSpec, args: Any):  # type: ignore[no-untyped-def]
    """The row reordering Q/K need: our rope layout -> the one llama.cpp uses for `spec`."""
    traditional = bool(getattr(args, "rope_traditional", False))
    if spec.rope_interleaved and not traditional:
        return permute_rows
    if not spec.rope_interleaved and traditional:
        return unpermute_rows
    return None


def _model_type(model: Any) -> str:
    model_type = getattr(model, "model_type", None) or getattr(
        getattr(model, "args", None), "model_type", None
    )
    if not isinstance(model_type, str):
        raise InvalidArgumentError("export needs an mlxlm model (with a model_type)")
    return model_type


def _encode_all(
    model: Any, spec: ArchSpec, out_type: str, n_heads: int, n_kv_heads: int
) -> tuple[dict[str, Encoded], dict[str, Source]]:
    layout = _rope_layout(spec, model.args)
    encoded: dict[str, Encoded] = {}
    sources = _sources(model)
    for hf_path, src in sources.items():
        name = spec.gguf_name(hf_path)
        part = name.split(".")[2] if name.startswith("blk.") else ""
        heads = qk_heads(part, n_heads=n_heads, n_kv_heads=n_kv_heads)
        if spec.norm_offset and spec.is_norm(hf_path) and not isinstance(src, Quantized):
            src = src + spec.norm_offset
        if layout is not None and heads is not None:
            src = (
                src.take_rows(lambda a, h=heads: layout(a, h))
                if isinstance(src, Quantized)
                else layout(src, heads)
            )
        encoded[name] = encode(name, src, out_type)
    return encoded, sources


def _report_notes(report: ExportReport, sources: dict[str, Source], enc: dict[str, Any]) -> None:
    def kinds(names: list[str]) -> str:
        pairs = Counter(
            (describe(src), enc[n].qtype.name)
            for n in names
            if isinstance(src := sources.get(n), Quantized)
        )
        return "; ".join(f"{n} x {src} -> {dst}" for (src, dst), n in sorted(pairs.items()))

    if report.kept:
        report.notes.append(
            f"{len(report.kept)} quantized tensors written block for block, values unchanged "
            f"up to float16 scales ({kinds(report.kept)})"
        )
    if report.requantized:
        report.notes.append(
            f"{len(report.requantized)} quantized tensors re-quantized because the GGUF grid "
            f"differs from MLX's ({kinds(report.requantized)})"
        )


def export(
    model: Any,
    tokenizer: Any,
    path: str | Path,
    *,
    out_type: str = "auto",
    overwrite: bool = False,
    pre_tokenizer: str | None = None,
    name: str | None = None,
) -> ExportReport:
    """Write `model` and `tokenizer` as a GGUF file at `path` that llama.cpp loads.

    `out_type`: ``auto`` keeps float matrices as F16 and writes MLX-quantized layers as the
    closest GGUF type (block for block when the grids agree, re-quantized otherwise; the
    report says which); ``f32``/``f16``/``bf16`` write every matrix in that float type;
    ``q8_0``/``q4_0``/``q4_1``/``q5_0``/``q5_1`` quantize every matrix to that type. Norms,
    biases and MoE routers stay F32, as llama.cpp's own converter writes them.

    `pre_tokenizer` names llama.cpp's pre-tokenizer when the tokenizer's own split is not
    one we recognise. The file appears complete or not at all (written to a temporary file
    next to `path`, then renamed); an existing file is replaced only with `overwrite=True`.
    """
    start = time.perf_counter()
    if out_type not in OUT_TYPES:
        raise InvalidArgumentError(
            f"out_type must be one of {', '.join(OUT_TYPES)}, not {out_type!r}"
        )
    path = Path(path)
    if path.exists() and not overwrite:
        raise InvalidArgumentError(f"{path} already exists (use --overwrite to replace it)")
    if path.is_dir():
        raise InvalidArgumentError(f"{path} is a directory; give a .gguf file path")
    model_type = _model_type(model)
    spec = spec_for_model_type(model_type)
    args = model.args
    vocab_size = int(args.vocab_size)
    hp = hyperparameters(args, spec, vocab_size=vocab_size)
    vocab = vocab_from_tokenizer(tokenizer, vocab_size=vocab_size, pre_tokenizer=pre_tokenizer)
    encoded, sources = _encode_all(model, spec, out_type, hp.n_heads, hp.n_kv_heads)
    for tname, values in hp.extra_tensors.items():
        encoded[tname] = Encoded(values.astype(np.float32), QType.F32)

    matrices = Counter(e.qtype for e in encoded.values() if e.data.ndim >= 2)
    main_type = matrices.most_common(1)[0][0] if matrices else QType.F32
    file_type = _FILE_TYPES.get(main_type, gguf.LlamaFileType.GUESSED)
    report = ExportReport(
        path=path,
        architecture=spec.gguf_arch,
        model_type=model_type,
        out_type=out_type,
        file_type=file_type.name,
        tensor_types=dict(sorted(Counter(e.qtype.name for e in encoded.values()).items())),
        kept=[n for n, e in encoded.items() if e.note == "kept"],
        requantized=[n for n, e in encoded.items() if e.note == "re-quantized"],
    )
    gguf_sources = {spec.gguf_name(k): v for k, v in sources.items()}
    _report_notes(report, gguf_sources, encoded)
    report.notes += hp.notes
    fallback = [n for n, e in encoded.items() if e.note == "row not a multiple of 32"]
    if fallback:
        report.notes.append(f"{len(fallback)} tensors written as F16: rows not a multiple of 32")

    general_name = _file_name(name or _default_name(tokenizer, spec), vocab.tokens, report)

    def fill(w: gguf.GGUFWriter) -> None:
        w.add_name(general_name)
        w.add_file_type(int(file_type))
        if any(e.qtype not in (QType.F32, QType.F16, QType.BF16) for e in encoded.values()):
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for suffix, value in hp.keys.items():
            _add_key(w, f"{spec.gguf_arch}.{suffix}", value)
        write_vocab(w, vocab)
        for tname, e in encoded.items():
            raw = None if e.qtype in (QType.F32, QType.F16) else e.qtype
            w.add_tensor(tname, e.data, raw_dtype=raw)

    _write_atomically(path, spec.gguf_arch, fill)
    report.seconds = time.perf_counter() - start
    for note in report.notes:
        logger.warning("%s: %s", path.name, note)
    return report


def _add_key(w: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    else:
        w.add_string(key, str(value))


def _default_name(tokenizer: Any, spec: ArchSpec) -> str:
    source = getattr(getattr(tokenizer, "tokenizer", tokenizer), "name_or_path", "") or ""
    return Path(str(source)).name or spec.model_type


_PHI3_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def _file_name(name: str, tokens: list[str], report: ExportReport) -> str:
    """`general.name`, minus a trigger that would crash llama.cpp on this vocabulary.

    llama.cpp adjusts four Phi-3 tokens by text whenever the name contains "phi3" or
    "phi-3", and aborts loading if one is missing from the vocabulary.
    """
    lowered = name.lower()
    if ("phi3" in lowered or "phi-3" in lowered) and not set(_PHI3_TOKENS) <= set(tokens):
        safe = lowered.replace("phi-3", "phi").replace("phi3", "phi")
        report.notes.append(
            f"general.name {name!r} written as {safe!r}: llama.cpp expects Phi-3's own "
            f"tokens ({', '.join(_PHI3_TOKENS)}) in a model named so, and this vocabulary lacks them"
        )
        return safe
    return name


def _write_atomically(path: Path, arch: str, fill: Any) -> None:
    """Write through a temporary file in the target's directory, then rename into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        w = gguf.GGUFWriter(tmp, arch)
        fill(w)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
