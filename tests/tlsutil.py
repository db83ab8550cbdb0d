"""Real TLS on loopback for tests: one handshake, or an ingest service over mutual TLS."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from common.proto.meterd_pb2_grpc import IngestServicer, add_IngestServicer_to_server
from common.tls import grpc_server_credentials


@dataclass(frozen=True)
class Handshake:
    server_error: OSError | None
    client_version: str | None


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> Handshake:
    """One TLS handshake on loopback, then one byte from server to client."""
    errors: list[OSError | None] = []
    version: str | None = None
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                conn.settimeout(10)
                with server.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"k")
            except OSError as exc:
                errors.append(exc)
            else:
                errors.append(None)

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with (
                socket.create_connection(listener.getsockname(), timeout=10) as raw,
                client.wrap_socket(raw, server_hostname="localhost") as tls,
            ):
                if tls.recv(1) == b"k":
                    version = tls.version()
        except (ssl.SSLError, OSError):
            pass
        thread.join()
    return Handshake(server_error=errors[0], client_version=version)


async def serve_ingest(
    servicer: IngestServicer, pki_dir: Path, interceptors: Sequence[Any] = ()
) -> tuple[grpc.aio.Server, int]:
    """``servicer`` on a real grpc.aio server on a loopback port, with the test PKI's
    server certificate and mutual TLS; the caller stops it."""
    server = grpc.aio.server(interceptors=list(interceptors))
    add_IngestServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    creds = grpc_server_credentials(
        pki_dir / "servers" / "localhost.pem", pki_dir / "servers" / "localhost.key",
        pki_dir / "ca.pem",
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    return server, port
