"""The workspace checks in tools/, run as CI runs them, on synthetic workspaces.

Each test writes a small tree (packages/mlxlm-*/pyproject.toml + src/) in a temporary
directory, runs the script on it with `--root`, and reads its exit status and output. The
isolated-runner test builds a real environment for mlxlm-core from the workspace's lock.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"
VERSION = "1.2.3"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def add_package(
    root: Path,
    short: str,
    *,
    version: str = VERSION,
    deps: tuple[str, ...] = (),
    optional: dict[str, list[str]] | None = None,
    init: str | None = None,
) -> Path:
    """packages/mlxlm-<short> with a pyproject and src/mlxlm_<short>/__init__.py."""
    lines = ["[project]", f'name = "mlxlm-{short}"', f'version = "{version}"']
    lines.append("dependencies = [" + ", ".join(f'"{d}"' for d in deps) + "]")
    if optional:
        lines.append("[project.optional-dependencies]")
        lines += [
            f"{extra} = [" + ", ".join(f'"{r}"' for r in reqs) + "]"
            for extra, reqs in optional.items()
        ]
    package = root / "packages" / f"mlxlm-{short}"
    write(package / "pyproject.toml", "\n".join(lines) + "\n")
    source = init if init is not None else f'__version__ = "{VERSION}"\n__all__ = ["__version__"]\n'
    write(package / "src" / f"mlxlm_{short}" / "__init__.py", source)
    return package


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """Five consistent packages: core at the bottom, the rest pinned to it."""
    add_package(tmp_path, "core")
    core = f"mlxlm-core=={VERSION}"
    add_package(tmp_path, "quant", deps=(core,), optional={"dwq": [f"mlxlm-tune=={VERSION}"]})
    for short in ("tune", "gguf", "server"):
        add_package(tmp_path, short, deps=(core,))
    return tmp_path


def module(root: Path, short: str, name: str, source: str) -> str:
    """Write src/mlxlm_<short>/<name>; return its path as the checks print it."""
    path = write(root / "packages" / f"mlxlm-{short}" / "src" / f"mlxlm_{short}" / name, source)
    return str(path.relative_to(root))


def run_tool(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(TOOLS / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def private_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return run_tool("check_private_imports.py", "--root", str(root))


def versions(root: Path) -> subprocess.CompletedProcess[str]:
    return run_tool("check_versions.py", "--root", str(root))


# --- check_private_imports.py ------------------------------------------------------------


def test_public_and_own_private_imports_pass(workspace: Path) -> None:
    module(workspace, "core", "_errors.py", "class MlxlmError(Exception): ...\n")
    module(workspace, "core", "models/__init__.py", "")
    module(workspace, "quant", "_recipes.py", "RECIPES = {}\n")
    module(
        workspace,
        "quant",
        "_convert.py",
        """
        import numpy._core  # a third-party private module is not ours to police
        import mlxlm_core
        import mlxlm_core.models
        from mlxlm_core import __version__
        from mlxlm_core.models import llama
        from mlxlm_quant._recipes import RECIPES
        from . import _recipes
        from ._recipes import RECIPES as R
        """,
    )
    result = private_imports(workspace)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "check_private_imports: ok"


@pytest.mark.parametrize(
    ("statement", "private"),
    [
        ("from mlxlm_core._errors import MlxlmError", "mlxlm_core._errors"),
        ("import mlxlm_core._errors", "mlxlm_core._errors"),
        ("import mlxlm_core.models._llama as llama", "mlxlm_core.models._llama"),
        ("from mlxlm_core import _errors", "_errors"),
        ("from mlxlm_core.models import _base, llama", "_base"),
        ("importlib.import_module('mlxlm_core._errors')", "mlxlm_core._errors"),
        ("def later():\n    from mlxlm_core._errors import MlxlmError", "mlxlm_core._errors"),
    ],
)
def test_each_form_of_private_import_is_refused(
    workspace: Path, statement: str, private: str
) -> None:
    shown = module(workspace, "quant", "_use.py", f"import importlib\n\n{statement}\n")
    result = private_imports(workspace)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 1, lines
    line = 4 if statement.startswith("def") else 3
    assert lines[0].startswith(f"{shown}:{line}: imports private ")
    assert private in lines[0] and "mlxlm-core" in lines[0]


def test_undeclared_sibling_is_refused(workspace: Path) -> None:
    shown = module(workspace, "gguf", "_export.py", '"""Export."""\nfrom mlxlm_tune import train\n')
    shown_core = module(workspace, "core", "_cli.py", "import mlxlm_server\n")
    result = private_imports(workspace)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{shown_core}:1: imports mlxlm_server, but mlxlm-server is not a dependency of "
        "mlxlm-core (add it to mlxlm-core's pyproject dependencies, or do not import it)",
        f"{shown}:2: imports mlxlm_tune, but mlxlm-tune is not a dependency of mlxlm-gguf "
        "(add it to mlxlm-gguf's pyproject dependencies, or do not import it)",
    ]


def test_undeclared_private_import_reports_both_problems(workspace: Path) -> None:
    shown = module(workspace, "tune", "_x.py", "from mlxlm_gguf._reader import read\n")
    result = private_imports(workspace)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert all(line.startswith(f"{shown}:1: ") for line in lines)
    assert "private module mlxlm_gguf._reader" in lines[0]
    assert "mlxlm-gguf is not a dependency of mlxlm-tune" in lines[1]


def test_optional_sibling_may_only_be_imported_lazily(workspace: Path) -> None:
    shown = module(
        workspace,
        "quant",
        "_dwq.py",
        """
        from typing import TYPE_CHECKING

        if TYPE_CHECKING:
            from mlxlm_tune import Trainer

        try:
            import mlxlm_tune
        except ImportError:
            mlxlm_tune = None


        def distil():
            from mlxlm_tune import train
            return train

        import mlxlm_tune.losses
        """,
    )
    result = private_imports(workspace)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{shown}:16: imports mlxlm_tune at import time, but mlxlm-tune is only an optional "
        "dependency of mlxlm-quant (extra dwq); import it inside a function or under "
        "try/except ImportError"
    ]


def test_unparsable_module_is_reported(workspace: Path) -> None:
    shown = module(workspace, "server", "_app.py", "x = 1\ndef broken(:\n")
    result = private_imports(workspace)
    assert result.returncode == 1
    assert result.stdout.startswith(f"{shown}:2: cannot parse: ")


# --- check_versions.py -------------------------------------------------------------------


def test_consistent_versions_pass(workspace: Path) -> None:
    result = versions(workspace)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"5 packages at {VERSION}" in result.stdout


def test_pyproject_version_that_differs_is_named(workspace: Path) -> None:
    add_package(workspace, "tune", version="1.2.4", deps=(f"mlxlm-core=={VERSION}",))
    result = versions(workspace)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith(
        "packages/mlxlm-tune/pyproject.toml: version 1.2.4 differs from 1.2.3"
    )
    # quant[dwq] pins tune at 1.2.3, which is no longer tune's version.
    assert lines[1].startswith("packages/mlxlm-quant/pyproject.toml: optional-dependencies.dwq has")
    # tune's __version__ (1.2.3) no longer matches its own pyproject either.
    assert lines[2].startswith(
        "packages/mlxlm-tune/src/mlxlm_tune/__init__.py:1: __version__ is '1.2.3'"
    )
    assert len(lines) == 3


def test_dunder_version_that_differs_is_named(workspace: Path) -> None:
    add_package(
        workspace,
        "gguf",
        deps=(f"mlxlm-core=={VERSION}",),
        init='"""GGUF."""\n__version__ = "1.2.0"\n',
    )
    result = versions(workspace)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "packages/mlxlm-gguf/src/mlxlm_gguf/__init__.py:2: __version__ is '1.2.0' but "
        "packages/mlxlm-gguf/pyproject.toml says '1.2.3'"
    ]


@pytest.mark.parametrize(
    "dep", ["mlxlm-core>=1.2.3", "mlxlm-core", "mlxlm-core==1.2.2", "mlxlm_core~=1.2"]
)
def test_internal_dependency_must_be_pinned_exactly(workspace: Path, dep: str) -> None:
    add_package(workspace, "server", deps=("fastapi>=0.100", dep))
    result = versions(workspace)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"packages/mlxlm-server/pyproject.toml: dependencies has {dep!r}; "
        "internal dependencies are pinned exactly: mlxlm-core==1.2.3"
    ]


def test_exact_pin_with_marker_and_extras_passes(workspace: Path) -> None:
    add_package(
        workspace,
        "server",
        deps=(f"mlxlm-core[cuda13] == {VERSION} ; sys_platform == 'linux'",),
    )
    result = versions(workspace)
    assert result.returncode == 0, result.stdout


def test_version_module_and_metadata_lookup_are_followed(workspace: Path) -> None:
    add_package(
        workspace,
        "tune",
        deps=(f"mlxlm-core=={VERSION}",),
        init="from ._version import __version__\n",
    )
    module(workspace, "tune", "_version.py", '__version__: str = "1.2.3"\n')
    metadata_init = (
        'from importlib.metadata import version\n\n__version__ = version("mlxlm_gguf")\n'
    )
    add_package(workspace, "gguf", deps=(f"mlxlm-core=={VERSION}",), init=metadata_init)
    assert versions(workspace).returncode == 0

    module(workspace, "tune", "_version.py", '__version__ = "9.9.9"\n')
    wrong_dist = metadata_init.replace("mlxlm_gguf", "mlxlm-core")
    add_package(workspace, "gguf", deps=(f"mlxlm-core=={VERSION}",), init=wrong_dist)
    result = versions(workspace)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "packages/mlxlm-gguf/src/mlxlm_gguf/__init__.py: __version__ is read from the "
        "metadata of mlxlm-core, not of mlxlm-gguf",
        "packages/mlxlm-tune/src/mlxlm_tune/__init__.py:1: __version__ is '9.9.9' but "
        "packages/mlxlm-tune/pyproject.toml says '1.2.3'",
    ]


def test_missing_dunder_version_is_reported(workspace: Path) -> None:
    add_package(workspace, "core", init='"""Core."""\n')
    result = versions(workspace)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "packages/mlxlm-core/src/mlxlm_core/__init__.py: no __version__ defined"
    ]


# --- check_surface.py --------------------------------------------------------------------


def installed_package(root: Path, init: str, *, version: str = VERSION, typed: bool = True) -> Path:
    """mlxlm_demo on a path of its own, with the dist-info metadata an install writes."""
    write(root / "mlxlm_demo" / "__init__.py", init)
    if typed:
        write(root / "mlxlm_demo" / "py.typed", "")
    write(
        root / f"mlxlm_demo-{version}.dist-info" / "METADATA",
        f"Metadata-Version: 2.1\nName: mlxlm-demo\nVersion: {version}\n",
    )
    return root


def surface(path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(path)}
    return subprocess.run(
        [sys.executable, str(TOOLS / "check_surface.py"), "mlxlm-demo", "mlxlm_demo"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_a_sound_public_face_passes(tmp_path: Path) -> None:
    init = f'__version__ = "{VERSION}"\ndef load(): ...\n__all__ = ["__version__", "load"]\n'
    result = surface(installed_package(tmp_path, init))
    assert (result.returncode, result.stdout) == (0, ""), result.stderr


def test_each_public_face_problem_is_named(tmp_path: Path) -> None:
    init = '__version__ = "0.0.9"\n_hidden = 1\n__all__ = ["load", "_hidden", "_hidden"]\n'
    result = surface(installed_package(tmp_path, init, typed=False))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"mlxlm_demo.__version__ is '0.0.9'; mlxlm-demo's metadata says '{VERSION}'",
        "mlxlm_demo.__all__ lists more than once: _hidden",
        "mlxlm_demo.__all__ names what is not there: load",
        "mlxlm_demo.__all__ exports private names: _hidden, _hidden",
        "mlxlm_demo: no py.typed marker",
    ]


def test_a_package_that_does_not_import_is_named(tmp_path: Path) -> None:
    result = surface(installed_package(tmp_path, "raise RuntimeError('broken on import')\n"))
    assert result.returncode == 1
    assert result.stdout.strip() == "mlxlm_demo: import fails: RuntimeError: broken on import"


@pytest.mark.parametrize("short", ["core", "gguf", "quant", "tune", "server"])
def test_workspace_packages_have_a_sound_public_face(short: str) -> None:
    result = run_tool("check_surface.py", f"mlxlm-{short}", f"mlxlm_{short}")
    assert (result.returncode, result.stdout) == (0, ""), result.stderr


# --- test_isolated.py --------------------------------------------------------------------


def test_unknown_package_name_is_refused(workspace: Path) -> None:
    result = run_tool("test_isolated.py", "--root", str(workspace), "nope")
    assert result.returncode != 0
    assert "unknown package 'nope'" in result.stderr
    assert "mlxlm-core" in result.stderr


@pytest.mark.skipif(
    not (os.environ.get("UV") or shutil.which("uv")) or not (REPO / "uv.lock").exists(),
    reason="needs uv and the workspace lock (made by the first `uv run`)",
)
def test_isolated_environment_holds_only_declared_packages(tmp_path: Path) -> None:
    """mlxlm-quant's own environment has core, and no other sibling can be imported."""
    result = run_tool(
        "test_isolated.py",
        "quant",
        "--sync-only",
        "--frozen",
        "--offline",
        "--venvs",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        "mlxlm-quant: isolated; workspace packages present: mlxlm-core, mlxlm-quant"
        in result.stdout
    )
    python = tmp_path / "mlxlm-quant" / "bin" / "python"
    probe = "import importlib.util as u; print([n for n in {names} if u.find_spec(n)])"
    names = ["mlxlm_core", "mlxlm_quant", "mlxlm_tune", "mlxlm_gguf", "mlxlm_server"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    found = subprocess.run(
        [str(python), "-P", "-c", probe.format(names=names)],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
    )
    assert found.stdout.strip() == "['mlxlm_core', 'mlxlm_quant']", found.stderr
    # Installed as wheels, not editable: the package imports from site-packages.
    where = subprocess.run(
        [str(python), "-P", "-c", "import mlxlm_quant; print(mlxlm_quant.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
    )
    assert "site-packages" in where.stdout, where.stderr
