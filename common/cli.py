"""The ``meterd`` console script.

Subcommand groups are plugins registered under the ``meterd.commands`` entry-point
group (see ``pyproject.toml``): each exposes ``register(subparsers)``, which adds its
parser and sets ``handler`` (a callable taking the parsed namespace and returning an
exit code). ``common`` stays free of imports from ``agent`` and ``collector``.

A user mistake (bad flag, missing file, bad configuration) prints one line to stderr
and exits non-zero; tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, entry_points, version
from typing import Any

from common.errors import MeterdError
from common.tls import restrict_grpc_to_tls13

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], int]
SubParsers = "argparse._SubParsersAction[argparse.ArgumentParser]"


def meterd_version() -> str:
    try:
        return version("meterd")
    except PackageNotFoundError:
        return "0+unknown"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line, without the usage block."""

    def error(self, message: str) -> Any:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="meterd",
        description="Usage metering and billing for server-rental providers.",
    )
    parser.add_argument("--version", action="version", version=f"meterd {meterd_version()}")
    subparsers = parser.add_subparsers(
        title="commands", metavar="COMMAND", parser_class=_Parser, required=True
    )
    for entry in sorted(entry_points(group="meterd.commands"), key=lambda e: e.name):
        entry.load()(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # gRPC reads its TLS cipher configuration when it is imported, and command plugins
    # import it: TLS 1.2 is shut off before any of them loads.
    restrict_grpc_to_tls13()
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except MeterdError as exc:
        print(f"meterd: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        # A file that is missing or unreadable is the user's to fix, not a bug.
        print(f"meterd: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "),
              file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
