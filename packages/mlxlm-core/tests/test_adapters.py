"""Unit tests for mlxlm_core.adapters (LoRA / DoRA layers, model wrapping, adapter files).

Expected values come from the LoRA / DoRA definitions recomputed in float64 numpy from the
layers' own weights; fusing is checked against the unfused forward. Parity with MLX-LM's
own adapter code and files lives in tests-integration/tests/test_adapter_parity.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlxlm_core import CheckpointError, InvalidArgumentError, UnsupportedError
from mlxlm_core.adapters import (
    AdapterConfig,
    AdapterLayer,
    DoRAEmbedding,
    DoRALinear,
    LoRAEmbedding,
    LoRALinear,
    LoRASwitchLinear,
    adapter_parameters,
    apply_lora_layers,
    fuse_adapters,
    linear_to_lora_layers,
    load_adapters,
    remove_adapters,
    save_adapters,
)
from mlxlm_core.models import get_model_classes
from mlxlm_core.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from mlxlm_core.quantize import quantize_model

TOL = 1e-5
SCALE = 2.5


# ------------------------------------------------------------------------------ layer cases


def _layer(kind: str) -> nn.Module:
    mx.random.seed(1)
    if kind in ("linear", "qlinear"):
        layer = nn.Linear(64, 24, bias=True)
        layer.bias = 0.3 * mx.random.normal((24,))
        return nn.QuantizedLinear.from_linear(layer, 32, 4) if kind == "qlinear" else layer
    if kind in ("embedding", "qembedding"):
        layer = nn.Embedding(40, 64)
        return nn.QuantizedEmbedding.from_embedding(layer, 32, 4) if kind == "qembedding" else layer
    layer = SwitchLinear(64, 24, 4)
    return layer.to_quantized(group_size=32, bits=4) if kind == "qswitch" else layer


def _inputs(kind: str) -> dict[str, mx.array]:
    mx.random.seed(2)
    if "embedding" in kind:
        return {"ids": mx.array([[0, 5, 39, 5], [7, 1, 2, 3]]), "x": mx.random.normal((2, 3, 64))}
    if "switch" in kind:
        return {
            "x": mx.random.normal((6, 1, 1, 64)),
            "indices": mx.array([[0, 3]] * 3 + [[1, 2]] * 3),
        }
    return {"x": mx.random.normal((2, 3, 64))}


def _outputs(layer: nn.Module, kind: str) -> list[mx.array]:
    """Everything the layer can compute: calls, and ``as_linear`` for embeddings."""
    inputs = _inputs(kind)
    if "embedding" in kind:
        return [layer(inputs["ids"]), layer.as_linear(inputs["x"])]
    if "switch" in kind:
        return [layer(inputs["x"], inputs["indices"])]
    return [layer(inputs["x"])]


_ADAPTER = {
    ("linear", False): LoRALinear,
    ("linear", True): DoRALinear,
    ("embedding", False): LoRAEmbedding,
    ("embedding", True): DoRAEmbedding,
    ("switch", False): LoRASwitchLinear,
}
KINDS = ["linear", "qlinear", "embedding", "qembedding", "switch", "qswitch"]
CASES = [
    pytest.param(kind, dora, id=f"{'dora' if dora else 'lora'}-{kind}")
    for kind in KINDS
    for dora in (False, True)
    if "switch" not in kind or not dora
]


def _wrap(kind: str, dora: bool, *, trained: bool) -> AdapterLayer:
    cls = _ADAPTER[(kind.removeprefix("q"), dora)]
    layer = cls(_layer(kind), rank=4, scale=SCALE)
    if trained:  # what training would leave: non-zero B, magnitudes moved off the norms
        mx.random.seed(3)
        layer.lora_b = 0.2 * mx.random.normal(layer.lora_b.shape)
        if dora:
            layer.m = layer.m * (1.0 + 0.3 * mx.random.uniform(shape=layer.m.shape))
    return layer


def _np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32), dtype=np.float64)


def _reference(layer: AdapterLayer, kind: str, dora: bool) -> list[np.ndarray]:
    """The adapted layer's outputs from the definitions, in float64."""
    w = _np(layer.base_weight())
    a, b = _np(layer.lora_a), _np(layer.lora_b)
    inputs = {k: np.array(v) for k, v in _inputs(kind).items()}
    if "switch" in kind:  # (E, out, in) + scale * B_e @ A_e, per token and chosen expert
        adapted = w + SCALE * b @ a
        x, idx = inputs["x"][:, 0, 0].astype(np.float64), inputs["indices"]
        out = np.einsum("ti,tjoi->tjo", x, adapted[idx])
        return [out[:, :, None, :]]
    delta = SCALE * (b.T @ a.T if "linear" in kind else a @ b)
    adapted = w + delta
    if dora:  # rows rescaled to the learned magnitudes
        adapted = adapted * (_np(layer.m) / np.linalg.norm(adapted, axis=1))[:, None]
    if "embedding" in kind:
        return [adapted[inputs["ids"]], inputs["x"].astype(np.float64) @ adapted.T]
    bias = _np(layer.base.bias)
    return [inputs["x"].astype(np.float64) @ adapted.T + bias]


def _assert_close(got: list[mx.array], want: list[Any], tol: float = TOL) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        g, w = np.array(g, dtype=np.float64), np.asarray(w, dtype=np.float64)
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=tol, rtol=tol)


@pytest.mark.parametrize(("kind", "dora"), CASES)
def test_fresh_adapter_leaves_outputs_unchanged(kind: str, dora: bool) -> None:
    base = _layer(kind)
    layer = _wrap(kind, dora, trained=False)
    assert not np.any(np.array(layer.lora_b))
    _assert_close(_outputs(layer, kind), [np.array(y) for y in _outputs(base, kind)])


@pytest.mark.parametrize(("kind", "dora"), CASES)
def test_forward_follows_the_definition(kind: str, dora: bool) -> None:
    layer = _wrap(kind, dora, trained=True)
    _assert_close(_outputs(layer, kind), _reference(layer, kind, dora), tol=1e-4)


@pytest.mark.parametrize(("kind", "dora"), CASES)
def test_fuse_equals_unfused_forward(kind: str, dora: bool) -> None:
    layer = _wrap(kind, dora, trained=True)
    fused = layer.fuse()
    plain = {"linear": nn.Linear, "embedding": nn.Embedding, "switch": SwitchLinear}
    assert type(fused) is plain[kind.removeprefix("q")]
    assert set(dict(tree_flatten(fused.parameters()))) <= {"weight", "bias"}
    _assert_close(_outputs(fused, kind), [np.array(y) for y in _outputs(layer, kind)])


@pytest.mark.parametrize("kind", ["qlinear", "qembedding", "qswitch"])
def test_fuse_can_requantize_with_the_base_spec(kind: str) -> None:
    layer = _wrap(kind, False, trained=True)
    fused = layer.fuse(requantize=True)
    quantized = (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)
    assert isinstance(fused, quantized)
    assert (fused.group_size, fused.bits) == (32, 4)
    # Requantizing the fused float weight is the only loss: compare with doing it by hand.
    by_hand = mx.quantize(layer.fuse().weight, 32, 4)[0]
    assert np.array_equal(np.array(fused.weight), np.array(by_hand))


def test_layers_report_rank_and_refuse_bad_options() -> None:
    layer = LoRASwitchLinear(_layer("switch"), rank=3)
    assert layer.rank == 3 and layer.lora_a.shape == (4, 3, 64) and layer.lora_b.shape == (4, 24, 3)
    assert LoRALinear.from_base(_layer("qlinear"), r=5).lora_a.shape == (64, 5)
    with pytest.raises(InvalidArgumentError):
        LoRALinear(_layer("linear"), rank=0)
    with pytest.raises(InvalidArgumentError):
        LoRALinear(_layer("linear"), dropout=1.0)
    with pytest.raises(InvalidArgumentError):
        LoRALinear(_layer("embedding"))


# ------------------------------------------------------------------------------ models

LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": 64,
    "tie_word_embeddings": True,
}
MOE = {
    **LLAMA,
    "model_type": "qwen3_moe",
    "head_dim": 16,
    "num_hidden_layers": 2,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
}
TOKENS = mx.array([[1, 5, 9, 2, 33, 7]])


def tiny(config: dict[str, Any] = LLAMA, *, seed: int = 0, quantized: bool = False) -> nn.Module:
    """The same random model every time for the same seed."""
    mx.random.seed(seed)
    model_cls, args_cls = get_model_classes(config["model_type"])
    model = model_cls(args_cls.from_dict(dict(config)))
    if quantized:
        quantize_model(model, bits=4, group_size=32)
    mx.eval(model.parameters())
    return model.eval()


def _train(model: nn.Module, *, seed: int = 4) -> None:
    """Stand-in for training: random B factors and magnitudes."""
    mx.random.seed(seed)
    new = []
    for name, value in adapter_parameters(model).items():
        if name.endswith("lora_b"):
            new.append((name, 0.05 * mx.random.normal(value.shape)))
        elif name.endswith(".m"):
            new.append((name, value * (1.0 + 0.3 * mx.random.uniform(shape=value.shape))))
    model.update(tree_unflatten(new))


def _adapted(model: nn.Module) -> list[str]:
    return sorted(p for p, m in model.named_modules() if isinstance(m, AdapterLayer))


def _logits(model: nn.Module) -> np.ndarray:
    return np.array(model(TOKENS))


def test_num_layers_counts_from_the_last_block_with_default_keys() -> None:
    model = tiny()
    base = _logits(model)
    apply_lora_layers(model, num_layers=1, rank=4, scale=SCALE)
    projections = ["q_proj", "k_proj", "v_proj", "o_proj"]
    expected = [f"model.layers.2.self_attn.{p}" for p in projections] + [
        f"model.layers.2.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")
    ]
    assert _adapted(model) == sorted(expected)
    np.testing.assert_allclose(_logits(model), base, atol=TOL)


@pytest.mark.parametrize("num_layers", [-1, 0, 3, 10])
def test_non_positive_or_large_num_layers_adapts_every_block(num_layers: int) -> None:
    model = apply_lora_layers(tiny(), num_layers=num_layers, keys=["self_attn.v_proj"])
    assert _adapted(model) == [f"model.layers.{i}.self_attn.v_proj" for i in range(3)]


def test_full_paths_adapt_modules_outside_the_blocks() -> None:
    model = tiny()
    base = _logits(model)
    keys = ["mlp.up_proj", "model.embed_tokens"]
    apply_lora_layers(model, num_layers=2, keys=keys, use_dora=True, scale=SCALE)
    assert isinstance(model.model.embed_tokens, DoRAEmbedding)
    assert _adapted(model) == [
        "model.embed_tokens",
        "model.layers.1.mlp.up_proj",
        "model.layers.2.mlp.up_proj",
    ]
    np.testing.assert_allclose(_logits(model), base, atol=TOL)


def test_moe_blocks_get_switch_adapters_and_router_lora() -> None:
    model = tiny(MOE)
    base = _logits(model)
    apply_lora_layers(model, num_layers=1, scale=SCALE, rank=4)
    block = model.layers[1]
    assert isinstance(block.mlp.switch_mlp.gate_proj, LoRASwitchLinear)
    assert isinstance(block.mlp.gate, LoRALinear)  # the router, as MLX-LM does
    np.testing.assert_allclose(_logits(model), base, atol=TOL)
    _train(model)
    adapted = _logits(model)
    assert np.abs(adapted - base).max() > 1e-3
    fuse_adapters(model)
    assert not _adapted(model)
    np.testing.assert_allclose(_logits(model), adapted, atol=TOL)
    with pytest.raises(UnsupportedError, match="DoRA"):
        apply_lora_layers(tiny(MOE), num_layers=1, use_dora=True)


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "quantized"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_fuse_and_remove_adapters_on_a_model(dora: bool, quantized: bool) -> None:
    model = tiny(quantized=quantized)
    base = _logits(model)
    keys = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj", "model.embed_tokens"]
    apply_lora_layers(model, num_layers=2, keys=keys, use_dora=dora, scale=SCALE, rank=4)
    _train(model)
    adapted = _logits(model)
    assert np.abs(adapted - base).max() > 1e-3
    trained = adapter_parameters(model)
    fuse_adapters(model)
    assert not _adapted(model)
    np.testing.assert_allclose(_logits(model), adapted, atol=TOL)
    again = tiny(quantized=quantized)
    apply_lora_layers(again, num_layers=2, keys=keys, use_dora=dora, scale=SCALE, rank=4)
    again.update(tree_unflatten(list(trained.items())))
    np.testing.assert_array_equal(_logits(again), adapted)
    remove_adapters(again)
    assert not _adapted(again)
    np.testing.assert_array_equal(_logits(again), base)


def test_wrapping_refuses_bad_requests() -> None:
    with pytest.raises(InvalidArgumentError, match="no layer matches"):
        apply_lora_layers(tiny(), num_layers=1, keys=["self_attn.nope"])
    with pytest.raises(UnsupportedError, match="MLP"):
        apply_lora_layers(tiny(), num_layers=1, keys=["mlp"])
    model = apply_lora_layers(tiny(), num_layers=1)
    with pytest.raises(InvalidArgumentError, match="already has adapter"):
        apply_lora_layers(model, num_layers=1)
    with pytest.raises(InvalidArgumentError, match="alpha"):
        linear_to_lora_layers(tiny(), 1, {"rank": 4, "alpha": 16, "dropout": 0.0})


def test_dropout_follows_the_model_mode() -> None:
    model = tiny()
    linear_to_lora_layers(model, 1, {"rank": 4, "scale": SCALE, "dropout": 0.5})
    _train(model)
    np.testing.assert_array_equal(_logits(model), _logits(model))  # eval: no dropout
    model.train()
    assert np.abs(_logits(model) - _logits(model)).max() > 1e-4


# ------------------------------------------------------------------------------ files


def _make_adapter(
    tmp_path: Path, *, dora: bool = False, num_layers: int = 2
) -> tuple[Path, np.ndarray]:
    """An adapter directory for ``tiny()`` and the logits it should produce."""
    model = tiny()
    keys = ("self_attn.q_proj", "mlp.gate_proj", "model.embed_tokens")
    config = AdapterConfig(
        fine_tune_type="dora" if dora else "lora",
        num_layers=num_layers,
        rank=4,
        scale=SCALE,
        keys=keys,
    )
    apply_lora_layers(model, num_layers=num_layers, rank=4, scale=SCALE, keys=keys, use_dora=dora)
    _train(model)
    folder = tmp_path / "adapter"
    save_adapters(folder, model, config, extra={"learning_rate": 1e-5})
    return folder, _logits(model)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_saved_adapters_load_back(tmp_path: Path, dora: bool) -> None:
    folder, expected = _make_adapter(tmp_path, dora=dora)
    document = json.loads((folder / "adapter_config.json").read_text())
    assert document["fine_tune_type"] == ("dora" if dora else "lora")
    assert document["lora_parameters"]["keys"][0] == "self_attn.q_proj"
    assert document["learning_rate"] == 1e-5
    saved = mx.load(str(folder / "adapters.safetensors"))
    leaves = {k.rsplit(".", 1)[1] for k in saved}
    assert leaves == ({"lora_a", "lora_b", "m"} if dora else {"lora_a", "lora_b"})
    model = load_adapters(tiny(), folder)
    np.testing.assert_array_equal(_logits(model), expected)
    # A checkpoint file of the run picks its config from beside it.
    (folder / "0000100_adapters.safetensors").write_bytes(
        (folder / "adapters.safetensors").read_bytes()
    )
    model = load_adapters(tiny(), folder / "0000100_adapters.safetensors")
    np.testing.assert_array_equal(_logits(model), expected)


def test_full_fine_tune_loads_weights_directly(tmp_path: Path) -> None:
    source = tiny(seed=7)
    source.freeze()
    source.layers[-1].unfreeze()
    save_adapters(tmp_path, source, AdapterConfig(fine_tune_type="full", num_layers=1))
    model = load_adapters(tiny(seed=0), tmp_path)
    assert not _adapted(model)
    for (name, got), (_, want) in zip(
        tree_flatten(model.layers[-1].parameters()), tree_flatten(source.layers[-1].parameters())
    ):
        np.testing.assert_array_equal(np.array(got), np.array(want), err_msg=name)
    np.testing.assert_array_equal(
        np.array(model.layers[0].mlp.up_proj.weight),
        np.array(tiny(seed=0).layers[0].mlp.up_proj.weight),
    )
    mx.save_safetensors(str(tmp_path / "adapters.safetensors"), {"model.nope": mx.zeros((2,))})
    with pytest.raises(CheckpointError, match=r"model\.nope"):
        load_adapters(tiny(), tmp_path)


def _edit_config(folder: Path, change: Callable[[dict], Any]) -> None:
    path = folder / "adapter_config.json"
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


def _edit_weights(folder: Path, change: Callable[[dict], Any]) -> None:
    path = folder / "adapters.safetensors"
    weights = dict(mx.load(str(path)))
    change(weights)
    mx.save_safetensors(str(path), weights)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BROKEN: dict[str, tuple[Callable[[Path], Any], str]] = {
    "no-dir": (lambda f: __import__("shutil").rmtree(f), "does not exist"),
    "no-config": (lambda f: (f / "adapter_config.json").unlink(), "no adapter_config.json"),
    "bad-json": (lambda f: (f / "adapter_config.json").write_text("{nope"), "invalid JSON"),
    "not-object": (lambda f: (f / "adapter_config.json").write_text("[1]"), "JSON object"),
    "no-lora-params": (
        lambda f: _edit_config(f, lambda d: d.pop("lora_parameters")),
        "lora_parameters",
    ),
    "alpha": (
        lambda f: _edit_config(f, lambda d: d["lora_parameters"].update(alpha=16, scale=None)),
        "alpha",
    ),
    "bad-rank": (
        lambda f: _edit_config(f, lambda d: d["lora_parameters"].update(rank="4")),
        "rank",
    ),
    "no-weights": (lambda f: (f / "adapters.safetensors").unlink(), "no adapters.safetensors"),
    "garbage-weights": (
        lambda f: (f / "adapters.safetensors").write_bytes(b"\x00" * 64),
        "cannot read",
    ),
    "truncated-weights": (lambda f: _truncate(f / "adapters.safetensors"), "cannot read"),
    "extra-tensor": (
        lambda f: _edit_weights(
            f, lambda w: w.update({"model.layers.0.mlp.up_proj.lora_a": mx.zeros((64, 4))})
        ),
        "unexpected",
    ),
    "missing-tensor": (
        lambda f: _edit_weights(f, lambda w: w.pop("model.layers.2.self_attn.q_proj.lora_b")),
        "missing",
    ),
    "wrong-rank": (
        lambda f: _edit_config(f, lambda d: d["lora_parameters"].update(rank=8)),
        "shape",
    ),
    "wrong-num-layers": (lambda f: _edit_config(f, lambda d: d.update(num_layers=1)), "unexpected"),
    "keys-match-nothing": (
        lambda f: _edit_config(f, lambda d: d["lora_parameters"].update(keys=["nope"])),
        "no layer matches",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_adapters_are_refused_and_leave_the_model_alone(tmp_path: Path, case: str) -> None:
    folder, _ = _make_adapter(tmp_path, dora=True)
    breaker, words = BROKEN[case]
    breaker(folder)
    model = tiny()
    base = _logits(model)
    with pytest.raises(CheckpointError, match=words) as info:
        load_adapters(model, folder)
    assert "\n" not in str(info.value)
    assert not _adapted(model)
    np.testing.assert_array_equal(_logits(model), base)


def test_unknown_fine_tune_type_is_unsupported(tmp_path: Path) -> None:
    folder, _ = _make_adapter(tmp_path)
    _edit_config(folder, lambda d: d.update(fine_tune_type="ia3"))
    with pytest.raises(UnsupportedError, match="ia3"):
        load_adapters(tiny(), folder)


def test_config_round_trips_through_the_mlx_lm_layout() -> None:
    config = AdapterConfig(
        fine_tune_type="dora", num_layers=-1, rank=16, scale=10.0, dropout=0.05, keys=("a.b",)
    )
    assert AdapterConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert (
        AdapterConfig.from_dict(
            {"num_layers": 4, "lora_parameters": {"rank": 2, "scale": 1}}
        ).fine_tune_type
        == "lora"
    )
    with pytest.raises(UnsupportedError):
        AdapterConfig(fine_tune_type="qlora")
