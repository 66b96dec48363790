"""What a subcommand is, and the argument parser every command uses."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

__all__ = ["Command", "OneLineParser", "console"]


@dataclass(frozen=True)
class Command:
    """A subcommand registered in the ``mlxlm.commands`` entry-point group.

    ``add_arguments`` fills the parser; ``run`` does the work and returns an exit status.
    User errors are raised as ``MlxlmError``; the dispatcher turns them into one line.
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


class OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line (``mlxlm generate: error: ...``), exit status 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def console(command: Command) -> Callable[[], None]:
    """A console-script entry (``mlxlm-generate`` …) that runs one command directly."""

    def run() -> None:
        from .main import run_command

        raise SystemExit(run_command(command, sys.argv[1:], prog=f"mlxlm-{command.name}"))

    return run
