"""The ``mlxlm`` command: a dispatcher over subcommands found through entry points."""
