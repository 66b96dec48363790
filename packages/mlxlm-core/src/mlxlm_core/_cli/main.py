"""``mlxlm <command> ...``: finds subcommands in the ``mlxlm.commands`` entry-point group.

Core never imports a sibling package: mlxlm-gguf, mlxlm-server and the rest register their
own commands, and a command whose package is missing is reported with what to install.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from .._errors import MlxlmError
from ..distributed import peer_failures
from .command import Command, OneLineParser

# Commands that live in sibling distributions, so a missing one can say what to install.
_PROVIDED_BY = {
    "server": "mlxlm-server",
    "gguf": "mlxlm-gguf",
    "quantize": "mlxlm-quant",
    "awq": "mlxlm-quant",
    "gptq": "mlxlm-quant",
    "dwq": "mlxlm-quant",
    "lora": "mlxlm-tune",
    "fuse": "mlxlm-tune",
}


def _discover() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group="mlxlm.commands")}


def run_command(command: Command, argv: Sequence[str], *, prog: str) -> int:
    # transformers advises installing PyTorch on import; mlxlm uses it for tokenizers only.
    # The command (not the library) owns the process, so it may quiet that advice.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    parser = OneLineParser(prog=prog, description=command.help)
    command.add_arguments(parser)
    args = parser.parse_args(list(argv))
    try:
        with peer_failures():
            return command.run(args)
    except MlxlmError as exc:
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return 130
    except BrokenPipeError:
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    found = _discover()
    if not argv or argv[0] in ("-h", "--help"):
        names = sorted(found)
        lines = [f"  {name:<14} {_summary(found[name])}" for name in names]
        print("usage: mlxlm <command> [options]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from .. import __version__

        print(f"mlxlm {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in found:
        if name in _PROVIDED_BY:
            sys.stderr.write(
                f"mlxlm: '{name}' needs {_PROVIDED_BY[name]}: pip install {_PROVIDED_BY[name]}\n"
            )
        else:
            sys.stderr.write(
                f"mlxlm: unknown command '{name}' (known: {', '.join(sorted(found))})\n"
            )
        return 2
    command = found[name].load()  # type: ignore[attr-defined]
    return run_command(command, rest, prog=f"mlxlm {name}")


def _summary(entry: object) -> str:
    try:
        return entry.load().help  # type: ignore[attr-defined]
    except Exception:  # a broken plugin must not break `mlxlm --help`
        return "(failed to load)"


def entry() -> None:
    raise SystemExit(main())
