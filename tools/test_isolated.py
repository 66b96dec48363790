"""Run each package's tests in an environment that holds only that package and its deps.

uv lets any workspace member import any other at development time (they all share
`.venv`), so a package that forgets to declare a sibling still passes `uv run pytest`.
Here each package P gets its own environment, `.venvs/P`, built by

    UV_PROJECT_ENVIRONMENT=.venvs/P uv sync --package P --no-editable

(P and its declared dependencies, base install without extras, plus P's `dev` group), then

1. the isolation is checked: every workspace package P does not declare (transitively) must
   be unimportable there, every one it declares must be importable;
2. P's public face as installed is checked by tools/check_surface.py run with that
   environment's Python (`__version__` against the wheel's metadata, `__all__`, `py.typed`);
3. `packages/P/tests` runs with that environment's Python, with the root pytest options
   but rooted at packages/P, so no conftest.py or test outside the package is collected.

By default the packages are installed as built wheels, not editable: the tests then see
exactly what `pip install P` ships (a data file left out of the wheel, or a missing
`py.typed`, fails here). `--editable` trades that for speed while iterating.

Usage: python tools/test_isolated.py [PACKAGE ...] [--editable] [--sync-only]
                                     [--venvs DIR] [--frozen] [--offline] [-- PYTEST_ARGS]
PACKAGE is a distribution name (mlxlm-core), an import name (mlxlm_core) or a short name
(core); the default is every package. Exits 1 if any package fails.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _workspace import (
    REPO_ROOT,
    Member,
    WorkspaceError,
    internal_closure,
    load_members,
    normalize,
)

# Checked inside the isolated interpreter: which of these top-level packages it can find.
_PROBE = (
    "import importlib.util, sys\n"
    "print(' '.join(n for n in sys.argv[1:] if importlib.util.find_spec(n) is not None))\n"
)


def _uv() -> list[str]:
    # `uv run` exports UV (its own path) to children; otherwise take it from PATH, or the
    # `uv` package on PyPI, which also runs as `python -m uv`.
    found = os.environ.get("UV") or shutil.which("uv")
    return [found] if found else [sys.executable, "-m", "uv"]


def _clean_env(venv: Path) -> dict[str, str]:
    """The caller's environment minus anything that would leak other packages in."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    env["UV_PROJECT_ENVIRONMENT"] = str(venv)
    env.setdefault("UV_PYTHON_DOWNLOADS", "never")
    return env


def _select(members: list[Member], wanted: list[str]) -> list[Member]:
    """Members named on the command line: `mlxlm-core`, `mlxlm_core` or `core`."""
    if not wanted:
        return members
    by_name = {m.name: m for m in members}
    selected = []
    for word in wanted:
        member = by_name.get(normalize(word)) or by_name.get("mlxlm-" + normalize(word))
        if member is None:
            known = ", ".join(by_name)
            raise SystemExit(f"test_isolated: unknown package {word!r}; known: {known}")
        selected.append(member)
    return selected


def sync(member: Member, members: list[Member], venv: Path, args: argparse.Namespace) -> bool:
    """Build `venv` for `member`; True on success."""
    command = [*_uv(), "sync", "--package", member.name, "--quiet"]
    if not args.editable:
        # Rebuild the wheels of every workspace package in the environment: uv keys its
        # build cache on pyproject.toml, not on the sources, and would reuse stale wheels.
        command.append("--no-editable")
        for dep in internal_closure(member, members):
            command += ["--reinstall-package", dep.name]
    command += ["--frozen"] if args.frozen else []
    command += ["--offline"] if args.offline else []
    return subprocess.run(command, cwd=args.root, env=_clean_env(venv)).returncode == 0


def check_isolation(member: Member, members: list[Member], venv: Path) -> list[str]:
    """Problems with what `venv`'s Python can import; empty when isolation holds."""
    allowed = {n for m in internal_closure(member, members) for n in m.import_names}
    everything = sorted(n for m in members for n in m.import_names)
    python = venv / "bin" / "python"
    probe = subprocess.run(
        [str(python), "-P", "-c", _PROBE, *everything],
        capture_output=True,
        text=True,
        env=_clean_env(venv),
        cwd="/",
    )
    if probe.returncode != 0:
        return [f"cannot run {python}: {probe.stderr.strip()}"]
    found = set(probe.stdout.split())
    problems = [
        f"{name} is importable but {member.name} does not depend on it"
        for name in sorted(found - allowed)
    ]
    problems += [
        f"{name} is a dependency but cannot be imported" for name in sorted(allowed - found)
    ]
    return problems


def check_surface(member: Member, venv: Path) -> list[str]:
    """Problems with `member`'s public face as `venv` has it installed; empty when none."""
    script = Path(__file__).with_name("check_surface.py")
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-P", str(script), member.name, *member.import_names],
        capture_output=True,
        text=True,
        env=_clean_env(venv),
        cwd="/",
    )
    if result.returncode not in (0, 1):
        return [f"check_surface.py failed: {result.stderr.strip()[-500:]}"]
    return result.stdout.splitlines()


def run_tests(member: Member, venv: Path, args: argparse.Namespace) -> str:
    """Run the package's tests in `venv`; the outcome for the summary ("ok" or "FAILED …")."""
    tests = member.path / "tests"
    if not tests.is_dir():
        return f"FAILED (no tests directory {tests.relative_to(args.root)})"
    command = [
        str(venv / "bin" / "python"),
        "-P",  # keep the working directory off sys.path: only installed packages import
        "-m",
        "pytest",
        str(tests),
        # The root's pytest options (import mode, markers, timeout) apply, but collection
        # is rooted at the package: no conftest.py above packages/P is loaded.
        "-c",
        str(args.root / "pyproject.toml"),
        "--rootdir",
        str(member.path),
        "--confcutdir",
        str(member.path),
        "-p",
        "no:cacheprovider",
        *args.pytest_args,
    ]
    code = subprocess.run(command, cwd=args.root, env=_clean_env(venv)).returncode
    if code == 5:  # pytest collected nothing: a package without tests is not ok
        return "FAILED (no tests collected)"
    return "ok" if code == 0 else f"FAILED (pytest exit {code})"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    pytest_args: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, pytest_args = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("packages", nargs="*", help="packages to run (default: all)")
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="workspace root")
    parser.add_argument("--venvs", type=Path, help="where environments go (default: ROOT/.venvs)")
    parser.add_argument("--editable", action="store_true", help="install editable, not wheels")
    parser.add_argument("--sync-only", action="store_true", help="build and check, no tests")
    parser.add_argument("--frozen", action="store_true", help="use uv.lock as is (uv --frozen)")
    parser.add_argument("--offline", action="store_true", help="no network (uv --offline)")
    args = parser.parse_args(argv)
    args.root = args.root.resolve()
    args.pytest_args = pytest_args
    venvs = (args.venvs or args.root / ".venvs").resolve()

    try:
        members = load_members(args.root)
    except WorkspaceError as exc:
        print(f"test_isolated: {exc}", file=sys.stderr)
        return 1
    results: dict[str, str] = {}
    for member in _select(members, args.packages):
        venv = venvs / member.name
        print(f"\n--- {member.name}: environment {venv}", flush=True)
        started = time.monotonic()
        if not sync(member, members, venv, args):
            results[member.name] = "FAILED (uv sync)"
            continue
        problems = check_isolation(member, members, venv)
        for problem in problems:
            print(f"{member.name}: isolation broken: {problem}")
        if problems:
            results[member.name] = "FAILED (isolation)"
            continue
        problems = check_surface(member, venv)
        for problem in problems:
            print(f"{member.name}: public face: {problem}")
        if problems:
            results[member.name] = "FAILED (public face)"
            continue
        siblings = ", ".join(m.name for m in internal_closure(member, members))
        print(f"{member.name}: isolated; workspace packages present: {siblings}", flush=True)
        if args.sync_only:
            results[member.name] = "ok (sync only)"
            continue
        outcome = run_tests(member, venv, args)
        results[member.name] = f"{outcome} in {time.monotonic() - started:.1f} s"

    print("\n--- isolated runs")
    for name, outcome in results.items():
        print(f"{name:16} {outcome}")
    return 0 if all(r.startswith("ok") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
