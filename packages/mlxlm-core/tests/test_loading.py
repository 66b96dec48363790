"""Loading: Hugging Face cache resolution, quantized checkpoints, refusals, progress."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlxlm_core import (
    CheckpointError,
    ModelNotFoundError,
    UnsupportedError,
    generate_step,
    load,
    load_model,
    save,
)
from mlxlm_core.quantize import dequantize_model, quantize_model

IDS = mx.array([[5, 17, 42, 99, 3, 250, 7]])


def fake_hub_cache(hub: Path, repo_id: str, source: Path) -> None:
    """Lay out ``source``'s files the way huggingface_hub caches a snapshot."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    commit = "fedcba9876543210fedcba9876543210fedcba98"
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(source.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copy(f, blob)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_repo_id_resolves_from_the_hf_cache_offline(
    tiny: Path, tmp_path: Path, monkeypatch
) -> None:
    hub = tmp_path / "hub"
    fake_hub_cache(hub, "someone/tiny-llama", tiny)
    # huggingface_hub reads its environment once, at import: set its constants as well.
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    model, _ = load("someone/tiny-llama")
    direct, _ = load(tiny)
    assert mx.array_equal(model(IDS), direct(IDS))
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        load("someone/absent-model")


@pytest.mark.parametrize(
    ("mode", "bits", "group"),
    [("affine", 4, 64), ("affine", 8, 32), ("mxfp4", 4, 32), ("nvfp4", 4, 16), ("mxfp8", 8, 32)],
)
def test_quantized_checkpoints_round_trip(tiny: Path, tmp_path: Path, mode, bits, group) -> None:
    model, tokenizer, config = load(tiny, return_config=True)
    overrides = {"model.layers.0.mlp.down_proj": False} if mode == "affine" else {}

    def keep_some_float(path: str, _module: nn.Module) -> bool:
        return path not in overrides

    block = quantize_model(model, bits=bits, group_size=group, mode=mode, predicate=keep_some_float)
    block.update(overrides)
    expected = model(IDS)
    out = save(tmp_path / "q", model, tokenizer, {**config, "quantization": block})
    # MLX's quantized kernels reproduce the in-memory model bit for bit; the CPU policy's
    # default (dense copy or on-the-fly dequantization, float matmul) only to rounding.
    loaded, _ = load(out, weight_mode="native")
    assert mx.array_equal(loaded(IDS), expected)
    assert float(mx.abs(load(out)[0](IDS) - expected).max()) < 1e-5
    layer = loaded.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, nn.QuantizedLinear)
    assert layer.self_attn.q_proj.mode == mode and layer.self_attn.q_proj.bits == bits
    if overrides:
        assert isinstance(layer.mlp.down_proj, nn.Linear)
    # Dequantizing gives a float model with the same function.
    float_model = dequantize_model(loaded)
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in float_model.named_modules())
    assert float(mx.abs(float_model(IDS) - expected).max()) < 1e-4


@pytest.mark.parametrize(
    ("block", "named"),
    [
        ({"quant_method": "fp8", "fmt": "e4m3"}, "fp8"),
        ({"quant_method": "compressed-tensors"}, "compressed-tensors"),
        ({"quant_method": "gptq", "bits": 4}, "gptq"),
    ],
)
def test_foreign_quantization_is_refused_by_name(tiny: Path, tmp_path: Path, block, named) -> None:
    folder = tmp_path / "foreign"
    shutil.copytree(tiny, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": block}))
    with pytest.raises(UnsupportedError, match=named):
        load_model(folder)


def test_unsupported_mlx_quantization_is_refused(tiny: Path, tmp_path: Path) -> None:
    folder = tmp_path / "odd"
    shutil.copytree(tiny, folder)
    config = json.loads((folder / "config.json").read_text())
    bad = {"group_size": 48, "bits": 4, "mode": "affine"}
    (folder / "config.json").write_text(json.dumps({**config, "quantization": bad}))
    with pytest.raises(UnsupportedError, match="group_size=48"):
        load_model(folder)


def test_missing_shard_and_mismatched_weights_are_named(tiny: Path, tmp_path: Path) -> None:
    folder = tmp_path / "sharded"
    shutil.copytree(tiny, folder)
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing"):
        load_model(folder)
    (folder / "model.safetensors.index.json").unlink()
    weights = mx.load(str(folder / "model.safetensors"))
    weights.pop("model.norm.weight")
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight"):
        load_model(folder)


def test_lazy_loading_defers_reading_weights(tiny: Path) -> None:
    model, _ = load_model(tiny, lazy=True)
    # Lazy parameters are unevaluated graph nodes until used; evaluating them works.
    mx.eval(model.parameters())
    eager, _ = load_model(tiny)
    assert all(
        mx.array_equal(a, b)
        for (_, a), (_, b) in zip(
            tree_flatten(model.parameters()), tree_flatten(eager.parameters())
        )
    )


def test_dtype_selection(tiny: Path) -> None:
    half, _ = load_model(tiny, dtype="float16")
    assert {v.dtype for _, v in tree_flatten(half.parameters())} == {mx.float16}
    auto, _ = load_model(tiny)  # CPU: float32
    assert {v.dtype for _, v in tree_flatten(auto.parameters())} == {mx.float32}


def test_chunked_prefill_reports_progress_and_matches_one_chunk(tiny: Path) -> None:
    model, _ = load(tiny)
    prompt = mx.array(list(range(3, 60)))
    seen: list[tuple[int, int]] = []
    chunked = list(
        generate_step(
            prompt,
            model,
            max_tokens=5,
            prefill_step_size=16,
            prompt_progress_callback=lambda done, total: seen.append((done, total)),
        )
    )
    whole = list(generate_step(prompt, model, max_tokens=5))
    assert [t for t, _ in chunked] == [t for t, _ in whole]
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert seen[-1] == (57, 57) and all(t == 57 for _, t in seen)
    assert len(seen) >= 4  # 56 prompt tokens in chunks of 16, then the last token


def test_a_shard_that_is_not_named_weights_is_refused(tiny: Path, tmp_path: Path) -> None:
    # mx.load of a .npy gives one bare array; dict.update would take its rows as
    # (key, value) pairs and load garbage, so the loader has to refuse the file by name.
    folder = tmp_path / "odd-shard"
    shutil.copytree(tiny, folder)
    mx.save(str(folder / "extra.npy"), mx.zeros((3, 2)))
    names = {k: "model.safetensors" for k in mx.load(str(tiny / "model.safetensors"))}
    index = {"weight_map": {**names, "extra": "extra.npy"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"extra\.npy"):
        load_model(folder)
