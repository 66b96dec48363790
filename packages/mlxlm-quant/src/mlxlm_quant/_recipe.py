"""One quantization recipe shared by ``mlxlm quantize`` and the learned quantizers.

A recipe says, for every quantizable layer (anything with ``to_quantized``: linear,
embedding, expert layers), which :class:`~mlxlm_core.quantize.QuantSpec` it gets or whether
it stays in float. It is plain data, so a user can write it as a JSON or YAML file::

    mode: affine
    bits: 3
    group_size: 64
    keep_float: ["model.embed_tokens"]
    rules:
      - match: "*.v_proj"           # fnmatch pattern on the module path
        layers: q4_k_m              # optional: only these block indices (see below)
        bits: 6
      - match: "lm_head"
        bits: 6

Rules apply in order and later ones win. ``layers`` is a list of block indices or
``"q4_k_m"``: the first and last eighth of the blocks and every third one between them,
the layers llama.cpp's Q4_K_M keeps at higher precision (MLX-LM's mixed recipes use the same
choice). A rule or ``keep_float`` pattern that matches no layer is an error, so a typo does
not silently quantize everything uniformly.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.nn as nn
from mlxlm_core import InvalidArgumentError, UnsupportedError
from mlxlm_core.quantize import QUANT_MODES, QuantSpec, quantize_model

__all__ = ["PRESETS", "LayerRule", "QuantRecipe", "preset"]

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
_RULE_KEYS = {"match", "layers", "bits", "group_size", "mode", "float", "required"}
_RECIPE_KEYS = {"mode", "bits", "group_size", "keep_float", "rules", "name"}


@dataclass(frozen=True)
class LayerRule:
    """Override the spec (or keep float) for layers whose path matches ``match``."""

    match: str
    layers: tuple[int, ...] | str | None = None  # block indices, "q4_k_m", or all
    bits: int | None = None
    group_size: int | None = None
    mode: str | None = None
    float: bool = False
    required: bool = True  # False: matching nothing is fine (built-in recipes)

    def __post_init__(self) -> None:
        if isinstance(self.layers, str) and self.layers != "q4_k_m":
            raise InvalidArgumentError(
                f"rule {self.match!r}: layers must be a list of indices or 'q4_k_m', "
                f"got {self.layers!r}"
            )

    def selects(self, path: str, num_blocks: int) -> bool:
        if not fnmatch.fnmatchcase(path, self.match):
            return False
        if self.layers is None:
            return True
        found = _LAYER_INDEX.search(path)
        if found is None:
            return False
        index = int(found.group(1))
        if self.layers == "q4_k_m":
            return _q4_k_m(index, num_blocks)
        return index in self.layers

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"match": self.match}
        if self.layers is not None:
            out["layers"] = list(self.layers) if isinstance(self.layers, tuple) else self.layers
        for key in ("bits", "group_size", "mode"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.float:
            out["float"] = True
        if not self.required:
            out["required"] = False
        return out


def _q4_k_m(index: int, num_blocks: int) -> bool:
    eighth = num_blocks // 8
    return index < eighth or index >= 7 * num_blocks // 8 or (index - eighth) % 3 == 2


@dataclass(frozen=True)
class QuantRecipe:
    """How a whole model is quantized: a default spec, ordered rules, layers kept float.

    ``predicate`` (Python only, not saved) may refine the result per layer like
    :func:`mlxlm_core.quantize.quantize_model`'s: return False to keep a layer in float or a
    dict overriding bits/group_size/mode.
    """

    bits: int = 4
    group_size: int | None = None
    mode: str = "affine"
    rules: tuple[LayerRule, ...] = ()
    keep_float: tuple[str, ...] = ()
    name: str | None = None
    predicate: Callable[[str, nn.Module], bool | dict[str, Any]] | None = field(
        default=None, compare=False
    )

    def __post_init__(self) -> None:
        if self.mode not in QUANT_MODES:
            raise UnsupportedError(
                f"quantization mode {self.mode!r} is not supported "
                f"(supported: {', '.join(QUANT_MODES)})"
            )
        if self.group_size is None:
            object.__setattr__(self, "group_size", QUANT_MODES[self.mode][2])
        _ = self.spec  # validates bits/group/mode
        for rule in self.rules:
            self._rule_spec(rule)

    @property
    def spec(self) -> QuantSpec:
        assert self.group_size is not None
        return QuantSpec(bits=self.bits, group_size=self.group_size, mode=self.mode)

    def _rule_spec(self, rule: LayerRule) -> QuantSpec | None:
        if rule.float:
            return None
        mode = rule.mode or self.mode
        group = rule.group_size
        if group is None:
            group = self.group_size if mode == self.mode else QUANT_MODES[mode][2]
        assert group is not None
        return QuantSpec(bits=rule.bits or self.bits, group_size=group, mode=mode)

    # -- applying -----------------------------------------------------------------------

    def plan(self, model: nn.Module) -> dict[str, QuantSpec | None]:
        """Each quantizable layer's spec (None: kept float), checking every rule matches."""
        layers = quantizable_layers(model)
        num_blocks = len(getattr(model, "layers", []))
        plan: dict[str, QuantSpec | None] = {}
        used_rules = [False] * len(self.rules)
        used_float = [False] * len(self.keep_float)
        for path, module in layers.items():
            spec: QuantSpec | None = self.spec
            for i, rule in enumerate(self.rules):
                if rule.selects(path, num_blocks):
                    used_rules[i] = True
                    spec = self._rule_spec(rule)
            for i, pattern in enumerate(self.keep_float):
                if fnmatch.fnmatchcase(path, pattern):
                    used_float[i] = True
                    spec = None
            if spec is not None and self.predicate is not None:
                decided = self.predicate(path, module)
                if decided is False:
                    spec = None
                elif isinstance(decided, dict):
                    spec = QuantSpec(**{**spec.as_config(), **decided})
            if spec is not None and module.weight.shape[-1] % spec.group_size:
                spec = None  # MLX needs whole groups; such layers stay float
            plan[path] = spec
        unused = [r.match for r, u in zip(self.rules, used_rules) if not u and r.required]
        unused += [p for p, u in zip(self.keep_float, used_float) if not u]
        if unused:
            sample = ", ".join(list(layers)[:3])
            raise InvalidArgumentError(
                f"recipe names layers that do not exist: {', '.join(unused)} "
                f"(layer paths look like: {sample}, ...)"
            )
        return plan

    def apply(self, model: nn.Module, *, plan: dict[str, QuantSpec | None] | None = None) -> dict:
        """Quantize ``model`` in place by round-to-nearest; returns its config block."""
        plan = self.plan(model) if plan is None else plan
        return quantize_with_plan(model, plan, default=self.spec)

    # -- (de)serialising ----------------------------------------------------------------

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode, "bits": self.bits, "group_size": self.group_size}
        if self.name:
            out["name"] = self.name
        if self.keep_float:
            out["keep_float"] = list(self.keep_float)
        if self.rules:
            out["rules"] = [r.as_dict() for r in self.rules]
        if self.predicate is not None:
            out["predicate"] = getattr(self.predicate, "__qualname__", "custom")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "recipe") -> QuantRecipe:
        if not isinstance(data, dict):
            raise InvalidArgumentError(f"{source}: a recipe must be a mapping")
        unknown = set(data) - _RECIPE_KEYS
        if unknown:
            raise InvalidArgumentError(f"{source}: unknown recipe keys {sorted(unknown)}")
        rules = []
        for i, raw in enumerate(data.get("rules") or []):
            if not isinstance(raw, dict) or "match" not in raw:
                raise InvalidArgumentError(f"{source}: rule {i} needs a 'match' pattern")
            bad = set(raw) - _RULE_KEYS
            if bad:
                raise InvalidArgumentError(f"{source}: rule {i} has unknown keys {sorted(bad)}")
            layers = raw.get("layers")
            if isinstance(layers, list):
                layers = tuple(int(x) for x in layers)
            rules.append(
                LayerRule(
                    match=str(raw["match"]),
                    layers=layers,
                    bits=raw.get("bits"),
                    group_size=raw.get("group_size"),
                    mode=raw.get("mode"),
                    float=bool(raw.get("float", False)),
                    required=bool(raw.get("required", True)),
                )
            )
        mode = data.get("mode", "affine")
        default_bits = 4 if mode == "affine" or mode not in QUANT_MODES else QUANT_MODES[mode][0][0]
        return cls(
            bits=int(data.get("bits", default_bits)),
            group_size=data.get("group_size"),
            mode=mode,
            rules=tuple(rules),
            keep_float=tuple(str(p) for p in data.get("keep_float") or ()),
            name=data.get("name"),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> QuantRecipe:
        """Read a recipe from a ``.json``, ``.yaml`` or ``.yml`` file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidArgumentError(f"{path}: cannot read the recipe ({exc})") from None
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise InvalidArgumentError(
                    f"{path}: invalid YAML ({exc})".replace("\n", " ")
                ) from None
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise InvalidArgumentError(f"{path}: invalid JSON ({exc})") from None
        return cls.from_dict(data, source=str(path))


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every leaf layer MLX can quantize, by module path, in model order."""
    return {
        path: module
        for path, module in model.named_modules()
        if hasattr(module, "to_quantized") and getattr(module, "weight", None) is not None
    }


def quantize_with_plan(
    model: nn.Module, plan: dict[str, QuantSpec | None], *, default: QuantSpec
) -> dict[str, Any]:
    """Swap in quantized layers per ``plan`` with core's quantizer; the config block."""

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        spec = plan.get(path)
        return False if spec is None else spec.as_config()

    return quantize_model(
        model,
        bits=default.bits,
        group_size=default.group_size,
        mode=default.mode,
        predicate=predicate,
    )


def _mixed(low: int, high: int) -> QuantRecipe:
    # Optional rules: an architecture without one of these layers (a tied head, fused
    # projections) simply keeps the low width there, as MLX-LM's recipes do.
    return QuantRecipe(
        bits=low,
        group_size=64,
        name=f"mixed_{low}_{high}",
        rules=(
            LayerRule(match="*.v_proj", layers="q4_k_m", bits=high, required=False),
            LayerRule(match="*.down_proj", layers="q4_k_m", bits=high, required=False),
            LayerRule(match="lm_head", bits=high, required=False),
        ),
    )


PRESETS: dict[str, Callable[[], QuantRecipe]] = {
    "mixed_2_6": lambda: _mixed(2, 6),
    "mixed_3_4": lambda: _mixed(3, 4),
    "mixed_3_6": lambda: _mixed(3, 6),
    "mixed_4_6": lambda: _mixed(4, 6),
}


def preset(name: str) -> QuantRecipe:
    """A named built-in recipe (``mixed_2_6``, ``mixed_3_4``, ``mixed_3_6``, ``mixed_4_6``)."""
    if name not in PRESETS:
        raise InvalidArgumentError(f"unknown recipe {name!r} (built in: {', '.join(PRESETS)})")
    return PRESETS[name]()
