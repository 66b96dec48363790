"""The public face of mlxlm-tune as installed: version, exported names, typing marker.

Run by the root suite against the editable workspace and by tools/test_isolated.py against
the built wheel in an environment of its own, where these catch a wheel that ships without
`py.typed` or a `__version__` that drifted from the distribution's metadata.
"""

import importlib.metadata
import importlib.resources

import mlxlm_tune


def _is_dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


def test_version_matches_distribution_metadata() -> None:
    assert mlxlm_tune.__version__ == importlib.metadata.version("mlxlm-tune")


def test_all_names_resolve() -> None:
    missing = [name for name in mlxlm_tune.__all__ if not hasattr(mlxlm_tune, name)]
    assert missing == []


def test_all_lists_public_names_once() -> None:
    names = list(mlxlm_tune.__all__)
    assert len(names) == len(set(names))
    assert [n for n in names if n.startswith("_") and not _is_dunder(n)] == []


def test_ships_py_typed_marker() -> None:
    assert importlib.resources.files("mlxlm_tune").joinpath("py.typed").is_file()
