"""Keep the published packages in lockstep.

The five distributions are released together with one version, so that
`pip install mlxlm-tune==X` always pulls the `mlxlm-core` it was tested with. This checks

- every `packages/*/pyproject.toml` has the same `[project] version`;
- each package's `__version__` (in `src/<name>/__init__.py`, read statically) equals it —
  a literal, a literal re-exported from a sibling module (`from ._version import
  __version__`), or read from the package's own distribution metadata;
- every dependency on a workspace package, base or extra, is pinned exactly:
  `mlxlm-core==<version>`.

Usage: python tools/check_versions.py [--root DIR]
Prints one line per problem and exits 1 if there is any.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter
from pathlib import Path

from _workspace import REPO_ROOT, Member, WorkspaceError, load_members, normalize, relative


def _assigned_version(node: ast.stmt) -> ast.expr | None:
    """The value of `__version__ = …` / `__version__: str = …`, else None."""
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, ast.AnnAssign):
        targets = [node.target]
    else:
        return None
    if any(isinstance(t, ast.Name) and t.id == "__version__" for t in targets):
        return node.value
    return None


def _static_version(init: Path, member: Member, depth: int = 0) -> tuple[int, str] | str:
    """(line, version) as `__version__` is set in `init`, or an error message.

    A version read from distribution metadata (`importlib.metadata.version("<dist>")`)
    is reported as the pyproject version when `<dist>` is this package: it cannot differ.
    """
    try:
        tree = ast.parse(init.read_text(encoding="utf-8"), filename=str(init))
    except (OSError, SyntaxError, UnicodeDecodeError) as exc:
        return f"cannot read __version__: {exc}"
    for node in tree.body:
        if (
            isinstance(node, ast.ImportFrom)
            and node.level == 1
            and node.module
            and depth < 3
            and any((a.asname or a.name) == "__version__" for a in node.names)
        ):
            target = init.parent / (node.module.replace(".", "/") + ".py")
            return _static_version(target, member, depth + 1)
        value = _assigned_version(node)
        if value is None:
            continue
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            return node.lineno, value.value
        if (
            isinstance(value, ast.Call)
            and len(value.args) == 1
            and isinstance(value.args[0], ast.Constant)
            and isinstance(value.args[0].value, str)
        ):
            dist = normalize(value.args[0].value)
            if dist != member.name:
                return f"__version__ is read from the metadata of {dist}, not of {member.name}"
            return node.lineno, member.version or ""
        return "__version__ is not a string literal or a metadata lookup; cannot check it"
    return "no __version__ defined"


def check(root: Path, members: list[Member]) -> list[str]:
    """All version problems of `members` (read from `root`), one line each."""
    problems = []
    versions = {m.name: m.version for m in members}

    for member in members:
        if member.version is None:
            problems.append(
                f"{relative(member.pyproject, root)}: no static [project] version "
                "(a literal version is required for lockstep releases)"
            )

    # The version most packages agree on is the reference; each one off it is named.
    counts = Counter(v for v in versions.values() if v is not None)
    expected = min(counts, key=lambda v: (-counts[v], v)) if counts else None
    if len(counts) > 1:
        for member in members:
            if member.version is not None and member.version != expected:
                agree = ", ".join(n for n, v in versions.items() if v == expected)
                problems.append(
                    f"{relative(member.pyproject, root)}: version {member.version} differs "
                    f"from {expected} ({agree}); all packages share one version"
                )

    for member in members:
        for import_name in member.import_names:
            init = member.src / import_name / "__init__.py"
            found = _static_version(init, member)
            if isinstance(found, str):
                problems.append(f"{relative(init, root)}: {found}")
                continue
            line, value = found
            if member.version is not None and value != member.version:
                problems.append(
                    f"{relative(init, root)}:{line}: __version__ is {value!r} but "
                    f"{relative(member.pyproject, root)} says {member.version!r}"
                )

        for extra, requirements in member.requirement_sets():
            where = "dependencies" if extra is None else f"optional-dependencies.{extra}"
            for req in requirements:
                if versions.get(req.name) is None:
                    continue  # not a workspace package, or its missing version is reported
                pin = f"=={versions[req.name]}"
                if req.specifier != pin:
                    problems.append(
                        f"{relative(member.pyproject, root)}: {where} has {req.text!r}; "
                        f"internal dependencies are pinned exactly: {req.name}{pin}"
                    )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="workspace root")
    args = parser.parse_args(argv)
    try:
        members = load_members(args.root)
        problems = check(args.root, members)
    except WorkspaceError as exc:
        print(f"check_versions: {exc}", file=sys.stderr)
        return 1
    for line in problems:
        print(line)
    if problems:
        print(f"check_versions: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(
        f"check_versions: ok ({len(members)} packages at {members[0].version if members else '-'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
