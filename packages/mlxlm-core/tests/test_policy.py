"""The execution policy: what ``auto`` picks on this backend, overrides, and that every weight
mode computes what MLX-LM computes on the same quantized checkpoint.

The tiny model is quantized (4-bit, group 32) and saved; mlxlm loads it in each weight mode
and the published ``mlx-lm`` loads it with its defaults (MLX's quantized kernels) as the
reference: a 12-token prompt (multi-row products: the on-the-fly path) and single-token
decode steps (the dense or quantized-kernel path) must agree to float32 rounding.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlxlm_core import InvalidArgumentError, load, save
from mlxlm_core import _policy as policy_module
from mlxlm_core._blas import blas_info
from mlxlm_core._policy import choose_policy
from mlxlm_core.cache import make_prompt_cache
from mlxlm_core.quantize import quantize_model

PROMPT = mx.array([[5, 17, 42, 8, 99, 3, 250, 7, 61, 12, 30, 44]])
MODES = ("native", "quantized", "dense")


@pytest.fixture(scope="module")
def quantized_dir(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, tokenizer, config = load(tiny, return_config=True)
    block = quantize_model(model, bits=4, group_size=32)
    return save(
        tmp_path_factory.mktemp("q") / "q4", model, tokenizer, {**config, "quantization": block}
    )


def _logits(model: nn.Module, cache_factory) -> list[mx.array]:
    """Prompt logits, then three cached single-token steps."""
    cache = cache_factory(model)
    outs = [model(PROMPT, cache=cache)]
    for token in (9, 77, 4):
        outs.append(model(mx.array([[token]]), cache=cache))
    mx.eval(outs)
    return outs


def test_auto_on_this_cpu(monkeypatch) -> None:
    monkeypatch.delenv("MLXLM_MATVEC", raising=False)
    policy = choose_policy()
    assert policy.backend == "cpu" and policy.dtype == "float32"
    # With MLX's CPU JIT (g++) the plane kernel decodes from the packed weights; without it
    # the dense copy pays where an optimised BLAS is loaded.
    planes = shutil.which("g++") is not None
    expected = "quantized" if planes or not blas_info().optimised else "dense"
    assert policy.weight_mode == expected
    assert policy.matvec == ("planes" if planes else "mlx")
    assert policy.blas == blas_info().name
    assert policy.dequantize_rows == (2 if expected == "quantized" else None)
    # MLX-LM's behaviour stays one option away, and the plane kernel one variable away.
    assert choose_policy(weight_mode="native").matvec == "mlx"
    monkeypatch.setenv("MLXLM_MATVEC", "mlx")
    assert choose_policy(weight_mode="quantized").matvec == "mlx"


def test_overrides_and_refusals() -> None:
    assert choose_policy("float16", "native").dtype == "float16"
    assert choose_policy("keep", "quantized").dtype is None
    assert choose_policy(weight_mode="quantized").dequantize_rows == 2
    with pytest.raises(InvalidArgumentError, match="weight_mode must be one of"):
        choose_policy(weight_mode="sparse")
    with pytest.raises(InvalidArgumentError, match="dtype must be"):
        choose_policy("float64")


def test_dense_copy_needs_float32_and_room(quantized_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLXLM_MATVEC", "mlx")  # the rule auto follows without the plane kernel
    half, _ = load(quantized_dir, dtype="float16")
    assert half.policy.weight_mode == "quantized"  # dense copies pay only through the BLAS
    monkeypatch.setattr(policy_module, "DENSE_BUDGET_FRACTION", 0.0)
    small, _ = load(quantized_dir)
    assert small.policy.weight_mode == "quantized"
    assert "exceeds" in small.policy.reason or "no optimised BLAS" in small.policy.reason


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_matches_mlx_lm(quantized_dir: Path, mode: str) -> None:
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    from mlx_lm.models.cache import make_prompt_cache as peer_cache

    theirs, _ = mlx_lm_utils.load_model(quantized_dir)
    ours, _ = load(quantized_dir, weight_mode=mode)
    assert ours.policy.weight_mode == mode
    for a, b in zip(_logits(ours, make_prompt_cache), _logits(theirs, peer_cache)):
        assert float(mx.abs(a - b).max()) < 1e-5


def test_dense_copy_is_not_a_parameter_and_saves_as_packed(
    quantized_dir: Path, tmp_path: Path
) -> None:
    model, tokenizer, config = load(quantized_dir, weight_mode="dense", return_config=True)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, nn.QuantizedLinear)
    assert layer.dense_weight() is not None
    names = {k for k, _ in tree_flatten(model.parameters())}
    assert not any("_dense" in k for k in names)
    dense_total = sum(
        m.dense_weight().nbytes for m in model.modules() if hasattr(m, "dense_weight")
    )
    assert model.policy.dense_bytes == dense_total > 0
    assert "weight_mode=dense" in model.policy.describe()
    out = save(tmp_path / "again", model, tokenizer, config)
    again = mx.load(str(out / "model.safetensors"))
    original = mx.load(str(quantized_dir / "model.safetensors"))
    assert again.keys() == original.keys()
    assert all(mx.array_equal(again[k], original[k]) for k in original)


def test_dense_copy_follows_new_weights(quantized_dir: Path, tiny: Path) -> None:
    dense, _ = load(quantized_dir, weight_mode="dense")
    native, _ = load(quantized_dir, weight_mode="native")
    # Other packed weights (re-quantized from a perturbed float model) replace the old ones.
    other, _ = load(tiny)
    other.update(
        {"model": {"norm": {"weight": other.model.norm.weight * 1.5}}}  # a visible change
    )
    for layer in other.model.layers:
        layer.mlp.up_proj.weight = layer.mlp.up_proj.weight[::-1]
    quantize_model(other, bits=4, group_size=32)
    new = [(k, v) for k, v in tree_flatten(other.parameters())]
    dense.load_weights(new)
    native.load_weights(new)
    a, b = dense(PROMPT[:, :1]), native(PROMPT[:, :1])
    assert float(mx.abs(a - b).max()) < 1e-5
    assert float(mx.abs(a - other(PROMPT[:, :1])).max()) < 1e-5


def test_cli_verbose_prints_policy_and_blas(quantized_dir: Path, capsys) -> None:
    from mlxlm_core._cli.main import main

    code = main(
        [
            "generate",
            "--model",
            str(quantized_dir),
            "--max-tokens",
            "2",
            "--verbose",
            "--weight-mode",
            "quantized",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0
    policy = load(quantized_dir, weight_mode="quantized")[0].policy
    assert policy.describe() in err  # the policy the CLI ran with, printed whole
    if policy.matvec == "planes":  # with g++ (MLX's CPU compiler): the three row ranges
        expected = "(plane kernel for 1-2 rows, chunked dequantization up to 128, whole layers"
    else:
        expected = "(dequantized on the fly for >= 2 rows)"
    assert f"weight_mode=quantized {expected}" in err
    assert f"blas: {blas_info().name}" in err


def test_dense_matmul_equals_float64_reference(quantized_dir: Path) -> None:
    """The dense path against numpy: the dequantized weight times the input in float64."""
    model, _ = load(quantized_dir, weight_mode="dense")
    layer = model.model.layers[1].mlp.down_proj
    x = mx.random.normal((3, layer.dense_weight().shape[1]), key=mx.random.key(3))
    w = np.array(
        mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=32, bits=4),
        dtype=np.float64,
    )
    ref = np.array(x, dtype=np.float64) @ w.T
    assert np.allclose(np.array(layer(x)), ref, rtol=1e-5, atol=1e-5)
