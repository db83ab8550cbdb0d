"""The agent's connection to the collector (agent.transport): every way a call can fail
becomes a PushFailed with a gRPC status the shipper acts on, against the collector's
real gRPC service or a real TLS server on loopback."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import psutil
import pytest

from agent.shipper import RETRYABLE, ShipFailed, Shipper, ShipperSettings
from agent.spool import Spool
from agent.transport import CollectorLink, PushFailed, split_target
from collector.config import IngestConfig
from collector.fleet import Fleet
from collector.ingest import IngestService
from common import pki
from common.proto import meterd_pb2 as pb
from common.wire import to_proto
from tests.e2e.test_end_to_end import link, samples
from tests.e2e.test_ingest_policy import BlockingLedger
from tests.reliability.proxy import FaultProxy
from tests.tlsutil import serve_ingest


def request(host: str, count: int, seed: int) -> pb.PushRequest:
    return pb.PushRequest(records=[to_proto(r) for r in samples(host, count, seed)])


async def start_collector(pki_dir: Path, ledger: BlockingLedger, config: IngestConfig) -> tuple[
    grpc.aio.Server, int
]:
    """The collector's own ingest service on a real grpc.aio server with mTLS."""
    service = IngestService(lambda: ledger, config, Fleet())  # type: ignore[arg-type, return-value]
    return await serve_ingest(service, pki_dir)


@pytest.fixture
async def collector(pki_dir: Path) -> AsyncIterator[tuple[BlockingLedger, int]]:
    ledger = BlockingLedger()
    server, port = await start_collector(
        pki_dir, ledger, IngestConfig(max_in_flight_records=8, retry_after_ms=1500)
    )
    try:
        yield ledger, port
    finally:
        ledger.release.set()
        await server.stop(None)


def server_context(pki_dir: Path, *, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki_dir / "servers" / "localhost.pem",
                            pki_dir / "servers" / "localhost.key")
    context.load_verify_locations(pki_dir / "ca.pem")
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["h2"])
    if maximum is not None:
        context.maximum_version = maximum
    return context


async def serve_silently(context: ssl.SSLContext) -> tuple[asyncio.Server, list[bytes]]:
    """A TLS server that reads whatever comes and never answers."""
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(65536):
            received.append(chunk)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    return server, received


async def failure(ch: CollectorLink, deadline: float = 10.0) -> PushFailed:
    try:
        with pytest.raises(PushFailed) as info:
            await ch.push(request("host-a", 3, 1), deadline)
    finally:
        await ch.close()
    return info.value


async def test_an_answer_comes_back_over_mutual_tls13(
    pki_dir: Path, collector: tuple[BlockingLedger, int]
) -> None:
    ledger, port = collector
    ledger.release.set()
    ch = link(pki_dir, "host-a", f"127.0.0.1:{port}")
    try:
        response = await ch.push(request("host-a", 3, 1), 10)
        assert [a.outcome for a in response.acks] == [pb.ACCEPTED] * 3
        # The collector knows the agent by its certificate: host-b may not speak for host-a.
        refused = await ch.push(request("host-b", 1, 2), 10)
        assert [a.outcome for a in refused.acks] == [pb.REJECTED]
    finally:
        await ch.close()


def sockets_to(port: int) -> list[str]:
    """This process's TCP sockets to ``port`` on loopback that are not closed yet."""
    return [
        c.status for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port
    ]


async def test_closing_the_link_closes_its_socket_before_it_returns(
    pki_dir: Path, collector: tuple[BlockingLedger, int]
) -> None:
    """The TLS close takes a few turns of the event loop: a link closed just before its
    loop ends (the agent stopping) must not leave its socket for the garbage collector."""
    ledger, port = collector
    ledger.release.set()
    ch = link(pki_dir, "host-a", f"127.0.0.1:{port}")
    assert (await ch.push(request("host-a", 2, 1), 10)).acks
    assert sockets_to(port) == ["ESTABLISHED"]
    await ch.close()
    assert sockets_to(port) == []
    await ch.close()  # twice is harmless
    assert (await ch.push(request("host-a", 2, 2), 10)).acks  # and a call opens a new one
    await ch.close()
    assert sockets_to(port) == []


async def test_one_connection_carries_every_call_and_a_silent_one_is_replaced(
    pki_dir: Path, collector: tuple[BlockingLedger, int]
) -> None:
    ledger, port = collector
    ledger.release.set()
    with FaultProxy([("127.0.0.1", port)]) as proxy:
        ch = link(pki_dir, "host-a", proxy.address)
        try:
            for seed in range(3):
                assert (await ch.push(request("host-a", 2, seed), 10)).acks
            assert proxy.accepted == 1  # kept open between calls
            proxy.blackhole()  # packets vanish: the peer looks alive, and says nothing
            with pytest.raises(PushFailed) as info:
                await ch.push(request("host-a", 2, 10), 0.5)
            assert info.value.code == "DEADLINE_EXCEEDED"
            await asyncio.sleep(0.05)  # its socket is cut, not left to a TLS close
            assert sockets_to(proxy.port) == []
            proxy.pass_through()
            assert (await ch.push(request("host-a", 2, 11), 10)).acks
            assert proxy.accepted == 2  # not the silent connection again: a new one
            proxy.reset_connections()  # the collector went away and came back
            await asyncio.sleep(0.2)  # the reset arrives before the next round does
            assert (await ch.push(request("host-a", 2, 12), 10)).acks
            assert proxy.accepted == 3
        finally:
            await ch.close()


async def test_back_pressure_carries_the_collectors_delay_to_the_shipper(
    pki_dir: Path, collector: tuple[BlockingLedger, int], tmp_path: Path
) -> None:
    ledger, port = collector
    target = f"127.0.0.1:{port}"
    held = link(pki_dir, "host-a", target)
    first = asyncio.create_task(held.push(request("host-a", 8, 1), 10))  # the whole bound
    await asyncio.wait_for(ledger.entered.wait(), 10)
    refused = await failure(link(pki_dir, "host-a", target))
    assert (refused.code, refused.retry_after) == ("RESOURCE_EXHAUSTED", 1.5)
    assert refused.code in RETRYABLE
    with Spool(tmp_path / "spool.db") as spool:
        spool.append(samples("host-a", 5, 2))
        ch = link(pki_dir, "host-a", target)
        try:
            with pytest.raises(ShipFailed) as info:
                await Shipper(spool, ch, ShipperSettings(), "test").ship_batch()
        finally:
            await ch.close()
        assert info.value.retry_after == 1.5
        assert (spool.get_meta("last_error") or "").startswith("RESOURCE_EXHAUSTED")
        ledger.release.set()
        assert [a.outcome for a in (await first).acks] == [pb.ACCEPTED] * 8
        await held.close()


async def test_a_collector_that_offers_only_tls12_is_refused(pki_dir: Path) -> None:
    context = server_context(pki_dir, maximum=ssl.TLSVersion.TLSv1_2)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        outcome: list[BaseException | bytes] = []

        def serve() -> None:  # a blocking server, as most are: it answers with an alert
            conn, _ = listener.accept()
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    outcome.append(tls.recv(65536))
            except (ssl.SSLError, OSError) as exc:
                outcome.append(exc)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        port = listener.getsockname()[1]
        refused = await failure(link(pki_dir, "host-a", f"127.0.0.1:{port}"))
        thread.join(10)
    assert refused.code == "UNAVAILABLE"
    assert refused.details == "TLS: TLSV1_ALERT_PROTOCOL_VERSION"
    [server_saw] = outcome
    assert isinstance(server_saw, ssl.SSLError)  # not one byte went over TLS 1.2
    assert "UNSUPPORTED_PROTOCOL" in str(server_saw)


async def test_a_collector_certificate_for_another_name_is_refused(
    pki_dir: Path, collector: tuple[BlockingLedger, int]
) -> None:
    _, port = collector
    ch = CollectorLink.open(
        f"127.0.0.1:{port}", ca=pki_dir / "ca.pem", cert=pki_dir / "agents" / "host-a.pem",
        key=pki_dir / "agents" / "host-a.key", server_name="collector.example.net",
    )
    refused = await failure(ch)
    assert refused.code == "UNAUTHENTICATED"
    assert "collector.example.net" in refused.details


async def test_a_collector_certified_by_another_ca_is_refused(
    pki_dir: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other-ca"
    pki.init_ca(other)
    pki.issue_server(other, "localhost", ip_addresses=["127.0.0.1"])
    server, received = await serve_silently(server_context(other))
    port = server.sockets[0].getsockname()[1]
    try:
        refused = await failure(link(pki_dir, "host-a", f"127.0.0.1:{port}"))
    finally:
        server.close()
    assert refused.code == "UNAUTHENTICATED"
    assert "certificate" in refused.details
    assert received == []


async def test_an_agent_certificate_the_collector_does_not_trust_is_unavailable(
    pki_dir: Path, collector: tuple[BlockingLedger, int], tmp_path: Path
) -> None:
    _, port = collector
    other = tmp_path / "other-ca"
    pki.init_ca(other)
    pki.issue_agent(other, "host-a")
    ch = CollectorLink.open(
        f"127.0.0.1:{port}", ca=pki_dir / "ca.pem", cert=other / "agents" / "host-a.pem",
        key=other / "agents" / "host-a.key",
    )
    refused = await failure(ch)
    assert refused.code == "UNAVAILABLE"
    # In TLS 1.3 the collector refuses a client certificate after the client's side of
    # the handshake is done: the agent sees the connection close (`meterd agent check`
    # tells why), and keeps retrying, as a key being replaced may be trusted soon.
    assert refused.details == f"connection to 127.0.0.1:{port} broke: Connection lost"


async def test_a_collector_that_never_answers_runs_into_the_deadline(pki_dir: Path) -> None:
    server, received = await serve_silently(server_context(pki_dir))
    port = server.sockets[0].getsockname()[1]
    try:
        refused = await failure(link(pki_dir, "host-a", f"127.0.0.1:{port}"), deadline=0.5)
    finally:
        server.close()
    assert refused.code == "DEADLINE_EXCEEDED"
    assert refused.details == "no answer within 0.5 s"
    assert refused.code in RETRYABLE
    assert b"".join(received).startswith(b"PRI * HTTP/2.0")  # it did send the request


async def test_no_collector_listening_is_unavailable_and_retried() -> None:
    ch = CollectorLink(f"127.0.0.1:{await free_port()}", ssl.create_default_context())
    refused = await failure(ch)
    assert refused.code == "UNAVAILABLE"
    assert refused.code in RETRYABLE
    assert "cannot reach 127.0.0.1:" in refused.details
    assert "Connection refused" in refused.details


async def free_port() -> int:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    return port


@pytest.mark.parametrize(
    ("target", "expected"),
    [("127.0.0.1:7443", ("127.0.0.1", 7443)), ("[::1]:7443", ("::1", 7443)),
     ("collector.example.net:443", ("collector.example.net", 443))],
)
def test_targets_are_host_and_port(target: str, expected: tuple[str, int]) -> None:
    assert split_target(target) == expected


@pytest.mark.parametrize("target", ["collector", ":7443", "collector:https", "collector:"])
def test_a_target_without_host_and_port_is_refused(target: str) -> None:
    with pytest.raises(ValueError, match="expected host:port"):
        split_target(target)
