"""Public pieces for packages that add ``mlxlm`` subcommands.

A sibling package registers ``name = "its_pkg._cli:COMMAND"`` in the ``mlxlm.commands``
entry-point group, builds the command from :class:`Command`, and reuses the shared
argument groups, so flags are spelled the same in every command.
"""

from ._cli.args import (
    add_cache_args,
    add_model_args,
    add_sampling_args,
    load_from_args,
    make_sampling,
)
from ._cli.command import Command, OneLineParser, console

__all__ = [
    "Command",
    "OneLineParser",
    "add_cache_args",
    "add_model_args",
    "add_sampling_args",
    "console",
    "load_from_args",
    "make_sampling",
]
