"""mlxlm-quant: quantization recipes and learned quantizers for mlxlm.

One :class:`QuantRecipe` (mode, bits, group size, per-layer rules, layers kept float; JSON
or YAML files; built-in mixed-bit presets) drives every method::

    from mlxlm_core import load
    from mlxlm_quant import QuantRecipe, calibration_windows, quantize, save_quantized

    model, tokenizer, config = load(return_config=True)
    recipe = QuantRecipe(bits=3, group_size=64)
    tokens = calibration_windows(tokenizer, num_samples=32, sequence_length=256)
    block = quantize(model, recipe, method="gptq", tokens=tokens)
    save_quantized("smollm-3bit", model, tokenizer, config, block, recipe=recipe, method="gptq")

Methods: ``rtn`` (round to nearest), ``awq``, ``gptq``, ``dwq`` (needs the ``dwq`` extra),
and :func:`dynamic_recipe` (per-layer widths for a bits-per-weight target). None of them
uses per-family tables: layers and their inputs are found by hooking the module tree.
"""

# mlxlm_core first: importing it puts the optimised BLAS under MLX before mlx.core loads.
import mlxlm_core  # noqa: F401  isort: skip

from ._awq import AWQConfig, awq_quantize
from ._calibration import BUILTIN_CALIBRATION_NAME, builtin_calibration_text, calibration_windows
from ._dwq import DWQConfig, dwq_quantize
from ._dynamic import bits_per_weight, dynamic_recipe, layer_sensitivities
from ._gptq import GPTQConfig, gptq_quantize
from ._output import save_quantized
from ._quantize import quantize
from ._recipe import PRESETS, LayerRule, QuantRecipe, preset, quantizable_layers

__version__ = "0.1.0"

__all__ = [
    "BUILTIN_CALIBRATION_NAME",
    "PRESETS",
    "AWQConfig",
    "DWQConfig",
    "GPTQConfig",
    "LayerRule",
    "QuantRecipe",
    "__version__",
    "awq_quantize",
    "bits_per_weight",
    "builtin_calibration_text",
    "calibration_windows",
    "dwq_quantize",
    "dynamic_recipe",
    "gptq_quantize",
    "layer_sensitivities",
    "preset",
    "quantizable_layers",
    "quantize",
    "save_quantized",
]
