"""How the server loads weights: for batched decoding, not for one row at a time."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.nn as nn
import pytest
from mlxlm_core import load, save
from mlxlm_core.quantize import quantize_model
from mlxlm_server import ServerConfig, batched_weights, load_slots


def test_batched_weights_sets_core_knob_only_when_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLXLM_MATVEC", raising=False)
    with batched_weights():
        assert os.environ["MLXLM_MATVEC"] == "mlx"
    assert "MLXLM_MATVEC" not in os.environ
    monkeypatch.setenv("MLXLM_MATVEC", "planes")  # the operator's choice stands
    with batched_weights():
        assert os.environ["MLXLM_MATVEC"] == "planes"


def test_quantized_model_is_not_loaded_for_one_row_products(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLXLM_MATVEC", raising=False)
    model, tokenizer, config = load(tiny_dir, return_config=True)
    block = quantize_model(
        model,
        bits=4,
        group_size=32,
        predicate=lambda path, m: isinstance(m, nn.Linear) and m.weight.shape[-1] % 32 == 0,
    )
    folder = save(tmp_path / "q", model, tokenizer, {**config, "quantization": block})
    slots, base = load_slots(ServerConfig(model=str(folder)))
    policy = slots[base].model.policy
    # Packed weights with the one-row kernel would dequantize every layer at every step
    # of a batch; the server takes a dense copy or MLX's kernels instead.
    assert policy.matvec != "planes"
    assert "MLXLM_MATVEC" not in os.environ
