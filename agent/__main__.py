"""The long-running agent process: ``meterd agent run`` becomes this one.

``meterd agent run`` loads the configuration and runs the start-up checks
(:func:`agent.identity.check_identity`: key permissions, host id from the
certificate, key and certificate belong together, CA loads), then replaces itself,
by ``exec`` (same process id, so systemd's notify socket and watchdog and a test's
``kill -9`` see no difference), with ``python -P -m agent`` carrying the host id the
checks found. A fresh interpreter imports only what sampling, spooling and shipping
need: not ``cryptography`` (only the checks use it), not the other ``meterd``
command groups (the console script loads every one to build its parser), not
``rich`` (an optional import of structlog's console renderer; the agent logs JSON).
That is what keeps the agent's resident memory small; see docs/benchmarks.md. The
process talks to the collector through :mod:`agent.transport` (``grpclib`` over the
standard ``ssl`` module, TLS 1.3 only), so it never loads ``grpcio``'s C core either.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType

# Optional imports of libraries the agent imports that it never uses: blocked, so
# they are not loaded when installed (rich arrives with development tools).
UNUSED_OPTIONAL_IMPORTS = ("rich",)


# The options ``meterd agent run`` passes; all are required. They are read without
# argparse, which would cost the long-running process 0.4 MiB for four fixed options.
OPTIONS = ("--config", "--host-id", "--version", "--log-level")
LOG_LEVELS = ("debug", "info", "warning", "error")
USAGE = (
    "usage: python -m agent --config FILE --host-id HOST --version VERSION "
    f"--log-level {{{','.join(LOG_LEVELS)}}}\n"
    "The agent process that `meterd agent run` starts after its checks; run that instead."
)


def exec_argv(config: Path, host_id: str, version: str, log_level: str) -> list[str]:
    """The command line ``meterd agent run`` replaces itself with."""
    return [
        sys.executable, "-P", "-m", "agent",
        "--config", str(config), "--host-id", host_id, "--version", version,
        "--log-level", log_level,
    ]


def exec_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of the agent process: this one's, plus at most two glibc malloc
    arenas unless the operator chose a number (``MALLOC_ARENA_MAX``). glibc gives each
    thread that finds the arenas busy a new one, up to eight per core, and every arena
    keeps the pages it has touched; the agent's few threads allocate little, and two
    arenas saved it 1 to 2 MiB of resident memory (docs/benchmarks.md)."""
    return {**environ, "MALLOC_ARENA_MAX": environ.get("MALLOC_ARENA_MAX", "2")}


def parse_options(argv: Sequence[str]) -> dict[str, str] | None:
    """``{"--config": ..., ...}`` from ``--name value`` pairs, or None if they are not
    exactly :data:`OPTIONS` once each with a known log level."""
    if len(argv) != 2 * len(OPTIONS):
        return None
    options = dict(zip(argv[::2], argv[1::2], strict=True))
    if sorted(options) != sorted(OPTIONS) or options["--log-level"] not in LOG_LEVELS:
        return None
    return options


def load_runtime() -> ModuleType:
    """Import what the running agent needs (and nothing it does not); the daemon module."""
    for name in UNUSED_OPTIONAL_IMPORTS:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]
    from agent import daemon

    return daemon


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(sys.argv[1:] if argv is None else argv)
    if options is None:
        print(USAGE, file=sys.stderr)
        return 2
    daemon = load_runtime()
    from common import logs
    from common.errors import MeterdError

    logs.configure(options["--log-level"])
    try:
        code: int = asyncio.run(daemon.run(
            Path(options["--config"]), host_id=options["--host-id"], version=options["--version"]
        ))
    except MeterdError as exc:
        print(f"meterd: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"meterd: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "),
              file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    raise SystemExit(main())
