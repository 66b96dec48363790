"""Every mode, width, group size and recipe round-trips: quantize -> save -> load in mlxlm
and in MLX-LM -> the same logits as the model in memory."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlxlm_core import load
from mlxlm_quant import QuantRecipe, calibration_windows, preset, quantize, save_quantized

AFFINE = [(b, g) for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 128)]
CASES = (
    [
        pytest.param(QuantRecipe(bits=b, group_size=g), "rtn", id=f"affine-{b}-g{g}")
        for b, g in AFFINE
    ]
    + [
        pytest.param(QuantRecipe(bits=b, mode=m), "rtn", id=m)
        for m, b in (("mxfp4", 4), ("nvfp4", 4), ("mxfp8", 8))
    ]
    + [
        pytest.param(preset(n), "rtn", id=n)
        for n in ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")
    ]
    + [pytest.param(QuantRecipe(bits=3, group_size=32), m, id=m) for m in ("awq", "gptq", "dwq")]
    + [pytest.param(QuantRecipe(bits=4, mode="mxfp4"), "awq", id="awq-mxfp4")]
)


def _float32(model: nn.Module) -> nn.Module:
    params = [
        (k, v.astype(mx.float32))
        for k, v in tree_flatten(model.parameters())
        if mx.issubdtype(v.dtype, mx.floating)
    ]
    model.update(tree_unflatten(params))
    return model


@pytest.fixture(scope="module")
def source(tiny: Path) -> tuple:
    return load(tiny, return_config=True)


@pytest.mark.parametrize(("recipe", "method"), CASES)
def test_round_trip(tiny: Path, tmp_path: Path, recipe: QuantRecipe, method: str) -> None:
    from mlx_lm import load as mlx_lm_load

    if method == "dwq":
        pytest.importorskip("mlxlm_tune")
    model, tokenizer, config = load(tiny, return_config=True)
    tokens = (
        calibration_windows(tokenizer, num_samples=4, sequence_length=32)
        if method != "rtn"
        else None
    )
    block = quantize(model, recipe, method=method, tokens=tokens, dwq_steps=3, dwq_lr=1e-3)
    dest = save_quantized(
        tmp_path / "out",
        model,
        tokenizer,
        config,
        block,
        recipe=recipe,
        method=method,
        dtype="float32",
    )
    saved = json.loads((dest / "config.json").read_text())
    assert saved["quantization"] == block
    assert saved["quantization_recipe"]["method"] == method
    assert saved["quantization_recipe"]["recipe"] == recipe.as_dict()
    quantized = [p for p, m in model.named_modules() if hasattr(m, "scales")]
    assert quantized, "nothing was quantized"

    x = mx.array([[1, 5, 9, 42, 7, 3, 100, 2]])
    expected = model(x)
    ours, _ = load(dest)
    theirs, _ = mlx_lm_load(str(dest))
    _float32(theirs)
    assert mx.allclose(ours(x), expected, atol=1e-4, rtol=1e-4)
    assert mx.allclose(theirs(x), expected, atol=1e-4, rtol=1e-4)
    # The layers MLX-LM quantized are exactly the ones we did, at the same widths.
    mine = {p: (m.bits, m.group_size) for p, m in model.named_modules() if hasattr(m, "scales")}
    other = {p: (m.bits, m.group_size) for p, m in theirs.named_modules() if hasattr(m, "scales")}
    assert mine == other
