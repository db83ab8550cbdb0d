"""The fault proxy does to a connection what each mode says, against a plain echo server."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator

import pytest

from tests.reliability.proxy import FaultProxy, Mode


class Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except ConnectionResetError:
            pass  # the proxy was told to reset


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    p = FaultProxy([("127.0.0.1", server.server_address[1])]).start()
    try:
        yield p
    finally:
        p.close()
        server.shutdown()
        server.server_close()


def connect(p: FaultProxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", p.port), timeout=10)


def echo(s: socket.socket, payload: bytes) -> bytes:
    s.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def test_pass_and_delay_deliver_every_byte_in_order(proxy: FaultProxy) -> None:
    payload = bytes(range(256)) * 1024
    with connect(proxy) as s:
        assert echo(s, payload) == payload
        proxy.delay_by(0.05)
        assert echo(s, payload) == payload
    assert proxy.traffic() == (2 * len(payload), 2 * len(payload))


def test_a_black_hole_holds_bytes_and_delivers_them_when_it_heals(proxy: FaultProxy) -> None:
    with connect(proxy) as s:
        assert echo(s, b"before") == b"before"
        proxy.blackhole()
        s.sendall(b"during")
        s.settimeout(0.5)
        with pytest.raises(TimeoutError):
            s.recv(100)  # nothing comes back while the path is cut
        with connect(proxy) as late:  # a new connection is accepted, and hangs too
            late.settimeout(0.5)
            late.sendall(b"late")
            with pytest.raises(TimeoutError):
                late.recv(100)
            proxy.pass_through()
            late.settimeout(10)
            assert late.recv(100) == b"late"
        s.settimeout(10)
        assert s.recv(100) == b"during"


def test_drop_closes_and_reset_aborts(proxy: FaultProxy) -> None:
    with connect(proxy) as s:
        assert echo(s, b"x") == b"x"
        proxy.drop()
        assert s.recv(100) == b""  # a clean close (FIN)
    with connect(proxy) as s:
        assert s.recv(100) == b""  # new connections too
    proxy.pass_through()
    with connect(proxy) as s:
        assert echo(s, b"y") == b"y"
        proxy.set_mode(Mode.RESET)
        with pytest.raises(ConnectionResetError):
            s.recv(100)
    assert proxy.resets >= 1
    proxy.pass_through()
    with connect(proxy) as s:
        assert echo(s, b"z") == b"z"
        assert proxy.reset_connections() == 1
        with pytest.raises(ConnectionResetError):
            s.recv(100)
