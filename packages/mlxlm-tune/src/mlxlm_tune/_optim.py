"""Optimizers and learning-rate schedules (with warmup) by name, from flags or YAML."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
from mlxlm_core import InvalidArgumentError

__all__ = ["OPTIMIZERS", "SCHEDULES", "build_optimizer", "build_schedule", "schedule_from_config"]

OPTIMIZERS: dict[str, type[optim.Optimizer]] = {
    "adam": optim.Adam,
    "adamw": optim.AdamW,
    "sgd": optim.SGD,
    "adafactor": optim.Adafactor,
}
if hasattr(optim, "Muon"):  # MLX >= 0.29
    OPTIMIZERS["muon"] = optim.Muon

SCHEDULES = ("constant", "cosine", "linear", "exponential")

Schedule = Callable[[mx.array], mx.array]


def build_schedule(
    learning_rate: float,
    *,
    name: str = "constant",
    total_steps: int,
    warmup: int = 0,
    warmup_init: float = 0.0,
    end: float = 0.0,
    decay_rate: float = 0.999,
) -> float | Schedule:
    """A learning rate or schedule over ``total_steps`` optimizer steps.

    ``warmup`` steps rise linearly from ``warmup_init`` to ``learning_rate``; the named
    schedule then runs over the remaining steps: ``constant``, ``cosine`` / ``linear``
    decay to ``end``, or ``exponential`` (``learning_rate * decay_rate ** step``).
    """
    if name not in SCHEDULES:
        raise InvalidArgumentError(
            f"lr schedule must be one of {', '.join(SCHEDULES)}; got {name!r}"
        )
    if learning_rate <= 0:
        raise InvalidArgumentError(f"learning rate must be > 0, got {learning_rate}")
    if warmup < 0 or warmup > total_steps:
        raise InvalidArgumentError(f"warmup must be in [0, {total_steps}] steps, got {warmup}")
    steps = max(total_steps - warmup, 1)
    main: float | Schedule
    if name == "constant":
        main = (
            learning_rate if not warmup else optim.linear_schedule(learning_rate, learning_rate, 1)
        )
    elif name == "cosine":
        main = optim.cosine_decay(learning_rate, steps, end)
    elif name == "linear":
        main = optim.linear_schedule(learning_rate, end, steps)
    else:
        main = optim.exponential_decay(learning_rate, decay_rate)
    if not warmup:
        return main
    assert callable(main)
    ramp = optim.linear_schedule(warmup_init, learning_rate, warmup)
    return optim.join_schedules([ramp, main], [warmup])


def schedule_from_config(config: Mapping[str, Any], *, total_steps: int) -> float | Schedule:
    """MLX-LM's YAML form ``{name: cosine_decay, arguments: [...], warmup, warmup_init}``,
    or this package's ``{name: cosine, learning_rate, warmup, warmup_init, end}``."""
    name = config.get("name")
    if not isinstance(name, str):
        raise InvalidArgumentError("lr_schedule needs a 'name'")
    if "arguments" in config:
        fn = getattr(optim.schedulers, name, None)
        if fn is None or not callable(fn):
            raise InvalidArgumentError(f"lr_schedule.name {name!r} is not an MLX schedule")
        arguments = list(config["arguments"])
        try:
            main = fn(*arguments)
        except TypeError as exc:
            raise InvalidArgumentError(f"lr_schedule.arguments: {exc}") from None
        warmup = int(config.get("warmup", 0))
        if not warmup:
            return main
        ramp = optim.linear_schedule(float(config.get("warmup_init", 0.0)), arguments[0], warmup)
        return optim.join_schedules([ramp, main], [warmup + 1])
    if "learning_rate" not in config:
        raise InvalidArgumentError("lr_schedule needs 'learning_rate' (or MLX-LM's 'arguments')")
    return build_schedule(
        float(config["learning_rate"]),
        name=name,
        total_steps=total_steps,
        warmup=int(config.get("warmup", 0)),
        warmup_init=float(config.get("warmup_init", 0.0)),
        end=float(config.get("end", 0.0)),
    )


def build_optimizer(
    name: str, learning_rate: float | Schedule, options: Mapping[str, Any] | None = None
) -> optim.Optimizer:
    """``adam``, ``adamw``, ``sgd``, ``adafactor`` or ``muon`` with extra keyword options."""
    key = name.lower()
    if key not in OPTIMIZERS:
        raise InvalidArgumentError(
            f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {name!r}"
        )
    cls = OPTIMIZERS[key]
    options = dict(options or {})
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise InvalidArgumentError(
            f"optimizer_config.{key}: unknown option(s) {', '.join(unknown)} "
            f"(accepted: {', '.join(sorted(accepted - {'learning_rate'}))})"
        )
    if key == "adafactor":
        options.setdefault("relative_step", False)  # use the given learning rate
        options.setdefault("scale_parameter", False)
    return cls(learning_rate=learning_rate, **options)  # type: ignore[call-arg]
