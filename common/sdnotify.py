"""A small client for the systemd notification protocol (``sd_notify(3)``).

The service manager passes a datagram socket in ``NOTIFY_SOCKET`` (a path, or an
abstract socket name starting with ``@``) and, with ``WatchdogSec=``, the watchdog
interval in microseconds in ``WATCHDOG_USEC`` (for the process ``WATCHDOG_PID`` when
that is set). A daemon tells it ``READY=1`` once it serves, ``WATCHDOG=1`` well within
the interval, ``STOPPING=1`` when it begins to shut down and ``STATUS=...`` for
``systemctl status``.

The composition roots read the environment and build a :class:`Notifier` with
:meth:`Notifier.from_environment`; without ``NOTIFY_SOCKET`` (run by hand, in tests)
every call is a no-op. A lost notification must not stop the daemon, and the service
manager notices a missing ``READY=1`` or watchdog ping on its own: a failed send never
raises, each call reports whether the datagram went out.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Notifier:
    """Where to send notifications, and how often the watchdog wants a ping.

    ``address`` is ``None`` when no service manager listens. ``watchdog_usec`` is the
    watchdog timeout in microseconds, or ``None`` when there is no watchdog for us.
    """

    address: str | bytes | None = None
    watchdog_usec: int | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str], pid: int) -> Notifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.

        ``pid`` is the calling process's id: a watchdog meant for another process
        (``WATCHDOG_PID`` set to a different pid) is not ours to feed.
        """
        address = _address(environ.get("NOTIFY_SOCKET", ""))
        watchdog = _positive_int(environ.get("WATCHDOG_USEC", ""))
        watchdog_pid = environ.get("WATCHDOG_PID", "")
        if watchdog_pid and _positive_int(watchdog_pid) != pid:
            watchdog = None
        return cls(address, watchdog if address is not None else None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings: half the timeout, as ``sd_watchdog_enabled``
        advises; ``None`` without a watchdog."""
        if self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2_000_000

    def notify(self, *assignments: str) -> bool:
        """Send ``VAR=value`` lines in one datagram; ``False`` if nothing was sent."""
        if self.address is None or not assignments:
            return False
        for line in assignments:
            if "\n" in line or "=" not in line:
                raise ValueError(f"not a VAR=value notification line: {line!r}")
        payload = "\n".join(assignments).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(payload, self.address)
        except OSError:
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *_status(status))

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *_status(status))

    def status(self, text: str) -> bool:
        return self.notify(*_status(text))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    async def feed_watchdog(self) -> None:
        """Ping the watchdog at :attr:`watchdog_interval` until cancelled.

        Returns at once when there is no watchdog. It runs on the daemon's event loop,
        so a loop that stops turning stops the pings and the service manager restarts
        the daemon.
        """
        interval = self.watchdog_interval
        if interval is None:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(interval)


def _address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode("utf-8")
    if value.startswith("/"):
        return value
    return None  # sd_notify accepts only absolute paths and abstract names


def _positive_int(value: str) -> int | None:
    if not value.isdigit():
        return None
    number = int(value)
    return number if number > 0 else None


def _status(text: str) -> tuple[str, ...]:
    # STATUS is one line; keep the first so a multi-line message cannot break the datagram.
    line = text.splitlines()[0] if text else ""
    return (f"STATUS={line}",) if line else ()
