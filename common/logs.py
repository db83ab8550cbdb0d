"""Structured logs to stderr: one JSON line per event (journald keeps them as they are).

Event names are verbs in snake_case (``batch_shipped``, ``entry_posted``), with the
context as keys. Composition roots call :func:`configure` once; modules take a logger
with :func:`get`. The pure core does not log.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def configure(level: str = "info", *, json: bool = True) -> None:
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get(name: str) -> Any:
    return structlog.get_logger(name)


# --- library log records (asyncpg, asyncio, grpc, aiohttp) --------------------------------


class _LibraryRecords(logging.Handler):
    """Each record a library logs through :mod:`logging` as one structured line: the
    event ``<library>_logged`` with its logger, message and, when it carries one, the
    exception's type and text (never a multi-line traceback). asyncpg's pool, for one,
    logs a traceback every time it fails to reconnect while PostgreSQL is down."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = {"logger": record.name, "message": record.getMessage()}
            if record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                fields["error"] = f"{type(exc).__name__}: {exc}"
            get(record.name).log(record.levelno, f"{record.name.split('.')[0]}_logged", **fields)
        except Exception:  # noqa: BLE001 (a log line must never break the caller)
            self.handleError(record)


def capture_library_logs(level: str = "warning") -> None:
    """Route what libraries log (at ``level`` and above) through :func:`configure`'s
    structured output instead of Python's bare stderr fallback."""
    root = logging.getLogger()
    if not any(isinstance(h, _LibraryRecords) for h in root.handlers):
        root.addHandler(_LibraryRecords())
    root.setLevel(_LEVELS.get(level, logging.WARNING))


# --- end library log records ----------------------------------------------------------------
