"""Backend-aware execution policy: dtypes, how quantized weights are multiplied, chunk sizes.

One place decides, per backend, what MLX-LM leaves to the checkpoint. Measured on MLX's
Linux CPU backend (BENCHMARKS.md, DESIGN.md §8):

- half precision is 20-40x slower than float32 there (a 4-bit matrix-vector product runs
  ~2-3 GFLOP/s with float32 activations, ~0.05 with float16), so every floating parameter
  (weights, quantization scales and biases, norms) becomes float32 and activations follow;
- MLX's quantized kernels run on one core at ~2-3 GFLOP/s for one row *and* for many, while
  a float32 matmul goes to the BLAS (see :mod:`._blas`): ~100 GFLOP/s and ~24 GB/s for a
  matrix-vector product with MKL. Dequantizing a layer costs about one quantized
  matrix-vector product, so any input of two or more rows (prompt chunks, batches) is
  faster dequantized on the fly, and when the BLAS is optimised a resident float32 copy
  of the quantized weights makes decoding ~4x faster at ~5x the weight memory. The copy is
  kept when it fits a memory budget (``dense_budget_fraction`` of physical memory);
- a one-row product (decoding one sequence) written with MLX's compiled elementwise kernels
  and the BLAS (:mod:`._quant_matvec`, ``matvec="planes"``) runs 3-4x faster than MLX's
  quantized kernel on the packed weights as they are, so on CPU ``auto`` now keeps the
  weights packed (``quantized``: MLX-LM's memory) and decodes with it (1-2 rows); batches
  of 3-128 rows dequantize ~1 MB of rows at a time with contiguous compiled kernels into
  the BLAS (:mod:`._quant_matmul`: 1.6-2.7x the previous per-layer dequantization at 4-32
  rows, 3-12x MLX-LM's step), longer prompt chunks dequantize whole layers; the dense copy
  stays an explicit choice (fastest, ~5x the weight memory). It needs MLX's CPU JIT
  compiler (g++); without it, the previous rule applies (dense copy if an optimised BLAS is
  loaded and it fits);
- on CPU, glibc's malloc is told to keep freed buffers in the heap (:mod:`._malloc`): MLX
  allocates every temporary with malloc, and glibc's defaults mapped and zero-filled the
  few-MB buffers of each decoding step anew (~40% of a step's CPU time with the planes);
- on CPU, ropes and RMS norms (no MLX CPU kernel: ~29 and ~11 graph nodes per call, each
  scheduled from the Python thread) become :mod:`._cpu_layers`' stand-ins: one rotation
  table per decoding step shared by all layers, fused norms; the ``native`` mode keeps
  MLX-LM's execution throughout (MLX's kernels, glibc's defaults, MLX's rope and norm);
- on GPU backends (CUDA, Metal) the checkpoint's dtype and MLX's quantized kernels stay,
  as in MLX-LM; a CUDA- or Metal-specific choice belongs in ``_BACKENDS`` with its numbers;
- on CUDA, decoding one sequence is bound by MLX's per-operation host cost (~5 us each,
  ~450 per Llama-3.2-1B step) more than by memory: llama-style blocks in bfloat16/float16
  and 4-bit switch to fused one-row kernels (:mod:`._cuda_layers`, ~9 operations per block
  instead of ~25) - ``decode_kernels="fused"``. Prompts and batches keep MLX's matmuls.

Overrides: ``load(..., dtype=..., weight_mode=...)``, the CLI's ``--dtype`` / ``--weight-mode``,
``choose_policy(decode_kernels="mlx", matvec="mlx")``, the environment's ``MLXLM_MATVEC``
(``mlx`` or ``planes``), ``MLXLM_DECODE_KERNELS`` (``mlx`` or ``fused``) and ``MLXLM_MALLOC=off``.
``mlxlm generate --verbose`` prints :meth:`ExecutionPolicy.describe`.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ._blas import blas_info
from ._cuda_env import configure_graph_limits
from ._errors import InvalidArgumentError, UnsupportedError
from ._malloc import keep_heap
from ._policy_layers import (
    PLANE_ROWS,
    WIDE_MAX_ROWS,
    convert_quantized_layers,
    dense_bytes,
    dense_copies,
)

__all__ = [
    "DECODE_KERNELS",
    "DTYPES",
    "MATVECS",
    "WEIGHT_MODES",
    "ExecutionPolicy",
    "apply_policy",
    "choose_policy",
    "current_backend",
    "dense_copies",
    "prefill_step_for",
]

# Before MLX's first CUDA kernel: the limits are read once per process (see _cuda_env).
configure_graph_limits()

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

# How quantized weights are multiplied:
#   native     MLX's quantized kernels for every product (MLX-LM's behaviour)
#   quantized  packed weights only; inputs of >= dequantize_rows rows dequantize on the fly
#   dense      a resident float copy beside the packed weights; every product is a float matmul
WEIGHT_MODES = ("auto", "native", "quantized", "dense")

# How one-row decode steps run: "mlx" (MLX's ops, as MLX-LM) or "fused" (CUDA kernels of ours)
DECODE_KERNELS = ("auto", "mlx", "fused")
DECODE_KERNELS_ENV = "MLXLM_DECODE_KERNELS"  # overrides "auto"

# How a "quantized" layer multiplies one row: "mlx" (MLX's quantized kernel) or "planes"
# (:mod:`._quant_matvec`, CPU only). MLXLM_MATVEC in the environment overrides "auto".
MATVECS = ("auto", "mlx", "planes")
MATVEC_ENV = "MLXLM_MATVEC"


@dataclass(frozen=True)
class _BackendDefaults:
    dtype: str | None  # None keeps the checkpoint's dtype
    weight_mode: str  # the weight mode when no memory or BLAS condition applies
    dequantize_rows: int | None
    prefill_step_size: int
    decode_kernels: str = "mlx"


# Per backend. CPU and CUDA numbers: BENCHMARKS.md. Metal keeps MLX-LM's choices until measured.
_BACKENDS = {
    "cpu": _BackendDefaults("float32", "quantized", 2, 512),
    "cuda": _BackendDefaults(None, "native", None, 2048, decode_kernels="fused"),
    "metal": _BackendDefaults(None, "native", None, 2048),
}

# A dense float copy is kept only if it takes at most this share of physical memory.
DENSE_BUDGET_FRACTION = 0.25


@dataclass(frozen=True)
class ExecutionPolicy:
    """How a loaded model runs on this backend; ``describe()`` is what ``--verbose`` prints."""

    backend: str  # "cpu", "cuda" or "metal"
    dtype: str | None  # floating parameters (and so activations); None keeps the checkpoint's
    weight_mode: str  # "native", "quantized" or "dense" (see WEIGHT_MODES)
    dequantize_rows: int | None  # "quantized": inputs with this many rows dequantize on the fly
    prefill_step_size: int  # prompt tokens per prefill chunk
    blas: str  # what serves float32 matmuls on the CPU
    reason: str
    dense_bytes: int = 0  # memory of the dense copies, once applied
    decode_kernels: str = "mlx"  # "mlx" or "fused" (see DECODE_KERNELS)
    fused_layers: int = 0  # blocks running the fused kernels, once applied
    matvec: str = "mlx"  # "quantized": how one row multiplies, "mlx" or "planes" (see MATVECS)
    malloc: str = "default"  # CPU: glibc's heap settings (see _malloc), once applied
    cpu_layers: str = "none"  # CPU: ropes / RMS norms run by _cpu_layers' stand-ins, once applied

    def describe(self) -> str:
        dtype = self.dtype or "checkpoint dtype"
        mode = self.weight_mode
        if self.weight_mode == "quantized" and self.matvec == "planes":
            mode += (
                f" (plane kernel for 1-{PLANE_ROWS - 1} rows, chunked dequantization up to "
                f"{WIDE_MAX_ROWS}, whole layers beyond)"
            )
        elif self.weight_mode == "quantized" and self.dequantize_rows:
            mode += f" (dequantized on the fly for >= {self.dequantize_rows} rows)"
        if self.weight_mode == "dense" and self.dense_bytes:
            mode += f" (+{self.dense_bytes / 1e6:.0f} MB float copy)"
        decode = self.decode_kernels
        if decode == "fused":
            decode += f" ({self.fused_layers} blocks)"
        cpu = ""
        if self.backend == "cpu":
            cpu = f"matvec={self.matvec} cpu_layers={self.cpu_layers} malloc={self.malloc} "
        return (
            f"backend={self.backend} dtype={dtype} weight_mode={mode} "
            f"prefill_step={self.prefill_step_size} decode={decode} {cpu}blas={self.blas} "
            f"[{self.reason}]"
        )


def prefill_step_for(model: nn.Module) -> int:
    """Prompt tokens per prefill chunk for ``model``: its policy's, else MLX-LM's 2048."""
    policy = getattr(model, "policy", None)
    return policy.prefill_step_size if isinstance(policy, ExecutionPolicy) else 2048


def current_backend() -> str:
    if mx.default_device() != mx.gpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    return "cuda"


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def choose_policy(
    dtype: str = "auto",
    weight_mode: str = "auto",
    *,
    model: nn.Module | None = None,
    decode_kernels: str = "auto",
    matvec: str = "auto",
) -> ExecutionPolicy:
    """``auto`` picks per backend; an explicit dtype (or ``keep``), weight mode or decode
    kernel choice overrides it.

    ``model`` (quantized layers still packed) sizes the dense copy against the memory budget.
    """
    if dtype != "auto" and dtype != "keep" and dtype not in DTYPES:
        raise InvalidArgumentError(f"dtype must be auto, keep, {', '.join(DTYPES)}; got {dtype!r}")
    if weight_mode not in WEIGHT_MODES:
        raise InvalidArgumentError(
            f"weight_mode must be one of {', '.join(WEIGHT_MODES)}; got {weight_mode!r}"
        )
    if matvec == "auto":
        matvec = os.environ.get(MATVEC_ENV, "auto").lower() or "auto"
    if matvec not in MATVECS:
        raise InvalidArgumentError(f"matvec must be one of {', '.join(MATVECS)}; got {matvec!r}")
    if decode_kernels == "auto":
        decode_kernels = os.environ.get(DECODE_KERNELS_ENV, "auto").lower() or "auto"
    if decode_kernels not in DECODE_KERNELS:
        raise InvalidArgumentError(
            f"decode_kernels must be one of {', '.join(DECODE_KERNELS)}; got {decode_kernels!r}"
        )
    backend = current_backend()
    defaults = _BACKENDS[backend]
    decode = defaults.decode_kernels if decode_kernels == "auto" else decode_kernels
    if decode == "fused" and backend != "cuda":
        raise UnsupportedError(f"decode_kernels='fused' needs the CUDA backend, not {backend}")
    blas = blas_info()
    reasons = []
    if dtype == "auto":
        chosen_dtype = defaults.dtype
        if backend == "cpu":
            reasons.append("float32: CPU half-precision kernels are 20-40x slower")
    else:
        chosen_dtype = None if dtype == "keep" else dtype
        reasons.append(f"dtype={dtype} requested")
    planes = backend == "cpu" and matvec != "mlx" and _cpu_jit_available()
    if matvec == "planes" and not planes:
        raise UnsupportedError("matvec='planes' needs the CPU backend and g++ (MLX's CPU JIT)")
    # auto: only where the kernel serves the model (else the dense-or-quantized rule below)
    planes_fit = planes and (chosen_dtype or _scales_dtype(model) or "float32") == "float32"
    planes_fit = planes_fit and _planes_serve(model)
    mode = weight_mode
    if weight_mode == "auto":
        mode = defaults.weight_mode
        if backend == "cpu" and planes_fit:
            reasons.append(
                "quantized: packed weights (MLX-LM's memory), one-row products by the plane "
                "kernel (3-4x MLX's), batches and prompts dequantized in chunks into the BLAS"
            )
        elif backend == "cpu":
            mode, why = _dense_or_quantized(blas.optimised, model, chosen_dtype)
            reasons.append(why)
    else:
        reasons.append(f"weight_mode={weight_mode} requested")
    return ExecutionPolicy(
        backend=backend,
        dtype=chosen_dtype,
        weight_mode=mode,
        dequantize_rows=(defaults.dequantize_rows or 2) if mode == "quantized" else None,
        prefill_step_size=defaults.prefill_step_size,
        blas=blas.name,
        reason="; ".join(reasons) or "backend defaults",
        decode_kernels=decode,
        matvec="planes" if planes and mode == "quantized" else "mlx",
    )


def _cpu_jit_available() -> bool:
    """MLX builds compiled CPU kernels with g++ on Linux (the plane kernel needs them)."""
    return sys.platform == "linux" and shutil.which("g++") is not None


def _planes_serve(model: nn.Module | None) -> bool:
    """Whether every quantized layer of ``model`` is one the plane kernel multiplies."""
    for layer in model.modules() if model is not None else []:
        if isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            mode = getattr(layer, "mode", "affine")
            if mode != "affine" or layer.bits not in (2, 4, 8) or layer.group_size % 4:
                return False
    return True


def _dense_or_quantized(
    fast_blas: bool, model: nn.Module | None, dtype: str | None
) -> tuple[str, str]:
    if not fast_blas:
        return "quantized", "no optimised BLAS: a dense copy would not pay for its memory"
    if (dtype or _scales_dtype(model)) not in ("float32", None):
        return "quantized", "dense copies pay only in float32 (the BLAS's dtype)"
    itemsize = DTYPES[dtype].size if dtype else 4
    need = dense_bytes(model, itemsize) if model is not None else 0
    budget = (_physical_memory() or 0) * DENSE_BUDGET_FRACTION
    if need > budget:
        return "quantized", (
            f"a dense copy ({need / 1e9:.1f} GB) exceeds {DENSE_BUDGET_FRACTION:.0%} of memory"
        )
    return "dense", "dense copy: the optimised BLAS beats MLX's quantized kernels ~4x"


def _scales_dtype(model: nn.Module | None) -> str | None:
    """The dtype quantized layers compute in when the checkpoint's dtype is kept."""
    for layer in model.modules() if model is not None else []:
        if isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            return str(layer["scales"].dtype).removeprefix("mlx.core.")
    return None


def apply_policy(model: nn.Module, policy: ExecutionPolicy) -> ExecutionPolicy:
    """Cast floating parameters and set how quantized layers multiply, in place.

    Returns the policy with the memory of the dense copies filled in. The copies stay lazy
    like the parameters: loading evaluates both (see :func:`dense_copies`).
    """
    if policy.dtype is not None:
        target = DTYPES[policy.dtype]
        flat: list[tuple[str, mx.array]] = tree_flatten(model.parameters())  # type: ignore[assignment]
        changed = [
            (name, value.astype(target))
            for name, value in flat
            if mx.issubdtype(value.dtype, mx.floating) and value.dtype != target
        ]
        if changed:
            model.update(tree_unflatten(changed))
    from ._cuda_layers import convert_decode_layers  # imports the model zoo: not at import

    convert_decode_layers(model, enabled=False)  # MLX's classes back before the weight mode
    dense = policy.weight_mode == "dense"
    convert_quantized_layers(
        model,
        dense=dense,
        dequantize_rows=policy.dequantize_rows,
        matvec=policy.matvec == "planes",
    )
    total = sum(c.nbytes for c in dense_copies(model))
    cpu_tuned = policy.backend == "cpu" and policy.weight_mode != "native"
    malloc = keep_heap() if cpu_tuned else "default"
    cpu_layers = "none"
    if policy.backend == "cpu":
        from ._cpu_layers import convert_cpu_layers  # imports models.rope: not at import

        counts = convert_cpu_layers(model, enabled=cpu_tuned)
        if any(counts.values()):
            cpu_layers = f"{counts['rope']} shared ropes, {counts['rms_norm']} fused norms"
    fused = convert_decode_layers(model, enabled=policy.decode_kernels == "fused")
    return ExecutionPolicy(
        **{
            **policy.__dict__,
            "dense_bytes": total,
            "fused_layers": fused,
            "malloc": malloc,
            "cpu_layers": cpu_layers,
        }
    )
