"""QuantRecipe: presets agree with MLX-LM's mixed recipes, files parse, bad recipes fail."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.nn as nn
import pytest
from mlxlm_core import InvalidArgumentError, UnsupportedError, load_model
from mlxlm_quant import PRESETS, LayerRule, QuantRecipe, preset


@pytest.fixture(scope="module")
def deep(tiny_factory) -> nn.Module:
    # 16 blocks so the "first/last eighth, every third" choice is not trivial; untied head.
    return load_model(tiny_factory(layers=16, tied=False))[0]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_choose_what_mlx_lm_chooses(deep: nn.Module, name: str) -> None:
    from mlx_lm.convert import mixed_quant_predicate_builder

    theirs = mixed_quant_predicate_builder(name, deep, group_size=64)
    plan = preset(name).plan(deep)
    assert len(plan) == 16 * 7 + 2
    for path, spec in plan.items():
        module = dict(deep.named_modules())[path]
        expected = theirs(path, module)
        assert spec is not None
        assert (spec.bits, spec.group_size, spec.mode) == (
            expected["bits"],
            expected["group_size"],
            expected["mode"],
        ), path


def test_rules_apply_in_order_and_keep_float(deep: nn.Module) -> None:
    recipe = QuantRecipe(
        bits=4,
        group_size=32,
        rules=(
            LayerRule(match="model.layers.*.mlp.*", bits=2),
            LayerRule(match="*.down_proj", layers=(0, 15), bits=8, group_size=64),
        ),
        keep_float=("lm_head",),
    )
    plan = recipe.plan(deep)
    assert plan["lm_head"] is None
    assert plan["model.layers.0.mlp.down_proj"].bits == 8
    assert plan["model.layers.0.mlp.down_proj"].group_size == 64
    assert plan["model.layers.1.mlp.down_proj"].bits == 2
    assert plan["model.layers.1.self_attn.q_proj"].bits == 4
    assert plan["model.embed_tokens"].group_size == 32


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_recipe_files_round_trip(tmp_path: Path, suffix: str) -> None:
    data = {
        "name": "mine",
        "mode": "affine",
        "bits": 3,
        "group_size": 64,
        "keep_float": ["model.embed_tokens"],
        "rules": [
            {"match": "*.v_proj", "layers": "q4_k_m", "bits": 6},
            {"match": "lm_head", "mode": "mxfp8", "bits": 8},
        ],
    }
    path = tmp_path / f"r{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(data))
    else:
        import yaml

        path.write_text(yaml.safe_dump(data))
    recipe = QuantRecipe.from_file(path)
    assert recipe.as_dict() == data
    assert QuantRecipe.from_dict(recipe.as_dict()) == recipe


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"bits": 7}, UnsupportedError),
        ({"bits": 4, "group_size": 48}, UnsupportedError),
        ({"mode": "int4"}, UnsupportedError),
        ({"mode": "mxfp4", "bits": 8}, UnsupportedError),
        ({"mode": "nvfp4", "group_size": 32}, UnsupportedError),
    ],
)
def test_unsupported_combinations_are_refused(kwargs: dict, error: type) -> None:
    with pytest.raises(error) as info:
        QuantRecipe(**kwargs)
    assert "\n" not in str(info.value)


def test_rule_with_unsupported_width_is_refused() -> None:
    with pytest.raises(UnsupportedError):
        QuantRecipe(rules=(LayerRule(match="*", bits=7),))


def test_missing_layers_are_named(deep: nn.Module) -> None:
    recipe = QuantRecipe(rules=(LayerRule(match="*.qkv_proj", bits=8),), keep_float=("head",))
    with pytest.raises(InvalidArgumentError, match=r"qkv_proj, head"):
        recipe.plan(deep)


def test_bad_files(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("{not json")
    (tmp_path / "b.yaml").write_text("bits: [")
    (tmp_path / "c.json").write_text(json.dumps({"bits": 4, "colour": "red"}))
    (tmp_path / "d.json").write_text(json.dumps({"rules": [{"bits": 4}]}))
    for name in ("a.json", "b.yaml", "c.json", "d.json", "missing.json"):
        with pytest.raises(InvalidArgumentError) as info:
            QuantRecipe.from_file(tmp_path / name)
        assert "\n" not in str(info.value)
