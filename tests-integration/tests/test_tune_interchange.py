"""Adapters move between MLX-LM and mlxlm-tune both ways and give identical logits.

MLX-LM trains an adapter with its own command (``python -m mlx_lm lora``); mlxlm loads it
and must produce the logits MLX-LM does. mlxlm-tune trains one with ``mlxlm_tune.train``;
MLX-LM loads it (and the fused model ``mlxlm_tune.fuse`` writes, on a 4-bit base) and must
produce the logits mlxlm does.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import mlxlm_core
import numpy as np
import pytest
from mlxlm_core.quantize import quantize_model
from mlxlm_tune import TrainingConfig, fuse, train
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

WORDS = ["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(125))]
TOKENS = mx.array([[3, 17, 42, 8, 99, 5, 64, 21, 7, 120]])


def _write_dir(folder: Path, model: nn.Module, config: dict[str, Any], *, quantized: bool) -> Path:
    config = copy.deepcopy(config)
    if quantized:
        config["quantization"] = quantize_model(model, bits=4, group_size=32)
    mlxlm_core.save(folder, model, None, config)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(str(folder))
    return folder


def _write_data(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 16), ("valid", 4)):
        rows = [
            {"text": " ".join(f"w{int(i)}" for i in rng.integers(3, 125, rng.integers(6, 14)))}
            for _ in range(n)
        ]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_config: Callable[[str], dict[str, Any]],
    tiny_model: Callable[..., nn.Module],
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("interchange")
    return {
        "float": _write_dir(
            root / "float", tiny_model("llama", seed=3), tiny_config("llama"), quantized=False
        ),
        "q4": _write_dir(
            root / "q4", tiny_model("llama", seed=3), tiny_config("llama"), quantized=True
        ),
        "data": _write_data(root / "data"),
        "root": root,
    }


def _ours(model_dir: Path, adapter: Path | None = None) -> np.ndarray:
    model, _ = mlxlm_core.load(model_dir, adapter_path=adapter)
    return np.array(model(TOKENS).astype(mx.float32))


def _theirs(model_dir: Path, adapter: Path | None = None) -> np.ndarray:
    model, _ = mlx_lm.load(str(model_dir), adapter_path=None if adapter is None else str(adapter))
    return np.array(model(TOKENS).astype(mx.float32))


# Two of the four pairings (each is a subprocess run of MLX-LM's trainer, ~8 s).
@pytest.mark.parametrize(("kind", "base"), [("lora", "float"), ("dora", "q4")])
def test_mlx_lm_trained_adapter_gives_identical_logits_here(
    setup: dict[str, Path], kind: str, base: str
) -> None:
    adapter = setup["root"] / f"mlx-lm-{kind}-{base}"
    command = [
        sys.executable,
        "-m",
        "mlx_lm",
        "lora",
        "--model",
        str(setup[base]),
        "--train",
        "--data",
        str(setup["data"]),
        "--iters",
        "6",
        "--batch-size",
        "2",
        "--num-layers",
        "2",
        "--fine-tune-type",
        kind,
        "--adapter-path",
        str(adapter),
        "--learning-rate",
        "1e-2",
        "--steps-per-eval",
        "100",
        "--val-batches",
        "1",
        "--save-every",
        "100",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs, ours = _theirs(setup[base], adapter), _ours(setup[base], adapter)
    assert np.abs(theirs - _theirs(setup[base])).max() > 1e-3  # training moved the logits
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["lora", "dora"])
@pytest.mark.parametrize("base", ["float", "q4"])
def test_our_adapter_gives_identical_logits_in_mlx_lm(
    setup: dict[str, Path], kind: str, base: str
) -> None:
    adapter = setup["root"] / f"ours-{kind}-{base}"
    config = TrainingConfig(
        model=str(setup[base]),
        data=str(setup["data"]),
        fine_tune_type=kind,
        iters=6,
        batch_size=2,
        num_layers=2,
        learning_rate=1e-2,
        adapter_path=str(adapter),
        save_every=0,
        steps_per_eval=100,
        mask_prompt=False,
    )
    train(config, callbacks=[])
    ours, theirs = _ours(setup[base], adapter), _theirs(setup[base], adapter)
    assert np.abs(ours - _ours(setup[base])).max() > 1e-3
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=1e-5)
    if base == "q4" and kind == "lora":
        # The fused model (adapted layers float16, the rest 4-bit) loads in MLX-LM too.
        # float32 elsewhere: MLX-LM computes in the stored dtype, and this random model's
        # activations overflow float16.
        fused = fuse(str(setup[base]), adapter, setup["root"] / "fused-q4", dtype="float32")
        weights = mx.load(str(fused.save_path / "model.safetensors"))
        assert weights["model.layers.1.self_attn.q_proj.weight"].dtype == mx.float16
        fused = fused.save_path
        np.testing.assert_allclose(_theirs(fused), _ours(fused), atol=1e-5, rtol=1e-5)
        # Rounding the adapted weights to float16 (relative error <= 2**-11 each) moves the
        # logits by a fraction of a percent; the adapter's own effect is ~100x larger.
        moved = _ours(fused) - ours
        assert np.linalg.norm(moved) <= 1e-2 * np.linalg.norm(ours)
        assert np.abs(moved).max() <= 1e-2 * np.abs(ours - _ours(setup[base])).max()
