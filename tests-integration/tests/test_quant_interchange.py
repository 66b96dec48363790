"""Quantized models move both ways between mlxlm and MLX-LM with identical logits, and the
learned quantizers run on every architecture core supports (no per-family tables).

For each tiny architecture (conftest's TINY_CONFIGS): our RTN, AWQ and GPTQ output is read
by MLX-LM's loader, and MLX-LM's own quantized output (its ``quantize_model`` + saved config)
is read by ours; in both directions the two implementations' logits agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlxlm_core import load_model, save
from mlxlm_core.models import SUPPORTED_MODEL_TYPES
from mlxlm_quant import QuantRecipe, quantize, save_quantized

from .conftest import TINY_CONFIGS, build_tiny

ARCHS = [n for n, c in TINY_CONFIGS.items() if c["model_type"] in SUPPORTED_MODEL_TYPES]
# MLX-LM 0.32.2's minicpm.sanitize adds lm_head.weight to any checkpoint without one, then
# rejects it when the config ties the head, so it cannot load a tied MiniCPM directory at
# all (float included): an MLX-LM bug, not a format difference.
MLX_LM_CANNOT_LOAD = {"minicpm_tied"}
PAIRS = [
    pytest.param(n, marks=pytest.mark.xfail(reason="MLX-LM cannot load tied MiniCPM", strict=True))
    if n in MLX_LM_CANNOT_LOAD
    else n
    for n in ARCHS
]
MLA_ARCHS = {"deepseek_v2", "deepseek_v2_grouped"}
TO_MLX_LM = [
    pytest.param(
        n, marks=pytest.mark.xfail(reason="MLA format differs (see CORE_GAPS)", strict=True)
    )
    if n in MLA_ARCHS
    else p
    for n, p in zip(ARCHS, PAIRS)
]
# Found by this test, left to core (reported): our deepseek_v2 keeps kv_b_proj where MLX-LM's
# MLX format splits it into embed_q/unembed_out, so MLX-LM's files do not load here; and
# olmo2/olmo3 with mxfp4 weights differ from MLX-LM by ~1e-2 although every quantized layer
# agrees on its own (affine widths agree).
MLA = "core's MLA attention keeps kv_b_proj; MLX-LM's MLX format splits it (embed_q/unembed_out)"
CORE_GAPS = {
    "deepseek_v2": MLA,
    "deepseek_v2_grouped": MLA,
    "olmo2": "core's olmo2 with mxfp4 weights differs from MLX-LM by ~1e-2",
    "olmo3": "core's olmo3 with mxfp4 weights differs from MLX-LM by ~1e-2",
}
FROM_MLX_LM = [
    pytest.param(n, marks=pytest.mark.xfail(reason=CORE_GAPS[n], strict=True))
    if n in CORE_GAPS
    else p
    for n, p in zip(ARCHS, PAIRS)
]
TOL = 2e-4


def _float32(model: nn.Module) -> nn.Module:
    params = [
        (k, v.astype(mx.float32))
        for k, v in tree_flatten(model.parameters())
        if mx.issubdtype(v.dtype, mx.floating)
    ]
    model.update(tree_unflatten(params))
    return model


def _mlx_lm(path: Path) -> nn.Module:
    from mlx_lm.utils import load_model as mlx_lm_load_model

    model, _ = mlx_lm_load_model(path)
    return _float32(model)


def _tokens(seed: int, shape: tuple[int, int] = (2, 12)) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, 128, size=shape))


@pytest.fixture(scope="module")
def float_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    dirs = {}
    for i, name in enumerate(ARCHS):
        folder = tmp_path_factory.mktemp(name) / "float"
        model = build_tiny(name, seed=i)
        save(folder, model, None, dict(TINY_CONFIGS[name]))
        dirs[name] = folder
    return dirs


def _diff(a: mx.array, b: mx.array) -> float:
    return float(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max())


@pytest.mark.parametrize("name", TO_MLX_LM)
def test_our_quantized_models_load_in_mlx_lm(name: str, float_dirs: dict, tmp_path: Path) -> None:
    """RTN (mixed widths), AWQ and GPTQ outputs: MLX-LM computes what we compute."""
    x = _tokens(ARCHS.index(name))
    calib = _tokens(100 + ARCHS.index(name), (4, 16))
    for method, recipe in (
        ("rtn", QuantRecipe(bits=4, group_size=32, rules=_optional_rule("*.down_proj", 8))),
        ("awq", QuantRecipe(bits=3, group_size=32)),
        ("gptq", QuantRecipe(bits=4, group_size=32)),
    ):
        model, config = load_model(float_dirs[name])
        block = quantize(model, recipe, method=method, tokens=calib)
        out = save_quantized(
            tmp_path / method,
            model,
            None,
            config,
            block,
            recipe=recipe,
            method=method,
            dtype="float32",
        )
        ours, _ = load_model(out)
        theirs = _mlx_lm(out)
        expected = model(x)
        assert _diff(ours(x), expected) <= TOL, (name, method)
        assert _diff(theirs(x), expected) <= TOL, (name, method)
        quantized = {p for p, m in theirs.named_modules() if hasattr(m, "scales")}
        assert quantized == {p for p, m in model.named_modules() if hasattr(m, "scales")}


def _optional_rule(match: str, bits: int) -> tuple:
    from mlxlm_quant import LayerRule

    return (LayerRule(match=match, bits=bits, required=False),)


@pytest.mark.parametrize("name", FROM_MLX_LM)
def test_mlx_lm_quantized_models_load_in_mlxlm(name: str, float_dirs: dict, tmp_path: Path) -> None:
    from mlx_lm.utils import quantize_model, save_config, save_model

    theirs = _mlx_lm(float_dirs[name])
    config = json.loads((float_dirs[name] / "config.json").read_text())
    for mode, bits, group in (("affine", 3, 32), ("affine", 6, 64), ("mxfp4", 4, 32)):
        model = _mlx_lm(float_dirs[name])
        model, qconfig = quantize_model(model, config, group_size=group, bits=bits, mode=mode)
        folder = tmp_path / f"{mode}{bits}"
        save_model(folder, model)
        save_config(qconfig, folder / "config.json")
        ours, _ = load_model(folder)
        x = _tokens(ARCHS.index(name))
        assert _diff(ours(x), _float32(model)(x)) <= TOL, (name, mode, bits)
    del theirs
