"""Read the workspace's published members from their pyproject files.

Shared by the check scripts and the isolated test runner in tools/. Everything is derived
from `packages/*/pyproject.toml` and `packages/*/src/*/__init__.py`, so the checks follow the
workspace as packages are added and can be pointed at a synthetic tree (`--root`) in tests.
Standard library only: these scripts run before (and independently of) any project install.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

# Repository root: tools/ sits directly below it.
REPO_ROOT = Path(__file__).resolve().parent.parent

# PEP 508, reduced to what the checks need: the name, any extras, the version specifier
# (everything up to a marker), and the marker. URL requirements ("name @ url") keep the
# "@ url" part as their specifier, so they are never mistaken for an exact pin.
_REQUIREMENT = re.compile(
    r"""^\s*(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*
        (?:\[(?P<extras>[^\]]*)\])?\s*
        (?P<specifier>[^;]*?)\s*
        (?:;\s*(?P<marker>.*?))?\s*$""",
    re.VERBOSE,
)


def normalize(name: str) -> str:
    """PEP 503 normalisation, so `MLXLM_Core` and `mlxlm-core` compare equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Requirement:
    """One dependency string from a pyproject file, split into the parts the checks read."""

    text: str
    name: str  # normalised distribution name
    specifier: str  # e.g. "==0.1.0", ">=1.2,<2", "" (unpinned), "@ file:///…"
    marker: str

    @classmethod
    def parse(cls, text: str) -> Requirement:
        match = _REQUIREMENT.match(text)
        if match is None:
            raise ValueError(f"cannot parse requirement {text!r}")
        return cls(
            text=text,
            name=normalize(match["name"]),
            specifier=re.sub(r"\s+", "", match["specifier"]),
            marker=(match["marker"] or "").strip(),
        )


@dataclass(frozen=True)
class Member:
    """A published workspace package: `packages/<dir>` with a src layout."""

    path: Path  # packages/<dir>, absolute
    pyproject: Path
    name: str  # normalised distribution name
    version: str | None
    import_names: tuple[str, ...]  # top-level packages under src/
    dependencies: tuple[Requirement, ...]
    optional: dict[str, tuple[Requirement, ...]] = field(default_factory=dict)

    @property
    def src(self) -> Path:
        return self.path / "src"

    def requirement_sets(self) -> list[tuple[str | None, tuple[Requirement, ...]]]:
        """(extra or None, requirements): the base dependencies first, then each extra."""
        return [(None, self.dependencies), *self.optional.items()]


class WorkspaceError(Exception):
    """A pyproject file is missing or cannot be read; the message names the file."""


def load_members(root: Path) -> list[Member]:
    """Every `packages/*/pyproject.toml` under `root`, sorted by directory name."""
    members = []
    for pyproject in sorted((root / "packages").glob("*/pyproject.toml")):
        members.append(_load_member(pyproject))
    return members


def _load_member(pyproject: Path) -> Member:
    try:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise WorkspaceError(f"{pyproject}: cannot read: {exc}") from exc
    project = data.get("project")
    if not isinstance(project, dict) or not isinstance(project.get("name"), str):
        raise WorkspaceError(f"{pyproject}: no [project] name")
    version = project.get("version")
    try:
        dependencies = tuple(Requirement.parse(r) for r in project.get("dependencies", []))
        optional = {
            extra: tuple(Requirement.parse(r) for r in reqs)
            for extra, reqs in project.get("optional-dependencies", {}).items()
        }
    except ValueError as exc:
        raise WorkspaceError(f"{pyproject}: {exc}") from exc
    src = pyproject.parent / "src"
    import_names = tuple(
        sorted(p.parent.name for p in src.glob("*/__init__.py")) if src.is_dir() else ()
    )
    return Member(
        path=pyproject.parent,
        pyproject=pyproject,
        name=normalize(project["name"]),
        version=version if isinstance(version, str) else None,
        import_names=import_names,
        dependencies=dependencies,
        optional=optional,
    )


def internal_closure(member: Member, members: list[Member]) -> list[Member]:
    """`member` and every workspace member it needs through its base dependencies.

    This is what `uv sync --package <member>` installs (extras excluded), so it is exactly
    the set of sibling packages the member's isolated environment may contain.
    """
    by_name = {m.name: m for m in members}
    seen: dict[str, Member] = {}
    stack = [member]
    while stack:
        current = stack.pop()
        if current.name in seen:
            continue
        seen[current.name] = current
        stack.extend(by_name[r.name] for r in current.dependencies if r.name in by_name)
    return sorted(seen.values(), key=lambda m: m.name)


def relative(path: Path, root: Path) -> str:
    """`path` relative to `root` when it lies below it, for short, clickable messages."""
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)
