"""A TCP proxy that misbehaves on command: the network between meterd's processes.

:class:`FaultProxy` listens on loopback and forwards each accepted connection to an
upstream (round robin over several: a TCP load balancer in front of collectors). It
runs its own asyncio loop in a thread, so a synchronous test steers it while agents,
collectors and PostgreSQL talk through it. What it does to connections, the existing
ones and those that arrive later, is its :class:`Mode`:

``PASS``
    Bytes flow both ways as they arrive.
``DELAY``
    Every chunk is held for ``delay`` seconds in each direction (latency, not a
    bandwidth limit: chunks queue, order is kept).
``BLACKHOLE``
    Nothing flows and nothing is answered, like a partition where packets vanish: a
    new connection is accepted (the listen backlog would do that) but never reaches
    an upstream; bytes already read wait. When the mode changes back, they flow on,
    as TCP retransmissions would deliver them once the path heals. A peer that gave
    up meanwhile finds out when its own timer fires, exactly as on a real network.
``DROP``
    Connections are closed gracefully (FIN) both ways; new ones are closed at once.
``RESET``
    Connections are aborted with a TCP RST both ways; new ones are reset at once.

:meth:`FaultProxy.reset_connections` is a one-off: reset what is open now and go on
in the current mode (a flapping link, a load balancer restarting).

Counters (``accepted``, ``resets``, ``bytes_up``, ``bytes_down``) let a test assert
that a fault actually hit traffic rather than an idle link.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
import threading
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


class Mode(enum.Enum):
    PASS = "pass"
    DELAY = "delay"
    BLACKHOLE = "blackhole"
    DROP = "drop"
    RESET = "reset"


def _abort_with_rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)
class _Connection:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    closed: bool = False

    def writers(self) -> list[asyncio.StreamWriter]:
        return [w for w in (self.client, self.upstream) if w is not None]


class FaultProxy:
    """Forward ``127.0.0.1:<port>`` to ``upstreams`` under the current :class:`Mode`."""

    def __init__(self, upstreams: Sequence[tuple[str, int]], *, port: int = 0) -> None:
        assert upstreams, "a proxy needs somewhere to forward to"
        self.upstreams = list(upstreams)
        self._requested_port = port
        self.port = 0
        self.mode = Mode.PASS
        self.delay = 0.0
        self.accepted = 0
        self.resets = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self._next_upstream = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy",
                                        daemon=True)
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._handlers: set[asyncio.Task[Any]] = set()  # one per accepted connection
        self._changed: asyncio.Event | None = None

    # -- control (from the test's thread) ---------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_mode(self, mode: Mode, delay: float = 0.0) -> None:
        """Apply ``mode`` to the connections open now and to every later one."""
        self._call(self._set_mode(mode, delay))

    def pass_through(self) -> None:
        self.set_mode(Mode.PASS)

    def delay_by(self, seconds: float) -> None:
        self.set_mode(Mode.DELAY, seconds)

    def blackhole(self) -> None:
        self.set_mode(Mode.BLACKHOLE)

    def drop(self) -> None:
        self.set_mode(Mode.DROP)

    def reset(self) -> None:
        self.set_mode(Mode.RESET)

    def reset_connections(self) -> int:
        """RST every open connection; the mode stays. Returns how many were reset."""
        return self._call(self._reset_all())

    @property
    def open_connections(self) -> int:
        return self._call(self._count())

    def traffic(self) -> tuple[int, int]:
        """Bytes forwarded up and down so far, read on the proxy's loop (a peer may have
        received a chunk a moment before the loop counted it)."""
        return self._call(self._traffic())

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    # -- the loop's side ----------------------------------------------------------------

    async def _start(self) -> None:
        self._changed = asyncio.Event()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1",
                                                  self._requested_port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            self._finish(conn, rst=True)
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    async def _count(self) -> int:
        return len(self._connections)

    async def _traffic(self) -> tuple[int, int]:
        return self.bytes_up, self.bytes_down

    async def _set_mode(self, mode: Mode, delay: float) -> None:
        self.mode, self.delay = mode, delay
        if mode in (Mode.DROP, Mode.RESET):
            for conn in list(self._connections):
                self._finish(conn, rst=mode is Mode.RESET)
        assert self._changed is not None
        self._changed.set()  # wake everything waiting out a black hole
        self._changed = asyncio.Event()

    async def _reset_all(self) -> int:
        conns = list(self._connections)
        for conn in conns:
            self._finish(conn, rst=True)
        return len(conns)

    def _finish(self, conn: _Connection, *, rst: bool) -> None:
        if conn.closed:
            return
        conn.closed = True
        self.resets += rst
        for w in conn.writers():
            if rst:
                _abort_with_rst(w)
            else:
                w.close()
        self._connections.discard(conn)

    async def _passable(self) -> None:
        """Return once bytes may flow (raise when the connection must end)."""
        while self.mode is Mode.BLACKHOLE:
            assert self._changed is not None
            await self._changed.wait()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            await self._serve(reader, writer)
        finally:
            self._handlers.discard(handler)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        conn = _Connection(writer)
        if self.mode in (Mode.DROP, Mode.RESET):
            self.resets += self.mode is Mode.RESET
            if self.mode is Mode.RESET:
                _abort_with_rst(writer)
            else:
                writer.close()
            return
        self._connections.add(conn)
        try:
            await self._passable()  # a black-holed connection never reaches upstream
            if conn.closed:
                return
            host, port = self.upstreams[self._next_upstream % len(self.upstreams)]
            self._next_upstream += 1
            try:
                up_reader, up_writer = await asyncio.open_connection(host, port)
            except OSError:
                self._finish(conn, rst=True)  # what the upstream's refusal looks like
                return
            if conn.closed:
                _abort_with_rst(up_writer)
                return
            conn.upstream = up_writer
            conn.tasks = [
                asyncio.create_task(self._pump(conn, reader, up_writer, up=True)),
                asyncio.create_task(self._pump(conn, up_reader, writer, up=False)),
            ]
            try:
                await asyncio.gather(*conn.tasks, return_exceptions=True)
            except asyncio.CancelledError:
                for task in conn.tasks:
                    task.cancel()
                await asyncio.gather(*conn.tasks, return_exceptions=True)
                raise
        finally:
            self._finish(conn, rst=False)

    async def _pump(
        self,
        conn: _Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        up: bool,
    ) -> None:
        """One direction: read, wait out the mode, write; chunks keep their order."""
        # Bounded: reading stops (and TCP pushes back) when delivery falls behind.
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=64)

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    with contextlib.suppress(OSError):
                        if writer.can_write_eof():
                            writer.write_eof()
                    return
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self._passable()
                if conn.closed:
                    return
                writer.write(data)
                if up:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
                await writer.drain()

        sender = asyncio.create_task(deliver())
        try:
            while not conn.closed:
                try:
                    data = await reader.read(65536)
                except OSError:
                    data = b""
                due = time.monotonic() + (self.delay if self.mode is Mode.DELAY else 0.0)
                put = asyncio.ensure_future(queue.put((due, data)))
                await asyncio.wait([put, sender], return_when=asyncio.FIRST_COMPLETED)
                if not put.done():  # the sender ended (the peer went away)
                    put.cancel()
                    break
                if not data:
                    break
            if not conn.closed:  # else the sender may wait for a chunk that never comes
                await sender
        except (OSError, ConnectionError):
            self._finish(conn, rst=True)
        finally:
            if not sender.done():
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError, ConnectionError):
                    await sender
