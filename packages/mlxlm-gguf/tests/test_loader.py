"""The `mlxlm.loaders` plugin: discovery from core, caching, file identity."""

from __future__ import annotations

import importlib.metadata
import os

import pytest
from mlxlm_core import CheckpointError, ModelNotFoundError
from mlxlm_core._plugins import open_with_plugins
from mlxlm_gguf import GGUFLoader, imported_cache_dir

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("MLXLM_CACHE_DIR", str(root))
    return root / "imported"


def test_entry_point_is_registered():
    eps = importlib.metadata.entry_points(group="mlxlm.loaders")
    assert [ep.value for ep in eps if ep.name == "gguf"] == ["mlxlm_gguf._loader:GGUFLoader"]


def test_core_finds_the_plugin_and_caches_the_import(make_gguf, cache):
    built = make_gguf()
    first = open_with_plugins(built.path)
    assert first is not None and first.parent == cache
    assert (first / "config.json").is_file() and (first / "tokenizer.json").is_file()
    stamp = (first / "config.json").stat().st_mtime_ns
    again = open_with_plugins(built.path)
    assert again == first and (again / "config.json").stat().st_mtime_ns == stamp
    # A changed file (new mtime) is a new cache entry; the old one stays untouched.
    st = built.path.stat()
    os.utime(built.path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    changed = open_with_plugins(built.path)
    assert changed != first and sorted(cache.iterdir()) == sorted([first, changed])


def test_damaged_cache_entry_is_rebuilt(make_gguf, cache):
    built = make_gguf()
    out = GGUFLoader().to_mlx_dir(built.path)
    (out / "config.json").unlink()
    assert GGUFLoader().to_mlx_dir(built.path) == out
    assert (out / "config.json").is_file()


def test_can_open(make_gguf, tmp_path):
    loader = GGUFLoader()
    built = make_gguf()
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(built.path.read_bytes())
    other = tmp_path / "notes.txt"
    other.write_text("not a model")
    assert loader.can_open(built.path)
    assert loader.can_open(renamed)  # recognised by its magic bytes
    assert not loader.can_open(other)
    assert not loader.can_open(tmp_path)


def test_errors(tmp_path, cache):
    with pytest.raises(ModelNotFoundError):
        GGUFLoader().to_mlx_dir(tmp_path / "missing.gguf")
    fake = tmp_path / "fake.gguf"
    fake.write_text("hello")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        open_with_plugins(fake)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_cache_dir_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("MLXLM_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert imported_cache_dir() == tmp_path / "mlxlm" / "imported"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert imported_cache_dir() == tmp_path / "home" / ".cache" / "mlxlm" / "imported"
