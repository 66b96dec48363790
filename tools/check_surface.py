"""Check a package's public face as installed: version, exported names, typing marker.

Run by tools/test_isolated.py with each package's own isolated interpreter (the package
installed from its built wheel), where it catches a wheel that ships without `py.typed` or
a `__version__` that drifted from the distribution's metadata; tests-integration runs it
over the workspace's five packages too. Self-contained on purpose (standard library only,
nothing else from tools/): the isolated interpreter has only the package and its
dependencies.

For each import name:
- it imports;
- `__version__` equals the distribution's metadata version;
- `__all__` exists, lists each name once, every name resolves, and none is private
  (a leading underscore, dunders aside);
- the package ships a `py.typed` marker.

Usage: python tools/check_surface.py DISTRIBUTION IMPORT_NAME [IMPORT_NAME ...]
Prints one line per problem and exits 1 if there is any.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.resources
import sys
from collections import Counter


def _is_private(name: str) -> bool:
    dunder = name.startswith("__") and name.endswith("__")
    return name.startswith("_") and not dunder


def surface_problems(distribution: str, import_name: str) -> list[str]:
    """What is wrong with ``import_name``'s public face; empty when nothing is."""
    try:
        module = importlib.import_module(import_name)
    except Exception as exc:  # any failure to import is the finding
        return [f"{import_name}: import fails: {type(exc).__name__}: {exc}"]
    problems = []
    try:
        expected = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        problems.append(f"{import_name}: distribution {distribution} is not installed")
    else:
        found = getattr(module, "__version__", None)
        if found != expected:
            problems.append(
                f"{import_name}.__version__ is {found!r}; {distribution}'s metadata says "
                f"{expected!r}"
            )
    public = getattr(module, "__all__", None)
    if public is None:
        problems.append(f"{import_name}: no __all__")
    else:
        names = list(public)
        twice = sorted(n for n, count in Counter(names).items() if count > 1)
        missing = [n for n in names if not hasattr(module, n)]
        private = [n for n in names if _is_private(n)]
        if twice:
            problems.append(f"{import_name}.__all__ lists more than once: {', '.join(twice)}")
        if missing:
            problems.append(f"{import_name}.__all__ names what is not there: {', '.join(missing)}")
        if private:
            problems.append(f"{import_name}.__all__ exports private names: {', '.join(private)}")
    if not importlib.resources.files(import_name).joinpath("py.typed").is_file():
        problems.append(f"{import_name}: no py.typed marker")
    return problems


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print("usage: check_surface.py DISTRIBUTION IMPORT_NAME [IMPORT_NAME ...]", file=sys.stderr)
        return 2
    distribution, names = argv[0], argv[1:]
    problems = [p for name in names for p in surface_problems(distribution, name)]
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
