"""The `mlxlm.loaders` plugin: core hands us `.gguf` paths, we hand back a model directory.

Imports are cached under `$MLXLM_CACHE_DIR/imported/` (default `~/.cache/mlxlm/imported/`,
or `$XDG_CACHE_HOME/mlxlm/imported/`), one directory per source file keyed by its
resolved path, size, modification time and the importer's format version, so an edited
or replaced file is imported again and an unchanged one costs nothing after the first use.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from mlxlm_core import InvalidArgumentError, ModelNotFoundError

from ._import import import_gguf
from ._reader import is_gguf_file

# Bump when the produced directory changes shape, so old cache entries are not reused.
IMPORT_FORMAT = 2  # 2: Q5_0/Q5_1 kept as 5-bit; more architectures


def imported_cache_dir() -> Path:
    """Where converted GGUF files are kept."""
    if root := os.environ.get("MLXLM_CACHE_DIR"):
        return Path(root).expanduser() / "imported"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "mlxlm" / "imported"


def cache_key(path: Path) -> str:
    """`<stem>-<hash>`: readable in a directory listing, unique per file version."""
    resolved = Path(path).resolve()
    st = resolved.stat()
    ident = f"{resolved}\0{st.st_size}\0{st.st_mtime_ns}\0{IMPORT_FORMAT}"
    return f"{resolved.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


class GGUFLoader:
    """Opens GGUF files for mlxlm-core (see `mlxlm_core._plugins.ModelLoader`)."""

    def can_open(self, path: Path) -> bool:
        path = Path(path)
        # A `.gguf` suffix is claimed even when the magic is wrong, so the user hears
        # "corrupt GGUF file" from us rather than "unknown format" from core.
        return path.suffix.lower() == ".gguf" or (path.is_file() and is_gguf_file(path))

    def to_mlx_dir(self, path: Path) -> Path:
        path = Path(path)
        if not path.is_file():
            raise ModelNotFoundError(f"{path}: no such file")
        target = imported_cache_dir() / cache_key(path)
        if (target / "config.json").is_file():
            return target
        try:
            # A directory without config.json is damaged (files deleted by hand): replace it.
            return import_gguf(path, target, overwrite=target.exists())
        except InvalidArgumentError:
            # Another process published the same import between our check and rename.
            if (target / "config.json").is_file():
                return target
            raise
