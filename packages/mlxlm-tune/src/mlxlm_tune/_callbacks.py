"""Training callbacks: a progress bar, printed reports, a metrics file, optional reporters.

A callback receives plain dicts (``iteration``, ``train_loss``, ``learning_rate``,
``tokens_per_second``, ``trained_tokens``, ``peak_memory`` in GB; ``val_loss`` /
``val_time`` for validation), MLX-LM's keys, so its reporters port over. Reporters for
hosted services are optional extras: ``--report-to wandb`` needs ``mlxlm-tune[wandb]``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from mlxlm_core import InvalidArgumentError

__all__ = [
    "CallbackList",
    "JSONLReporter",
    "PrintReporter",
    "ProgressBar",
    "TrainingCallback",
    "WandBReporter",
    "make_reporters",
]


class TrainingCallback:
    """Override what you need; every hook is optional."""

    def on_train_begin(self, info: dict[str, Any]) -> None:
        pass

    def on_step_end(self, info: dict[str, Any]) -> None:
        """After every optimizer step: ``iteration``, ``loss``, ``tokens``, ``seconds``."""

    def on_train_loss_report(self, train_info: dict[str, Any]) -> None:
        pass

    def on_val_loss_report(self, val_info: dict[str, Any]) -> None:
        pass

    def on_checkpoint(self, info: dict[str, Any]) -> None:
        pass

    def on_train_end(self, info: dict[str, Any]) -> None:
        pass


class CallbackList(TrainingCallback):
    def __init__(self, callbacks: Sequence[TrainingCallback] = ()) -> None:
        self.callbacks = list(callbacks)

    def _each(self, name: str, info: dict[str, Any]) -> None:
        for callback in self.callbacks:
            getattr(callback, name)(info)

    def on_train_begin(self, info: dict[str, Any]) -> None:
        self._each("on_train_begin", info)

    def on_step_end(self, info: dict[str, Any]) -> None:
        self._each("on_step_end", info)

    def on_train_loss_report(self, train_info: dict[str, Any]) -> None:
        self._each("on_train_loss_report", train_info)

    def on_val_loss_report(self, val_info: dict[str, Any]) -> None:
        self._each("on_val_loss_report", val_info)

    def on_checkpoint(self, info: dict[str, Any]) -> None:
        self._each("on_checkpoint", info)

    def on_train_end(self, info: dict[str, Any]) -> None:
        self._each("on_train_end", info)


class ProgressBar(TrainingCallback):
    """A tqdm bar with loss, tokens/s and peak memory — only when ``stream`` is a terminal."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.bar: Any = None

    def on_train_begin(self, info: dict[str, Any]) -> None:
        if not self.stream.isatty():
            return
        from tqdm import tqdm

        self.bar = tqdm(
            total=info["iters"], initial=info.get("start", 0), unit="step", file=self.stream
        )

    def on_step_end(self, info: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_train_loss_report(self, train_info: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{train_info['train_loss']:.3f}",
                tok_s=f"{train_info['tokens_per_second']:.0f}",
                mem=f"{train_info['peak_memory']:.2f}GB",
            )

    def on_train_end(self, info: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class PrintReporter(TrainingCallback):
    """One line per report on ``stream`` (MLX-LM's wording), for logs and pipes."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def on_train_loss_report(self, train_info: dict[str, Any]) -> None:
        i = train_info
        self._print(
            f"Iter {i['iteration']}: Train loss {i['train_loss']:.3f}, "
            f"Learning Rate {i['learning_rate']:.3e}, It/sec {i['iterations_per_second']:.3f}, "
            f"Tokens/sec {i['tokens_per_second']:.1f}, Trained Tokens {i['trained_tokens']}, "
            f"Peak mem {i['peak_memory']:.3f} GB"
        )

    def on_val_loss_report(self, val_info: dict[str, Any]) -> None:
        self._print(
            f"Iter {val_info['iteration']}: Val loss {val_info['val_loss']:.3f}, "
            f"Val took {val_info['val_time']:.3f}s"
        )

    def on_checkpoint(self, info: dict[str, Any]) -> None:
        self._print(f"Iter {info['iteration']}: Saved checkpoint to {info['path']}")


class JSONLReporter(TrainingCallback):
    """Appends every report as one JSON line to ``path`` (``metrics.jsonl``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _write(self, kind: str, info: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"event": kind, **info}) + "\n")

    def on_train_loss_report(self, train_info: dict[str, Any]) -> None:
        self._write("train", train_info)

    def on_val_loss_report(self, val_info: dict[str, Any]) -> None:
        self._write("val", val_info)


class WandBReporter(TrainingCallback):
    """Logs reports to Weights & Biases (``pip install 'mlxlm-tune[wandb]'``)."""

    def __init__(self, *, project: str, run_dir: str | Path, config: dict[str, Any]) -> None:
        try:
            import wandb  # type: ignore[import-not-found]
        except ImportError:
            raise ImportError(
                "--report-to wandb needs the 'wandb' extra: pip install 'mlxlm-tune[wandb]'"
            ) from None
        self.wandb = wandb
        wandb.init(project=project, name=Path(run_dir).name, dir=str(run_dir), config=config)

    def on_train_loss_report(self, train_info: dict[str, Any]) -> None:
        self.wandb.log(train_info, step=train_info["iteration"])

    def on_val_loss_report(self, val_info: dict[str, Any]) -> None:
        self.wandb.log(val_info, step=val_info["iteration"])

    def on_train_end(self, info: dict[str, Any]) -> None:
        self.wandb.finish()


def make_reporters(
    report_to: str | None, *, run_dir: str | Path, project: str | None, config: dict[str, Any]
) -> list[TrainingCallback]:
    """Reporters named in ``report_to`` (comma separated): ``wandb``, ``jsonl``."""
    out: list[TrainingCallback] = []
    for name in [n.strip() for n in (report_to or "").split(",") if n.strip()]:
        if name == "wandb":
            out.append(
                WandBReporter(project=project or Path(run_dir).name, run_dir=run_dir, config=config)
            )
        elif name == "jsonl":
            out.append(JSONLReporter(Path(run_dir) / "metrics.jsonl"))
        else:
            raise InvalidArgumentError(
                f"--report-to: unknown reporter {name!r} (known: wandb, jsonl)"
            )
    return out
