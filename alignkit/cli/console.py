"""`alignkit console`: the whole path in one browser page."""

from __future__ import annotations

import argparse
from typing import Any

from alignkit.cli.common import add_command

EPILOG = """examples:
  alignkit console                                   # http://127.0.0.1:7860, workspace ./alignkit-workspace
  alignkit console --workspace ~/runs --allow ~/models --allow ../shared/data
  alignkit console --host 0.0.0.0 --token s3cret     # other machines: every request needs the token
"""


def register(subparsers: Any) -> None:
    c = add_command(
        subparsers, "console", "the browser console: data, train, evaluate, chat, review, ship", EPILOG
    )
    c.add_argument("--workspace", default="alignkit-workspace", help="folder of its runs, data and models")
    c.add_argument("--host", default="127.0.0.1")
    c.add_argument("--port", type=int, default=7860)
    c.add_argument("--token", help="required of every request (needed when --host is not a loopback address)")
    c.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder outside the workspace it may use",
    )
    c.add_argument(
        "--max-upload-mb", type=float, default=200.0, help="largest data file upload (default 200)"
    )
    c.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from alignkit.console.app import ConsoleSettings
    from alignkit.console.command import run_console

    settings = ConsoleSettings(
        workspace=args.workspace,
        host=args.host,
        port=args.port,
        token=args.token,
        allow=args.allow,
        max_upload_mb=args.max_upload_mb,
    )
    return run_console(settings)
