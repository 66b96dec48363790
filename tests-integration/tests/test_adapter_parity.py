"""Adapter parity with the published mlx-lm: the same files give the same logits.

A tiny random model directory (config, weights, a word-level tokenizer) is written once per
base; adapters are then created by MLX-LM's own tuner code (``linear_to_lora_layers``,
``trainable_parameters`` saved as its trainer does, ``save_config``) with non-zero ``lora_b``
and moved DoRA magnitudes, and both libraries load base + adapter through their public
``load(path, adapter_path=...)``. The reverse direction (an adapter written by
``mlxlm_core.adapters.save_adapters`` and read by MLX-LM) is checked too, so files are
interchangeable both ways.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx_lm.utils as ref_utils
import mlxlm_core
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.utils import linear_to_lora_layers as ref_linear_to_lora_layers
from mlxlm_core.adapters import AdapterConfig, AdapterLayer, apply_lora_layers, save_adapters
from mlxlm_core.quantize import quantize_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

TOL = 1e-5
TOKENS = [[3, 17, 42, 8, 99, 5, 64, 21]]
WORDS = ["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(125))]


def _write_tokenizer(folder: Path) -> None:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(str(folder))


def _write_base(folder: Path, config: dict[str, Any], model: nn.Module, *, quantized: bool) -> Path:
    config = copy.deepcopy(config)
    if quantized:
        config["quantization"] = quantize_model(model, bits=4, group_size=32)
    mlxlm_core.save(folder, model, None, config)
    _write_tokenizer(folder)
    return folder


BASES: dict[str, tuple[str, bool]] = {
    # name -> (tiny config from conftest, quantized)
    "llama": ("llama", False),
    "mistral_untied": ("mistral", False),
    "llama_q4": ("llama", True),
    "qwen3_moe": ("qwen3_moe", False),
}


@pytest.fixture(scope="module")
def base_dir(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_config: Callable[[str], dict[str, Any]],
    tiny_model: Callable[..., nn.Module],
) -> Callable[[str], Path]:
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            arch, quantized = BASES[name]
            folder = tmp_path_factory.mktemp("bases") / name
            made[name] = _write_base(
                folder, tiny_config(arch), tiny_model(arch, seed=11), quantized=quantized
            )
        return made[name]

    return get


def _perturb(model: nn.Module, *, seed: int) -> None:
    """Stand-in for training: non-zero B factors, DoRA magnitudes moved off the norms."""
    mx.random.seed(seed)
    new = []
    for name, value in tree_flatten(model.trainable_parameters()):
        if name.endswith("lora_b"):
            new.append((name, 0.1 * mx.random.normal(value.shape)))
        elif name.endswith(".m"):
            new.append((name, value * (1.0 + 0.3 * mx.random.uniform(shape=value.shape))))
    model.update(tree_unflatten(new))


def _mlx_lm_adapter(
    base: Path, folder: Path, *, fine_tune_type: str, num_layers: int, params: dict[str, Any]
) -> Path:
    """An adapter made the way MLX-LM's ``mlx_lm.lora`` trainer makes one."""
    model, _ = ref_utils.load(str(base))
    model.freeze()
    ref_linear_to_lora_layers(model, num_layers, params, use_dora=fine_tune_type == "dora")
    _perturb(model, seed=num_layers + 100)
    folder.mkdir(parents=True)
    weights = dict(tree_flatten(model.trainable_parameters()))
    mx.save_safetensors(str(folder / "adapters.safetensors"), weights)
    args = {
        "fine_tune_type": fine_tune_type,
        "num_layers": num_layers,
        "lora_parameters": params,
        "learning_rate": 1e-5,  # a few of the training arguments the real file carries
        "iters": 10,
    }
    ref_utils.save_config(args, folder / "adapter_config.json")
    return folder


def _logits_both(base: Path, adapter: Path) -> tuple[np.ndarray, np.ndarray, nn.Module]:
    ref_model, _ = ref_utils.load(str(base), adapter_path=str(adapter))
    ours, _ = mlxlm_core.load(base, adapter_path=adapter, dtype="float32")
    tokens = mx.array(TOKENS)
    return np.array(ref_model(tokens)), np.array(ours(tokens)), ours


_RANK4 = {"rank": 4, "scale": 4.0, "dropout": 0.0}
CASES: dict[str, tuple[str, str, int, dict[str, Any]]] = {
    # name -> (base, fine_tune_type, num_layers, lora_parameters)
    "lora-last-layer": ("llama", "lora", 1, _RANK4),
    "dora-all-layers": ("llama", "dora", -1, {**_RANK4, "dropout": 0.1}),
    "lora-tied-embedding": (
        "llama",
        "lora",
        2,
        {**_RANK4, "keys": ["self_attn.v_proj", "mlp.down_proj", "model.embed_tokens"]},
    ),
    "dora-tied-embedding": (
        "llama",
        "dora",
        2,
        {**_RANK4, "keys": ["self_attn.q_proj", "model.embed_tokens"]},
    ),
    "lora-untied-head": (
        "mistral_untied",
        "lora",
        1,
        {**_RANK4, "keys": ["self_attn.o_proj", "lm_head", "model.embed_tokens"]},
    ),
    "lora-quantized-base": ("llama_q4", "lora", -1, {**_RANK4, "rank": 8}),
    "dora-quantized-base": ("llama_q4", "dora", 1, _RANK4),
    "lora-quantized-embedding": (
        "llama_q4",
        "lora",
        1,
        {**_RANK4, "keys": ["mlp.up_proj", "model.embed_tokens"]},
    ),
    "lora-moe": ("qwen3_moe", "lora", -1, _RANK4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mlx_lm_adapter_gives_the_same_logits(
    case: str, base_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    base_name, fine_tune_type, num_layers, params = CASES[case]
    base = base_dir(base_name)
    adapter = _mlx_lm_adapter(
        base,
        tmp_path / "adapter",
        fine_tune_type=fine_tune_type,
        num_layers=num_layers,
        params=copy.deepcopy(params),
    )
    ref, ours, model = _logits_both(base, adapter)
    assert any(isinstance(m, AdapterLayer) for _, m in model.named_modules())
    # The adapter must matter, or equal logits would prove nothing.
    plain, _ = mlxlm_core.load(base, dtype="float32")
    assert np.abs(np.array(plain(mx.array(TOKENS))) - ours).max() > 1e-3
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("fine_tune_type", ["lora", "dora"])
def test_our_adapter_files_load_in_mlx_lm(
    fine_tune_type: str, base_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    base = base_dir("llama")
    model, _ = mlxlm_core.load(base, dtype="float32")
    model.freeze()
    config = AdapterConfig(
        fine_tune_type=fine_tune_type,
        num_layers=2,
        rank=4,
        scale=3.0,
        keys=("self_attn.k_proj", "mlp.gate_proj", "model.embed_tokens"),
    )
    apply_lora_layers(
        model,
        num_layers=config.num_layers,
        rank=config.rank,
        scale=config.scale,
        keys=config.keys,
        use_dora=config.use_dora,
    )
    _perturb(model, seed=7)
    save_adapters(tmp_path, model, config)
    ours_direct = np.array(model(mx.array(TOKENS)))
    ref, ours, _ = _logits_both(base, tmp_path)
    np.testing.assert_array_equal(ours, ours_direct)
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=TOL)


def test_full_fine_tune_weights_match(base_dir: Callable[[str], Path], tmp_path: Path) -> None:
    base = base_dir("llama")
    model, _ = ref_utils.load(str(base))
    model.freeze()
    model.layers[-1].unfreeze()
    mx.random.seed(5)
    model.update(
        tree_unflatten(
            [
                (k, v + 0.05 * mx.random.normal(v.shape))
                for k, v in tree_flatten(model.trainable_parameters())
            ]
        )
    )
    mx.save_safetensors(
        str(tmp_path / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters()))
    )
    ref_utils.save_config(
        {"fine_tune_type": "full", "num_layers": 1, "lora_parameters": None},
        tmp_path / "adapter_config.json",
    )
    ref, ours, _ = _logits_both(base, tmp_path)
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=TOL)
