"""The agent's connection to the collector: gRPC over mutual TLS 1.3.

The agent speaks gRPC through ``grpclib``, a gRPC client written in Python on the
``h2`` HTTP/2 library and the standard ``ssl`` module, not through ``grpcio`` (which
the collector serves with): the wire is the same, while grpcio's C core cost the
agent's process about 10 MiB more resident memory and its background threads woke
about twenty times a second while a channel was open (docs/benchmarks.md).

TLS is the standard library's: the context offers TLS 1.3 and nothing older, trusts
only the configured CA (never the system's store), presents the agent's certificate,
and checks the collector's certificate against its host name (or ``server_name``).

Every failure of a call becomes a :class:`PushFailed` naming a gRPC status: what the
collector answered, ``UNAVAILABLE`` when it could not be reached or the connection
broke, ``DEADLINE_EXCEEDED`` when it did not answer in time, ``UNAUTHENTICATED`` when
the collector's certificate was refused. The collector's back-pressure answer
(``RESOURCE_EXHAUSTED`` with a ``retry-after-ms`` trailer) carries its delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import Mapping
from pathlib import Path

from grpclib.client import Channel, Handler, UnaryUnaryMethod
from grpclib.config import Configuration
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError
from grpclib.protocol import H2Protocol

from common.proto import meterd_pb2 as pb

PUSH_METHOD = "/meterd.v1.Ingest/Push"
# Failures raised here, not answered by the collector: the connection is suspect.
CONNECTION_FAILURES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "UNAUTHENTICATED"})


class PushFailed(Exception):
    """A call that was not answered with a :class:`PushResponse`."""

    def __init__(self, code: str, details: str, retry_after: float = 0.0) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code  # a gRPC status name, e.g. "UNAVAILABLE"
        self.details = details
        self.retry_after = retry_after  # seconds the collector asked us to wait, or 0


def client_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """TLS 1.3 only, trusting only ``ca``, presenting ``cert`` with ``key``, HTTP/2."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the peer and its name
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_verify_locations(cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    context.set_alpn_protocols(["h2"])
    return context


def split_target(target: str) -> tuple[str, int]:
    """``host:port`` (``[v6 address]:port`` too) as a host and a port number."""
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {target!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class _Connection(H2Protocol):
    """grpclib's HTTP/2 connection, which also keeps its transport and tells when its
    socket is closed."""

    transport: asyncio.Transport | None = None

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # a stream's, TLS over TCP
        self.transport = transport
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            if not self.gone.done():
                self.gone.set_result(None)


class _Channel(Channel):
    """grpclib's channel, keeping its open connection so that closing can finish it."""

    opened: _Connection | None = None

    def _protocol_factory(self) -> H2Protocol:
        return _Connection(Handler(), self._config, self._h2_config)

    async def _create_connection(self) -> H2Protocol:
        protocol = await super()._create_connection()
        assert isinstance(protocol, _Connection)
        self.opened = protocol
        return protocol


class CollectorLink:
    """An HTTP/2 connection to the collector, opened by the first call and kept."""

    def __init__(self, target: str, context: ssl.SSLContext, server_name: str = "") -> None:
        host, port = split_target(target)
        self.target = target
        self._channel = _Channel(
            host, port, ssl=context,
            config=Configuration(ssl_target_name_override=server_name or None),
        )
        self._push = UnaryUnaryMethod[pb.PushRequest, pb.PushResponse](
            self._channel, PUSH_METHOD, pb.PushRequest, pb.PushResponse
        )

    @classmethod
    def open(
        cls, target: str, *, ca: Path, cert: Path, key: Path, server_name: str = ""
    ) -> CollectorLink:
        return cls(target, client_context(ca, cert, key), server_name)

    async def push(self, request: pb.PushRequest, deadline_seconds: float) -> pb.PushResponse:
        """Send one batch; the collector's answer, or :class:`PushFailed`. The deadline
        goes to the collector too (``grpc-timeout``), which gives up when it passes.

        The connection stays open for the next call, unless this one failed below gRPC
        (no answer in time, a broken connection, TLS): then it is dropped, and the next
        call opens a new one rather than wait on a peer that may be gone.
        """
        try:
            return await self._push_once(request, deadline_seconds)
        except PushFailed as exc:
            if exc.code in CONNECTION_FAILURES:  # no TLS close with a peer that failed us
                opened = self._drop()
                if opened is not None and opened.transport is not None:
                    opened.transport.abort()
            raise

    async def _push_once(
        self, request: pb.PushRequest, deadline_seconds: float
    ) -> pb.PushResponse:
        stream = None
        try:
            async with self._push.open(timeout=deadline_seconds) as stream:
                await stream.send_message(request, end=True)
                response = await stream.recv_message()
            # Leaving the block read the trailers: an error status there raises too.
        except GRPCError as exc:
            trailers = None if stream is None else stream.trailing_metadata
            raise PushFailed(exc.status.name, exc.message or "", _retry_after(trailers)) from None
        except TimeoutError:
            raise PushFailed("DEADLINE_EXCEEDED",
                             f"no answer within {deadline_seconds:g} s") from None
        except ssl.SSLCertVerificationError as exc:
            raise PushFailed("UNAUTHENTICATED", f"collector certificate refused: "
                             f"{exc.verify_message}") from None
        except ssl.SSLError as exc:
            raise PushFailed("UNAVAILABLE", f"TLS: {exc.reason or exc}") from None
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__
            raise PushFailed("UNAVAILABLE", f"cannot reach {self.target}: {reason}") from None
        except (StreamTerminatedError, ProtocolError, asyncio.IncompleteReadError) as exc:
            raise PushFailed("UNAVAILABLE", f"connection to {self.target} broke: "
                             f"{exc or type(exc).__name__}") from None
        if response is None:
            raise PushFailed("INTERNAL", "the collector answered without a message")
        return response

    async def close(self, grace: float = 0.2) -> None:
        """Close the connection, its socket closed when this returns.

        Closing TLS sends a close_notify alert, and the event loop then waits for the
        peer's before it closes the socket, up to its TLS shutdown timeout (30 s). The
        collector (grpcio) never answers one: a process whose loop ends in that time (an
        agent stopping) would leave the socket to the garbage collector. So the peer
        gets ``grace`` seconds to answer, and then the socket is closed without it;
        our close_notify has been sent by then either way.
        """
        opened = self._drop()
        if opened is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(opened.gone), grace)
        if not opened.gone.done() and opened.transport is not None:
            opened.transport.abort()
            with contextlib.suppress(TimeoutError):  # a turn or two of the loop
                await asyncio.wait_for(asyncio.shield(opened.gone), 5)

    def _drop(self) -> _Connection | None:
        """Close the channel (the next call opens a new connection); the connection it
        had open, if any."""
        opened, self._channel.opened = self._channel.opened, None
        self._channel.close()
        return opened


def _retry_after(metadata: Mapping[str, str | bytes] | None) -> float:
    """The ``retry-after-ms`` trailer in seconds, or 0 when absent or not a number."""
    value = None if metadata is None else metadata.get("retry-after-ms")
    if not isinstance(value, str):
        return 0.0
    try:
        return max(int(value), 0) / 1000
    except ValueError:
        return 0.0
