"""Reject imports that cross package boundaries the wrong way.

A module of one published package (packages/*/src) may use a sibling package only

- through its public face: no dotted component and no imported name that starts with `_`
  (dunders such as `__version__` are fine), so `mlxlm_core._errors`,
  `from mlxlm_core import _x` and `importlib.import_module("mlxlm_core._x")` are all refused;
- if the sibling is declared in its own pyproject `dependencies`; a sibling declared only in
  an extra (optional-dependencies) may be imported lazily (inside a function, under
  `try: … except ImportError`, or under `if TYPE_CHECKING:`), never at import time.

import-linter checks the direction of the layers; this checks what it cannot: privacy and
declared dependencies (uv itself lets a member import a sibling it forgot to declare).

Usage: python tools/check_private_imports.py [--root DIR]
Prints one `file:line: message` per violation and exits 1 if there is any.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from _workspace import REPO_ROOT, Member, WorkspaceError, load_members, relative

_IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}
_DYNAMIC_IMPORTERS = {"import_module", "__import__"}


def is_private(component: str) -> bool:
    """`_x` is private; dunders (`__init__`, `__version__`, `__main__`) are not."""
    return component.startswith("_") and not (
        component.startswith("__") and component.endswith("__") and len(component) > 4
    )


@dataclass(frozen=True)
class ImportSite:
    """One absolute import found in a module, with how it is reached at run time."""

    line: int
    module: str  # dotted module path, e.g. "mlxlm_core.models"
    names: tuple[str, ...]  # names taken from it by `from module import …` (else empty)
    lazy: bool  # not executed at import time, or guarded against ImportError


class _ImportCollector(ast.NodeVisitor):
    """Collects absolute imports and whether each runs unconditionally at import time."""

    def __init__(self) -> None:
        self.sites: list[ImportSite] = []
        self._lazy_depth = 0

    def _add(self, node: ast.AST, module: str, names: tuple[str, ...] = ()) -> None:
        line = getattr(node, "lineno", 0)
        self.sites.append(ImportSite(line, module, names, self._lazy_depth > 0))

    def _visit_all(self, nodes: Sequence[ast.AST], *, lazy: bool) -> None:
        self._lazy_depth += lazy
        for node in nodes:
            self.visit(node)
        self._lazy_depth -= lazy

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        # Relative imports stay inside their own package by construction.
        if node.level == 0 and node.module:
            self._add(node, node.module, tuple(a.name for a in node.names if a.name != "*"))

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        func_name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if (
            func_name in _DYNAMIC_IMPORTERS
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and not node.args[0].value.startswith(".")
        ):
            self._add(node, node.args[0].value)
        self.generic_visit(node)

    def _visit_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        # Decorators and defaults run at definition time; the body only when called.
        if not isinstance(node, ast.Lambda):
            for decorator in node.decorator_list:
                self.visit(decorator)
        self.visit(node.args)
        body: Sequence[ast.AST] = [node.body] if isinstance(node, ast.Lambda) else node.body
        self._visit_all(body, lazy=True)

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _visit_function

    def visit_Try(self, node: ast.Try | ast.TryStar) -> None:
        guarded = any(_catches_import_error(h) for h in node.handlers)
        self._visit_all(node.body, lazy=guarded)
        self._visit_all([*node.handlers, *node.orelse, *node.finalbody], lazy=False)

    visit_TryStar = visit_Try

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self._visit_all(node.body, lazy=True)
            self._visit_all(node.orelse, lazy=False)
        else:
            self.generic_visit(node)


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    for node in types:
        name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", None)
        if name in _IMPORT_ERRORS:
            return True
    return False


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def collect_imports(source: str, filename: str) -> list[ImportSite]:
    """Absolute imports of one module's source; raises SyntaxError if it does not parse."""
    collector = _ImportCollector()
    collector.visit(ast.parse(source, filename=filename))
    return collector.sites


def _site_violations(site: ImportSite, member: Member, owner: Member) -> list[str]:
    messages = []
    parts = site.module.split(".")
    private = [p for p in parts[1:] if is_private(p)]
    if private:
        messages.append(
            f"imports private module {site.module} of {owner.name}; "
            f"use its public API ({parts[0]} or a public submodule)"
        )
    else:
        for name in site.names:
            if is_private(name):
                messages.append(
                    f"imports private name {name} from {site.module} of {owner.name}; "
                    "use its public API"
                )
    if owner.name in {r.name for r in member.dependencies}:
        return messages
    extras = sorted(
        extra for extra, reqs in member.optional.items() if owner.name in {r.name for r in reqs}
    )
    if not extras:
        messages.append(
            f"imports {parts[0]}, but {owner.name} is not a dependency of {member.name} "
            f"(add it to {member.name}'s pyproject dependencies, or do not import it)"
        )
    elif not site.lazy:
        messages.append(
            f"imports {parts[0]} at import time, but {owner.name} is only an optional "
            f"dependency of {member.name} (extra {', '.join(extras)}); import it inside a "
            "function or under try/except ImportError"
        )
    return messages


def check(root: Path) -> list[str]:
    """All violations under `root` as `file:line: message` lines, in file order."""
    members = load_members(root)
    owners = {name: m for m in members for name in m.import_names}
    violations = []
    for member in members:
        for path in sorted(member.src.rglob("*.py")) if member.src.is_dir() else []:
            shown = relative(path, root)
            try:
                sites = collect_imports(path.read_text(encoding="utf-8"), str(path))
            except (SyntaxError, UnicodeDecodeError, OSError) as exc:
                line = getattr(exc, "lineno", None) or 0
                violations.append(f"{shown}:{line}: cannot parse: {exc}")
                continue
            for site in sites:
                owner = owners.get(site.module.split(".")[0])
                if owner is None or owner is member:
                    continue
                for message in _site_violations(site, member, owner):
                    violations.append(f"{shown}:{site.line}: {message}")
    return violations


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="workspace root")
    args = parser.parse_args(argv)
    try:
        violations = check(args.root)
    except WorkspaceError as exc:
        print(f"check_private_imports: {exc}", file=sys.stderr)
        return 1
    for line in violations:
        print(line)
    if violations:
        print(f"check_private_imports: {len(violations)} violation(s)", file=sys.stderr)
        return 1
    print("check_private_imports: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
