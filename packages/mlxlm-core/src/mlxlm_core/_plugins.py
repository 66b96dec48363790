"""Optional model formats, found through the `mlxlm.loaders` entry-point group.

Core reads MLX / Hugging Face model directories itself. Other formats (GGUF first) live in
separate distributions so that `pip install mlxlm-core` stays small; such a package
registers a loader in its pyproject.toml:

    [project.entry-points."mlxlm.loaders"]
    gguf = "mlxlm_gguf._loader:GGUFLoader"

The entry point names a class (instantiated with no arguments) or an object that
satisfies `ModelLoader`. Core asks each loader in turn whether it can open a path, and the
first that says yes converts it into a model directory core can load. Core never imports
a sibling package by name.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

from ._errors import CheckpointError, UnsupportedError

logger = logging.getLogger("mlxlm_core")

LOADERS_GROUP = "mlxlm.loaders"

# Formats that have a plugin we publish: suffix → (format name, what to install).
KNOWN_FORMATS = {".gguf": ("GGUF", "mlxlm-gguf")}


@runtime_checkable
class ModelLoader(Protocol):
    """What a `mlxlm.loaders` plugin provides."""

    def can_open(self, path: Path) -> bool:
        """Cheap check (suffix, magic bytes): is `path` in this loader's format?"""
        ...

    def to_mlx_dir(self, path: Path) -> Path:
        """A model directory (config.json, safetensors, tokenizer) holding `path`'s model.

        Loaders convert once into a cache and reuse the result while the source file is
        unchanged. Errors caused by the file raise `MlxlmError` subclasses.
        """
        ...


def discover_loaders() -> list[tuple[str, ModelLoader]]:
    """Installed loaders as (entry-point name, loader); broken plugins are skipped.

    A plugin that fails to import is logged rather than raised, so one broken package
    cannot stop models in other formats from loading.
    """
    found: list[tuple[str, ModelLoader]] = []
    for ep in sorted(importlib.metadata.entry_points(group=LOADERS_GROUP), key=lambda e: e.name):
        try:
            obj = ep.load()
            loader = obj() if isinstance(obj, type) else obj
        except Exception as e:
            logger.warning("mlxlm.loaders plugin %r (%s) failed to load: %s", ep.name, ep.value, e)
            continue
        if not isinstance(loader, ModelLoader):
            logger.warning(
                "mlxlm.loaders plugin %r (%s) lacks can_open/to_mlx_dir", ep.name, ep.value
            )
            continue
        found.append((ep.name, loader))
    return found


def open_with_plugins(
    path: Path, *, loaders: Iterable[tuple[str, ModelLoader]] | None = None
) -> Path | None:
    """The model directory a plugin makes of `path`, or None when no plugin claims it.

    `loaders` defaults to the installed ones (`discover_loaders()`). A file in a format we
    publish a plugin for, with that plugin missing, raises UnsupportedError saying what to
    install instead of returning None, so the user is not told the file "is not a model".
    """
    path = Path(path)
    for name, loader in discover_loaders() if loaders is None else loaders:
        if loader.can_open(path):
            out = Path(loader.to_mlx_dir(path))
            if not (out / "config.json").is_file():
                raise CheckpointError(f"loader {name!r} produced no config.json for {path}")
            return out
    known = KNOWN_FORMATS.get(path.suffix.lower())
    if known is not None:
        fmt, package = known
        raise UnsupportedError(
            f"{path} is a {fmt} file; reading it needs a plugin: pip install {package}"
        )
    return None
