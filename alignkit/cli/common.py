"""What every command shares: the `--debug` flag and the help layout."""

from __future__ import annotations

import argparse
from typing import Any

RAW = argparse.RawDescriptionHelpFormatter


def debug_flag() -> argparse.ArgumentParser:
    """`--debug` for any command, anywhere on its line (SUPPRESS: `alignkit --debug CMD` keeps its value)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show Python tracebacks"
    )
    return parent


def add_command(subparsers: Any, name: str, help: str, epilog: str = "") -> argparse.ArgumentParser:
    """A command's parser, with `--debug` and the examples (`epilog`) printed as written."""
    return subparsers.add_parser(name, help=help, epilog=epilog, formatter_class=RAW, parents=[debug_flag()])


def none_given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """{name: value} of the flags `names` (None where a flag was not given)."""
    return {name: getattr(args, name, None) for name in names}
