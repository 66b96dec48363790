"""Turn a model reference into a local MLX model directory.

Order: local directory → local file (opened by an ``mlxlm.loaders`` plugin, e.g. GGUF) →
Hugging Face cache → hub download (``huggingface_hub``; ``HF_HUB_OFFLINE=1`` honoured).
``None`` means the default model.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ._errors import ModelNotFoundError

# What a model directory needs from the hub; everything else (pytorch bins, onnx) is skipped.
_HUB_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.jinja",
    "tokenizer.model",
    "*.tiktoken",
    "*.txt",
]
_REPO_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")


def resolve_model_path(reference: str | Path | None, *, revision: str | None = None) -> Path:
    """A local directory holding ``config.json`` for ``reference``."""
    from ._plugins import open_with_plugins

    if reference is None:
        from ._default_model import default_model_path

        reference = default_model_path()
    path = Path(reference).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        opened = open_with_plugins(path)
        if opened is None:
            raise ModelNotFoundError(
                f"{path}: not a model directory or a file format mlxlm can open"
            )
        return opened
    text = str(reference)
    if not _REPO_ID.match(text) or text.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model {text!r} not found: no such directory or file")
    return _from_hub(text, revision=revision)


def _from_hub(repo_id: str, *, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        # Cache first: a complete cached snapshot never touches the network.
        return Path(
            snapshot_download(
                repo_id, revision=revision, allow_patterns=_HUB_PATTERNS, local_files_only=True
            )
        )
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError, OSError):
        if offline:
            raise ModelNotFoundError(
                f"model {repo_id!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set"
            ) from None
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS))
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise ModelNotFoundError(f"model {repo_id!r}: {type(exc).__name__} on the hub") from None
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(f"model {repo_id!r} could not be fetched: {first}") from None
