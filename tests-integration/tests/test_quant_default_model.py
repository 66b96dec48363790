"""The real default model quantized by ``mlxlm quantize`` reads back the same in MLX-LM.

SmolLM2-135M-Instruct (a Q4_1 GGUF, dequantized to float first by the command) quantized
with the built-in ``mixed_3_6`` recipe: MLX-LM's loader and ours give the same logits, and
the recorded recipe and bits per weight are what was asked.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten, tree_unflatten

pytestmark = pytest.mark.slow


def test_default_model_mixed_recipe_round_trip(tmp_path: Path, monkeypatch, capsys) -> None:
    from mlx_lm.utils import load_model as mlx_lm_load_model
    from mlxlm_core import load_model
    from mlxlm_quant._cli import quantize_main

    out = tmp_path / "smollm-mixed"
    monkeypatch.setattr(
        sys, "argv", ["mlxlm-quantize", "--recipe", "mixed_3_6", "--mlx-path", str(out), "--json"]
    )
    with pytest.raises(SystemExit) as info:
        quantize_main()
    assert info.value.code == 0
    summary = json.loads(capsys.readouterr().out)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_recipe"]["recipe"]["name"] == "mixed_3_6"
    assert config["quantization"]["bits"] == 3
    assert config["quantization"]["model.layers.0.mlp.down_proj"]["bits"] == 6
    assert 3.5 < summary["bits_per_weight"] < 4.5

    ours, _ = load_model(out)
    theirs, _ = mlx_lm_load_model(out)
    floats = [
        (k, v.astype(mx.float32))
        for k, v in tree_flatten(theirs.parameters())
        if mx.issubdtype(v.dtype, mx.floating)
    ]
    theirs.update(tree_unflatten(floats))
    x = mx.array([[1, 504, 3458, 282, 4600, 314, 3767, 47]])
    diff = float(mx.abs(ours(x) - theirs(x)).max())
    assert diff < 1e-3, diff
