"""``mlxlm manage``: list and delete models in the Hugging Face cache, offline.

The cache directory is read from the environment when the command runs (``HF_HUB_CACHE``,
else ``HF_HOME``/hub, else huggingface_hub's default), not when huggingface_hub was
imported, so ``HF_HOME=... mlxlm manage --scan`` looks where the user pointed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from .command import Command, console


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _scan(cache_dir: Path, pattern: str) -> list[Any]:
    """Cached repos whose id contains ``pattern`` (none if there is no cache yet)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    from .._errors import InvalidArgumentError

    if not cache_dir.exists():
        return []
    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return []
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(f"cannot scan the cache at {cache_dir}: {exc}") from None
    repos = sorted((r for r in info.repos if pattern in r.repo_id), key=lambda r: r.repo_id)
    return repos


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(x) for x in col) for col in zip(headers, *rows)]
    lines = [headers, ["-" * w for w in widths], *rows]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines
    )


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.1f}{unit}" if unit != "B" else f"{int(n)}B"
        n /= 1000
    return f"{n:.1f}TB"


def _record(repo: Any) -> dict[str, Any]:
    return {
        "repo_id": repo.repo_id,
        "repo_type": repo.repo_type,
        "size_on_disk": repo.size_on_disk,
        "nb_files": repo.nb_files,
        "last_modified": repo.last_modified,
        "path": str(repo.repo_path),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--scan", action="store_true", help="list cached repos")
    action.add_argument("--delete", action="store_true", help="delete cached repos (asks first)")
    parser.add_argument(
        "--pattern", default=None, help="only repos whose id contains this text (--delete needs it)"
    )
    parser.add_argument("--yes", "-y", action="store_true", help="delete without asking")
    parser.add_argument("--cache-dir", default=None, help="Hugging Face hub cache to look in")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _confirm(question: str) -> bool:
    """y/N on stdin; anything but yes (or end of input) means no."""
    sys.stdout.write(f"{question} [y/N] ")
    sys.stdout.flush()
    answer = sys.stdin.readline()
    if not answer:
        sys.stdout.write("\n")
    return answer.strip().lower() in ("y", "yes")


def run(args: argparse.Namespace) -> int:
    from .._errors import InvalidArgumentError

    cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else hub_cache_dir()
    if args.delete and not args.pattern:
        raise InvalidArgumentError("--delete needs --pattern (the text repo ids must contain)")
    repos = _scan(cache_dir, args.pattern or "")
    if args.scan:
        if args.json:
            print(json.dumps({"cache_dir": str(cache_dir), "repos": [_record(r) for r in repos]}))
        elif not repos:
            print(
                f"No cached models in {cache_dir}"
                + (f' matching "{args.pattern}"' if args.pattern else "")
            )
        else:
            rows = [[r.repo_id, r.repo_type, r.size_on_disk_str, str(r.repo_path)] for r in repos]
            print(_table(rows, ["REPO ID", "TYPE", "SIZE", "PATH"]))
        return 0
    if not repos:
        if args.json:
            print(json.dumps({"cache_dir": str(cache_dir), "deleted": []}))
        else:
            print(f'No cached models in {cache_dir} matching "{args.pattern}"')
        return 0
    if not args.json:
        rows = [[r.repo_id, r.size_on_disk_str, str(r.repo_path)] for r in repos]
        print(_table(rows, ["REPO ID", "SIZE", "PATH"]))
    if not args.yes and not _confirm(f"Delete {len(repos)} cached repo(s)?"):
        print("Nothing deleted.", file=sys.stderr if args.json else sys.stdout)
        return 0
    # Whole repo folders go (blobs, snapshots and refs live inside each). Deleting by commit
    # hash instead (huggingface_hub's delete_revisions) would also take any other cached
    # repo that shares a commit, such as a mirror of the same history.
    freed = 0
    for repo in repos:
        try:
            shutil.rmtree(repo.repo_path)
        except OSError as exc:
            raise InvalidArgumentError(
                f"could not delete {repo.repo_path}: {exc.strerror or exc}"
            ) from None
        freed += repo.size_on_disk
    if args.json:
        print(json.dumps({"cache_dir": str(cache_dir), "deleted": [r.repo_id for r in repos]}))
    else:
        print(f"Deleted {len(repos)} repo(s), freed {_size(freed)}.")
    return 0


COMMAND = Command("manage", "list or delete models in the Hugging Face cache", add_arguments, run)
main = console(COMMAND)
