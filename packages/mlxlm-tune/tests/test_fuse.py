"""Fusing: float bases, quantized bases (float16 layers or checked re-quantization), GGUF."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlxlm_core import CheckpointError, InvalidArgumentError, load, save
from mlxlm_core.adapters import AdapterConfig, save_adapters
from mlxlm_core.quantize import quantize_model
from mlxlm_tune import fuse, prepare_model
from mlxlm_tune._meta import tune_metadata

TOKENS = mx.array([[5, 17, 42, 8, 99, 33, 64, 21, 7, 150]])


def _adapter(base: Path, folder: Path, *, size: float, dora: bool = False) -> Path:
    """An adapter on ``base`` whose B factors are random with std ``size``."""
    model, _ = load(base)
    config = AdapterConfig(
        fine_tune_type="dora" if dora else "lora", num_layers=2, rank=4, scale=2.0
    )
    mx.random.seed(1)
    prepare_model(model, config)
    for _, module in model.named_modules():
        if "lora_b" in module:
            module.lora_b = size * mx.random.normal(module.lora_b.shape)
    save_adapters(folder, model, config, extra=tune_metadata(model))
    return folder


def _logits(model_dir: Path, adapter: Path | None = None) -> np.ndarray:
    model, _ = load(model_dir, adapter_path=adapter)
    return np.array(model(TOKENS))


@pytest.fixture(scope="module")
def quantized(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, tokenizer, config = load(tiny, return_config=True)
    config["quantization"] = quantize_model(model, bits=4, group_size=32)
    folder = tmp_path_factory.mktemp("q") / "tiny-q4"
    save(folder, model, tokenizer, config)
    return folder


def test_float_fuse_matches_the_adapter(tiny: Path, tmp_path: Path) -> None:
    for dora in (False, True):
        adapter = _adapter(tiny, tmp_path / f"a{dora}", size=0.1, dora=dora)
        report = fuse(str(tiny), adapter, tmp_path / f"fused{dora}")
        assert report.mode == "float" and report.adapted_layers == 14
        expected = _logits(tiny, adapter)
        assert np.abs(expected - _logits(tiny)).max() > 1e-2  # the adapter matters
        np.testing.assert_allclose(_logits(report.save_path), expected, atol=2e-4)


def test_quantized_base_keeps_adapted_layers_float16(quantized: Path, tmp_path: Path) -> None:
    adapter = _adapter(quantized, tmp_path / "a", size=0.05)
    report = fuse(str(quantized), adapter, tmp_path / "fused")
    assert report.mode == "float16-layers"
    config = json.loads((report.save_path / "config.json").read_text())
    assert config["quantization"]["model.layers.0.self_attn.q_proj"] is False
    weights = mx.load(str(report.save_path / "model.safetensors"))
    assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == mx.float16
    assert "model.layers.0.self_attn.q_proj.scales" not in weights
    assert "model.embed_tokens.scales" in weights  # the rest stays quantized
    expected = _logits(quantized, adapter)
    np.testing.assert_allclose(_logits(report.save_path), expected, atol=5e-3)


def test_requantize_measures_the_adapter_effect(quantized: Path, tmp_path: Path) -> None:
    # An update far below the 4-bit step is rounded away: refused, with the figure.
    small = _adapter(quantized, tmp_path / "small", size=1e-4)
    with pytest.raises(InvalidArgumentError, match=r"kept only -?\d+% of the adapter's effect"):
        fuse(str(quantized), small, tmp_path / "refused", requantize=True)
    assert not (tmp_path / "refused").exists()
    # A large one survives re-quantization, and the measured figure is reported.
    large = _adapter(quantized, tmp_path / "large", size=0.3)
    report = fuse(str(quantized), large, tmp_path / "requant", requantize=True)
    assert report.mode == "requantized" and report.retained is not None and report.retained > 0.5
    weights = mx.load(str(report.save_path / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.scales" in weights


def test_dequantize_writes_float(quantized: Path, tmp_path: Path) -> None:
    adapter = _adapter(quantized, tmp_path / "a", size=0.05)
    report = fuse(str(quantized), adapter, tmp_path / "deq", dequantize=True, dtype="float32")
    config = json.loads((report.save_path / "config.json").read_text())
    assert "quantization" not in config
    weights = mx.load(str(report.save_path / "model.safetensors"))
    assert not any(k.endswith(".scales") for k in weights)
    np.testing.assert_allclose(_logits(report.save_path), _logits(quantized, adapter), atol=1e-4)


def test_adapter_for_another_model_is_refused(tiny: Path, tiny_other: Path, tmp_path: Path) -> None:
    adapter = _adapter(tiny, tmp_path / "a", size=0.1)
    with pytest.raises(
        CheckpointError, match=r"base_model\.hidden_size is 64 but the model has 32"
    ):
        fuse(str(tiny_other), adapter, tmp_path / "x")
    # an MLX-LM style config (no fingerprint): the tensor shapes still decide, by name
    document = json.loads((adapter / "adapter_config.json").read_text())
    document.pop("base_model")
    (adapter / "adapter_config.json").write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match=r"adapter does not fit .* unexpected"):
        fuse(str(tiny_other), adapter, tmp_path / "y")


def test_export_gguf(tiny: Path, tmp_path: Path) -> None:
    pytest.importorskip("mlxlm_gguf")
    adapter = _adapter(tiny, tmp_path / "a", size=0.1)
    report = fuse(str(tiny), adapter, tmp_path / "fused", export_gguf="model.gguf")
    assert report.gguf_path == tmp_path / "fused" / "model.gguf"
    assert report.gguf_path.read_bytes()[:4] == b"GGUF"


def test_fuse_refuses_a_non_empty_destination(tiny: Path, tmp_path: Path) -> None:
    adapter = _adapter(tiny, tmp_path / "a", size=0.1)
    shutil.copytree(tiny, tmp_path / "taken")
    with pytest.raises(InvalidArgumentError, match="exists and is not empty"):
        fuse(str(tiny), adapter, tmp_path / "taken")
