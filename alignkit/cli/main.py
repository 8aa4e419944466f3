"""`alignkit` command line: one module per command (each `register(subparsers)` and a `run(args)` it sets as
the parser's default), all thin faces on `alignkit.api`. A user mistake (`UserError`) prints one message and
exits with code 2; `--debug` shows the traceback.

The command modules import the library inside their run functions, the one place alignkit imports its own code
lazily on purpose: `alignkit --help` and a mistyped flag answer in 0.1 s instead of the 4 s torch and
transformers take to load (import circles cannot hide there: tests/test_layout.py reads those imports too)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from alignkit import __version__
from alignkit.cli import console, data, evaluate, quickstart, ship, tiny, train
from alignkit.errors import UserError

# the commands, in the order `alignkit --help` lists them
COMMANDS = (train, tiny, data, evaluate, quickstart, ship, console)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alignkit",
        description="Post-training for causal language models: SFT, reward models, PPO, DPO family, KTO, GRPO.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"alignkit {__version__}")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    p.set_defaults(run=lambda args: _usage(p))
    return p


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def quiet_libraries() -> None:
    """The libraries' progress bars and INFO chatter off: alignkit reports what matters once."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # peft's adapter loading asks transformers for a renamed attribute (transformers 5.x): not the user's concern
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
    # its readers log a failure and then raise it: the raised error is reported once, by the CLI
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    for name in ("httpx", "httpcore", "huggingface_hub", "urllib3"):  # one line per HTTP call otherwise
        logging.getLogger(name).setLevel(logging.WARNING)


class OwnHandlersFirst(logging.Filter):
    """Drop a record that a logger on its way up to the root already printed with a handler of its own
    (huggingface_hub, transformers): one line per event, not one per handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None and logger is not logging.root:
            if any(prints(handler, record) for handler in logger.handlers):
                return False
            if not logger.propagate:
                break
            logger = logger.parent
        return True


def prints(handler: logging.Handler, record: logging.LogRecord) -> bool:
    """Whether a library's own handler shows the record (a NullHandler, or one set above its level, does not)."""
    return not isinstance(handler, logging.NullHandler) and record.levelno >= handler.level


class Prefixed(logging.Formatter):
    """`[alignkit] message`, or `[library] message` for another library's record; a logged exception's
    traceback follows, as the standard formatter adds it."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's API
        return f"[{record.name.split('.')[0]}] {record.getMessage()}"


def setup_logging() -> None:
    """alignkit's INFO lines and other libraries' warnings to stderr, each once. Called by the CLI only: a
    library user's logging is theirs to configure."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(Prefixed())
    handler.addFilter(OwnHandlersFirst())
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    setup_logging()
    quiet_libraries()
    try:
        code = args.run(args)
    except UserError as exc:
        if debug:
            raise
        print(f"alignkit: error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:  # output piped into `head`
        code = 0
    sys.exit(code)
