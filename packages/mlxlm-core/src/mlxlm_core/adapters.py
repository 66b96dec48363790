"""LoRA / DoRA adapters for inference, in MLX-LM's adapter format.

An adapter directory holds ``adapter_config.json`` and ``adapters.safetensors``; files
written by MLX-LM load here and files written here load in MLX-LM::

    from mlxlm_core import load
    model, tokenizer = load("path/to/base", adapter_path="path/to/adapter")

or, on a model already loaded, :func:`load_adapters`. Adapters are module swaps: each
adapted layer is replaced by a wrapper (:class:`LoRALinear`, :class:`DoRALinear`,
:class:`LoRAEmbedding`, :class:`DoRAEmbedding`, :class:`LoRASwitchLinear`) that keeps the
original layer under ``linear`` / ``embedding``. mlxlm-tune trains these same layers
(:func:`apply_lora_layers`) and merges them (:func:`fuse_adapters`).
"""

from ._adapters_apply import (
    ADAPTER_PARAMETER_NAMES,
    adapter_parameters,
    apply_lora_layers,
    fuse_adapters,
    linear_to_lora_layers,
    remove_adapters,
)
from ._adapters_files import FINE_TUNE_TYPES, AdapterConfig, load_adapters, save_adapters
from ._adapters_layers import (
    AdapterLayer,
    DoRAEmbedding,
    DoRALinear,
    LoRAEmbedding,
    LoRALinear,
    LoRASwitchLinear,
)

__all__ = [
    "ADAPTER_PARAMETER_NAMES",
    "FINE_TUNE_TYPES",
    "AdapterConfig",
    "AdapterLayer",
    "DoRAEmbedding",
    "DoRALinear",
    "LoRAEmbedding",
    "LoRALinear",
    "LoRASwitchLinear",
    "adapter_parameters",
    "apply_lora_layers",
    "fuse_adapters",
    "linear_to_lora_layers",
    "load_adapters",
    "remove_adapters",
    "save_adapters",
]
