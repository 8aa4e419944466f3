"""The command line: `alignkit COMMAND ...`, one module per command, each a thin face on `alignkit.api`."""

from alignkit.cli.main import main

__all__ = ["main"]
