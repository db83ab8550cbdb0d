"""The whole path over real mTLS on loopback: spool -> shipper -> collector -> ledger."""

from __future__ import annotations

import random
import socket
import ssl
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

import grpc
import pytest

from agent.shipper import Shipper, ShipperSettings
from agent.spool import Spool
from agent.transport import CollectorLink
from common.ids import new_id
from common.proto import meterd_pb2 as pb
from common.proto import meterd_pb2_grpc as pb_grpc
from common.records import UsageRecord
from common.tls import grpc_channel_credentials
from common.wire import to_proto
from tests.harness import CollectorProcess, collector_config, meterd
from tests.ledger.helpers import T0

EGRESS_PER_GB = Decimal("0.013")
CPU_PER_HOUR = Decimal("0.0125")


def channel(pki: Path, host: str, target: str) -> grpc.aio.Channel:
    creds = grpc_channel_credentials(
        pki / "agents" / f"{host}.pem", pki / "agents" / f"{host}.key", pki / "ca.pem"
    )
    return grpc.aio.secure_channel(target, creds)


def link(pki: Path, host: str, target: str) -> CollectorLink:
    """The agent's own connection to the collector, as ``host``."""
    return CollectorLink.open(
        target, ca=pki / "ca.pem", cert=pki / "agents" / f"{host}.pem",
        key=pki / "agents" / f"{host}.key", server_name="localhost",
    )


def samples(host: str, count: int, seed: int) -> list[UsageRecord]:
    rng = random.Random(seed)
    out = []
    for seq in range(count):
        metric = rng.choice(["net.tx_bytes", "cpu.seconds"])
        quantity = (
            rng.randrange(0, 5 * 10**9) if metric == "net.tx_bytes" else rng.randrange(0, 900)
        )
        out.append(
            UsageRecord(
                id=new_id(),
                host_id=host,
                metric=metric,
                quantity=Decimal(quantity),
                unit="bytes" if metric == "net.tx_bytes" else "seconds",
                start_us=T0 + seq * 10_000_000,
                end_us=T0 + (seq + 1) * 10_000_000,
                seq=seq,
            )
        )
    return out


def by_hand(records: list[UsageRecord]) -> Decimal:
    """The balance a billing clerk computes: total per price, priced, rounded once."""
    gb = sum((r.quantity for r in records if r.metric == "net.tx_bytes"), Decimal(0)) / 10**9
    hours = sum((r.quantity for r in records if r.metric == "cpu.seconds"), Decimal(0)) / 3600
    cent = Decimal("0.01")
    return (gb * EGRESS_PER_GB).quantize(cent, ROUND_HALF_EVEN) + (hours * CPU_PER_HOUR).quantize(
        cent, ROUND_HALF_EVEN
    )


@pytest.fixture
def collector(tmp_path: Path, pki_dir: Path) -> CollectorProcess:
    proc = CollectorProcess(collector_config(tmp_path, pki_dir))
    proc.start()
    yield proc  # type: ignore[misc]
    proc.stop()


async def test_samples_reach_the_ledger_exactly_once(
    collector: CollectorProcess, pki_dir: Path, tmp_path: Path
) -> None:
    records = samples("host-a", 500, seed=7)
    spool = Spool(tmp_path / "spool.db")
    spool.append(records)
    ch = link(pki_dir, "host-a", collector.target)
    try:
        shipper = Shipper(spool, ch, ShipperSettings(batch_max_records=64), "test")
        assert await shipper.drain() == 500
    finally:
        await ch.close()
    assert spool.stats().records == 0
    spool.close()
    report = collector.get("/v1/accounts/acme/usage")
    assert sum(u["records"] for u in report["usage"]) == 500
    for metric in ("net.tx_bytes", "cpu.seconds"):
        expected = sum((r.quantity for r in records if r.metric == metric), Decimal(0))
        got = next(u for u in report["usage"] if u["metric"] == metric)
        assert Decimal(got["quantity"]) == expected
    assert Decimal(report["balance"]["eur"]) == by_hand(records)
    verify = meterd("ledger", "verify", "--config", str(collector.config))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "clean" in verify.stdout


async def test_sending_the_same_batch_again_changes_nothing(
    collector: CollectorProcess, pki_dir: Path
) -> None:
    records = samples("host-a", 50, seed=3)
    request = pb.PushRequest(records=[to_proto(r) for r in records], agent_version="t")
    ch = channel(pki_dir, "host-a", collector.target)
    try:
        stub = pb_grpc.IngestStub(ch)
        first = await stub.Push(request, timeout=10)
        before = collector.get("/v1/accounts/acme/usage")
        second = await stub.Push(request, timeout=10)
    finally:
        await ch.close()
    assert {a.outcome for a in first.acks} == {pb.ACCEPTED}
    assert {a.outcome for a in second.acks} == {pb.DUPLICATE}
    assert collector.get("/v1/accounts/acme/usage") == before


async def test_a_host_cannot_speak_for_another(collector: CollectorProcess, pki_dir: Path) -> None:
    own = samples("host-a", 3, seed=1)
    forged = samples("host-b", 3, seed=2)
    ch = channel(pki_dir, "host-a", collector.target)
    try:
        response = await pb_grpc.IngestStub(ch).Push(
            pb.PushRequest(records=[to_proto(r) for r in own + forged]), timeout=10
        )
    finally:
        await ch.close()
    outcome = {a.id: a for a in response.acks}
    for r in forged:
        assert outcome[r.id].outcome == pb.REJECTED
        assert "certificate is for 'host-a'" in outcome[r.id].reason
    for r in own:
        assert outcome[r.id].outcome == pb.ACCEPTED
    globex = collector.get("/v1/accounts/globex/usage")
    assert globex["usage"] == []
    assert globex["balance"] == {}
    assert sum(u["records"] for u in collector.get("/v1/accounts/acme/usage")["usage"]) == 3


def bad_messages() -> list[pb.UsageRecord]:
    """One record of host-a breaking each rule; :data:`BAD_REASONS` in the same order."""
    return [
        pb.UsageRecord(
            id=new_id(),
            host_id="host-a",
            metric="net.tx_bytes",
            quantity="-5",
            unit="bytes",
            start_us=T0,
            end_us=T0 + 1,
            seq=1,
        ),
        pb.UsageRecord(
            id=new_id(),
            host_id="host-a",
            metric="net.tx_bytes",
            quantity="1" + "0" * 31,
            unit="bytes",
            start_us=T0,
            end_us=T0 + 1,
            seq=2,
        ),
        pb.UsageRecord(
            id=new_id(),
            host_id="host-a",
            metric="net.tx_bytes",
            quantity="NaN",
            unit="bytes",
            start_us=T0,
            end_us=T0 + 1,
            seq=3,
        ),
        pb.UsageRecord(
            id=new_id(),
            host_id="host-a",
            metric="net.tx_bytes",
            quantity="5",
            unit="bytes",
            start_us=T0 + 10,
            end_us=T0,
            seq=4,
        ),
        pb.UsageRecord(
            id="not-a-uuid",
            host_id="host-a",
            metric="net.tx_bytes",
            quantity="5",
            unit="bytes",
            start_us=T0,
            end_us=T0 + 1,
            seq=5,
        ),
        pb.UsageRecord(
            id=new_id(),
            host_id="host-a",
            metric="net.tx_bytes",
            quantity="5",
            unit="bytes",
            start_us=4_000_000_000_000_000,
            end_us=4_000_000_000_000_001,
            seq=6,
        ),
    ]


BAD_REASONS = [
    "negative",
    "more than",
    "not decimal text",
    "before its start",
    "not a UUID",
    "after the collector's clock",
]


def columns_of(messages: list[pb.UsageRecord]) -> pb.RecordColumns:
    """Record messages of one host in column form, whatever they hold, each distinct
    (metric, unit, labels) once in the series table."""
    columns = pb.RecordColumns(host_id=messages[0].host_id)
    table: dict[tuple[str, str, tuple[tuple[str, str], ...]], int] = {}
    for m in messages:
        key = (m.metric, m.unit, tuple(sorted(m.labels.items())))
        if key not in table:
            table[key] = len(table)
            columns.series_table.add(metric=m.metric, unit=m.unit, labels=dict(m.labels))
        columns.series.append(table[key])
        columns.ids.append(m.id)
        columns.quantities.append(m.quantity)
        columns.start_us.append(m.start_us)
        columns.end_us.append(m.end_us)
        columns.seqs.append(m.seq)
    return columns


@pytest.mark.parametrize("form", ["rows", "columns"])
async def test_bad_records_are_rejected_with_reasons_and_the_rest_accepted(
    collector: CollectorProcess, pki_dir: Path, form: str
) -> None:
    good = samples("host-a", 2, seed=4)
    bad = bad_messages()
    reasons = list(BAD_REASONS)
    messages = [*bad, *(to_proto(r) for r in good)]
    if form == "rows":
        request = pb.PushRequest(records=messages)
    else:
        columns = columns_of(messages)
        # One more record in column form only: its series index names no series.
        unknown = pb.UsageRecord(id=new_id(), seq=7)
        columns.ids.append(unknown.id)
        columns.series.append(len(columns.series_table) + 2)
        columns.quantities.append("5")
        columns.start_us.append(T0)
        columns.end_us.append(T0 + 1)
        columns.seqs.append(7)
        bad.append(unknown)
        reasons.append("is not in the batch's series table")
        request = pb.PushRequest(columns=columns)
    ch = channel(pki_dir, "host-a", collector.target)
    try:
        response = await pb_grpc.IngestStub(ch).Push(request, timeout=10)
    finally:
        await ch.close()
    sent = [m.id for m in request.records] if form == "rows" else list(request.columns.ids)
    assert [a.id for a in response.acks] == sent  # one acknowledgement each, in order
    acks = {a.id: a for a in response.acks}
    assert all(acks[m.id].outcome == pb.REJECTED for m in bad)
    for m, expected in zip(bad, reasons, strict=True):
        assert expected in acks[m.id].reason
    assert all(acks[r.id].outcome == pb.ACCEPTED for r in good)
    usage = collector.get("/v1/accounts/acme/usage")["usage"]
    assert sum(u["records"] for u in usage) == 2


async def test_clients_without_a_trusted_certificate_are_refused(
    collector: CollectorProcess, pki_dir: Path, tmp_path: Path
) -> None:
    from common import pki

    other = tmp_path / "other-ca"
    pki.init_ca(other)
    pki.issue_agent(other, "host-a")
    ca = pki_dir / "ca.pem"
    for name, creds in [
        ("no certificate", grpc.ssl_channel_credentials(ca.read_bytes())),
        (
            "another CA",
            grpc_channel_credentials(
                other / "agents" / "host-a.pem", other / "agents" / "host-a.key", ca
            ),
        ),
    ]:
        ch = grpc.aio.secure_channel(collector.target, creds)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.IngestStub(ch).Push(pb.PushRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, name
        finally:
            await ch.close()


def test_only_tls13_is_offered(collector: CollectorProcess, pki_dir: Path) -> None:
    def handshake(version: ssl.TLSVersion) -> str:
        ctx = ssl.create_default_context(cafile=str(pki_dir / "ca.pem"))
        ctx.load_cert_chain(pki_dir / "agents" / "host-a.pem", pki_dir / "agents" / "host-a.key")
        ctx.minimum_version = ctx.maximum_version = version
        ctx.set_alpn_protocols(["h2"])
        with (
            socket.create_connection(("127.0.0.1", collector.grpc_port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            return str(tls.version())

    assert handshake(ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
    with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
        handshake(ssl.TLSVersion.TLSv1_2)


def test_demo_runs_end_to_end() -> None:
    result = meterd("demo", "--seconds", "3", timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cpu.seconds" in result.stdout
    assert "Balance owed:" in result.stdout
