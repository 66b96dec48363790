"""How MLX's CUDA backend batches kernels into CUDA graphs, set before its first kernel.

MLX records kernels into a CUDA graph and launches it once the graph holds more than
``MLX_MAX_OPS_PER_BUFFER`` kernels (30 on Hopper) or its inputs more than
``MLX_MAX_MB_PER_BUFFER`` megabytes (400). Every launch costs host time (updating and launching
the graph). Decoding reads all the weights every step, so a Llama-3.2-1B step (2.5 GB, ~130
kernels with the fused blocks) was cut into ~10 graphs; 2-3 per step ran faster on H100 and
H200 (BENCHMARKS.md). More operations per graph hold more of a prefill's temporaries alive
until the graph completes: 400 ran bfloat16 decoding faster still but raised peak memory
0.15 GB over MLX-LM's, and 100 left batch-1 peaks level with MLX-LM's (0.5 MB over in some
runs), while 64 (the setting) kept them 1-4% under in every run; once the decode step wrote
the cache in place, 64 and 100 decoded at the same speed within the machines' noise.
MLX reads the two variables once, when its first CUDA stream starts,
so they are set when mlxlm_core is imported, only where the user has not set them, and only
with the CUDA backend. ``MLXLM_CUDA_GRAPH_LIMITS=0`` leaves MLX's defaults.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

import mlx.core as mx

__all__ = ["GRAPH_LIMITS", "configure_graph_limits"]

GRAPH_LIMITS = {"MLX_MAX_OPS_PER_BUFFER": "64", "MLX_MAX_MB_PER_BUFFER": "10000"}
OPT_OUT = "MLXLM_CUDA_GRAPH_LIMITS"


def _cuda_available() -> bool:
    cuda = getattr(mx, "cuda", None)
    return bool(cuda is not None and cuda.is_available())


def configure_graph_limits(
    environ: MutableMapping[str, str] | None = None, *, cuda: bool | None = None
) -> dict[str, str]:
    """Set the graph limits that are not set yet; returns what was set.

    ``environ`` and ``cuda`` default to the process's (tests pass their own).
    """
    env = os.environ if environ is None else environ
    if (cuda if cuda is not None else _cuda_available()) is False:
        return {}
    if env.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return {}
    changed = {k: v for k, v in GRAPH_LIMITS.items() if k not in env}
    env.update(changed)
    return changed
