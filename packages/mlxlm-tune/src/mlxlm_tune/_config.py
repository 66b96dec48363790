"""The training configuration: one dataclass, filled from defaults, a YAML file and flags.

Field names are MLX-LM's (``fine_tune_type``, ``lora_parameters``, ``steps_per_eval`` …) so
its YAML configs load unchanged; a misspelt or unknown key is an error that names it rather
than a silently ignored option. Precedence: flags given on the command line, then the YAML
file, then these defaults.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxlm_core import InvalidArgumentError
from mlxlm_core.adapters import FINE_TUNE_TYPES, AdapterConfig

from ._optim import OPTIMIZERS, SCHEDULES

__all__ = ["LOSSES", "TrainingConfig", "load_yaml"]

LOSSES = ("sft", "dpo", "orpo")
_LORA_KEYS = {"rank", "scale", "dropout", "keys"}


def _default_lora() -> dict[str, Any]:
    return {"rank": 8, "scale": 20.0, "dropout": 0.0}


@dataclass
class TrainingConfig:
    """Everything ``mlxlm lora`` and :func:`mlxlm_tune.train` need to know."""

    model: str | None = None
    data: str = "data"
    data_format: str | None = None
    train: bool = True
    test: bool = False
    fine_tune_type: str = "lora"
    loss: str = "sft"
    beta: float = 0.1
    num_layers: int = 16
    lora_parameters: dict[str, Any] = field(default_factory=_default_lora)
    optimizer: str = "adam"
    optimizer_config: dict[str, Any] = field(default_factory=dict)
    learning_rate: float = 1e-5
    lr_schedule: str | dict[str, Any] | None = None
    warmup: int = 0
    warmup_init: float = 0.0
    lr_end: float = 0.0
    batch_size: int = 4
    iters: int = 1000
    val_batches: int = 25
    test_batches: int = 500
    steps_per_report: int = 10
    steps_per_eval: int = 200
    save_every: int = 100
    adapter_path: str = "adapters"
    resume: str | None = None
    resume_adapter_file: str | None = None
    max_seq_length: int = 2048
    truncate: bool = False
    mask_prompt: bool = True
    pack: bool = False
    bucket: bool = True
    grad_checkpoint: bool = False
    grad_accumulation_steps: int = 1
    grad_clip: float | None = None
    clear_cache_threshold: int = 0
    seed: int = 0
    report_to: str | None = None
    project_name: str | None = None
    compile: bool = True
    dtype: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    # -- checks --------------------------------------------------------------------------------

    def validate(self) -> None:
        def bad(name: str, why: str) -> InvalidArgumentError:
            return InvalidArgumentError(f"{name}: {why}")

        if self.fine_tune_type not in FINE_TUNE_TYPES:
            raise bad("fine_tune_type", f"must be one of {', '.join(FINE_TUNE_TYPES)}")
        if self.loss not in LOSSES:
            raise bad("loss", f"must be one of {', '.join(LOSSES)}")
        if self.optimizer.lower() not in OPTIMIZERS:
            raise bad("optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
        if isinstance(self.lr_schedule, str) and self.lr_schedule not in SCHEDULES:
            raise bad("lr_schedule", f"must be one of {', '.join(SCHEDULES)} or a mapping")
        for name in ("batch_size", "iters", "grad_accumulation_steps", "max_seq_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(name, f"must be a positive integer, got {value!r}")
        for name in ("steps_per_report", "steps_per_eval"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        if self.save_every < 0:
            raise bad("save_every", "must be >= 0 (0: only at the end)")
        if self.learning_rate <= 0:
            raise bad("learning_rate", f"must be > 0, got {self.learning_rate}")
        if self.warmup < 0 or self.warmup > self.iters:
            raise bad("warmup", f"must be in [0, iters={self.iters}]")
        if not isinstance(self.lora_parameters, Mapping):
            raise bad("lora_parameters", "must be a mapping of rank, scale, dropout, keys")
        unknown = sorted(set(self.lora_parameters) - _LORA_KEYS)
        if unknown:
            raise bad("lora_parameters", f"unknown key(s) {', '.join(unknown)}")
        self.adapter_config()  # rank / scale / dropout ranges

    def adapter_config(self) -> AdapterConfig:
        params = {**_default_lora(), **self.lora_parameters}
        rank, scale, dropout = params["rank"], params["scale"], params["dropout"]
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise InvalidArgumentError(
                f"lora_parameters.rank: must be a positive integer, got {rank!r}"
            )
        if not isinstance(scale, int | float):
            raise InvalidArgumentError(f"lora_parameters.scale: must be a number, got {scale!r}")
        if not isinstance(dropout, int | float) or not 0.0 <= dropout < 1.0:
            raise InvalidArgumentError(
                f"lora_parameters.dropout: must be in [0, 1), got {dropout!r}"
            )
        keys = params.get("keys")
        return AdapterConfig(
            fine_tune_type=self.fine_tune_type,
            num_layers=self.num_layers,
            rank=rank,
            scale=float(scale),
            dropout=float(dropout),
            keys=None if keys is None else tuple(keys),
        )

    def optimizer_options(self) -> dict[str, Any]:
        """Options for the chosen optimizer: MLX-LM nests them per optimizer name."""
        name = self.optimizer.lower()
        nested = {k: v for k, v in self.optimizer_config.items() if k in OPTIMIZERS}
        if nested:
            value = nested.get(name) or {}
            if not isinstance(value, Mapping):
                raise InvalidArgumentError(f"optimizer_config.{name}: must be a mapping")
            return dict(value)
        return dict(self.optimizer_config)

    # -- building ------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "config") -> TrainingConfig:
        """Build from a mapping; unknown keys are refused by name."""
        names = {f.name for f in dataclasses.fields(cls)}
        # Keys MLX-LM's YAML files may carry that mean nothing here.
        unknown = sorted(set(values) - names - {"config", "trust_remote_code", "hf_dataset"})
        if unknown:
            raise InvalidArgumentError(f"{source}: unknown option(s) {', '.join(unknown)}")
        try:
            return cls(**{k: v for k, v in values.items() if k in names})
        except TypeError as exc:
            raise InvalidArgumentError(f"{source}: {exc}") from None

    def merged(self, overrides: Mapping[str, Any]) -> TrainingConfig:
        """A copy with ``overrides`` (None values ignored) applied."""
        current = dataclasses.asdict(self)
        current.update({k: v for k, v in overrides.items() if v is not None})
        return TrainingConfig.from_dict(current)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a mapping (floats like ``1e-5`` read as numbers, not strings)."""
    import re

    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    loader = _Loader
    # YAML 1.1 reads ``1e-5`` (no dot) as a string; accept it as a float like MLX-LM does.
    loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?(?:[eE][-+]?\d+)$|^[-+]?\d[\d_]*\.\d*$"),
        list("-+0123456789."),
    )
    path = Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
    except FileNotFoundError:
        raise InvalidArgumentError(f"{path}: no such config file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InvalidArgumentError(f"{path}{where}: invalid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidArgumentError(f"{path}: expected a mapping of options at the top level")
    return data
