"""Operating a collector process: the REST API over TLS 1.3, CloudEvents ingest with the
official SDK, fleet health as an agent goes quiet, /metrics and /readyz."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import grpc
import pytest
from cloudevents.core.bindings.http import to_binary, to_structured
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from prometheus_client.parser import text_string_to_metric_families

from collector.ledger.outbox import AGENT_SILENT
from collector.ledger.sqlite_store import SqliteLedger
from collector.webhooks.state import outbox_after
from common.ids import new_id
from common.proto import meterd_pb2 as pb
from common.proto import meterd_pb2_grpc as pb_grpc
from common.records import UsageRecord
from common.tls import client_ssl_context, grpc_channel_credentials
from common.wire import to_proto
from tests.api.env import api_env, client
from tests.harness import CollectorProcess, collector_config, make_api_token
from tests.ledger.helpers import TARIFF
from tests.pg import Databases

FLEET = """
[fleet]
silent_after_seconds = "1"
persist_interval_seconds = "0.2"
"""
DEDICATED_IP = """
[[prices]]
id = "dedicated-ip"
product = "Dedicated IP"
currency = "eur"
metric = "ip.dedicated_seconds"
unit = "hour"
billing_scheme = "per_unit"
unit_amount_decimal = "0.5"
recurring = { interval = "month", usage_type = "metered", aggregate_usage = "sum" }
"""


@pytest.fixture(scope="module")
def collector(
    tmp_path_factory: pytest.TempPathFactory, pki_dir: Path
) -> Iterator[CollectorProcess]:
    workdir = tmp_path_factory.mktemp("ops")
    path = collector_config(workdir, pki_dir, extra=FLEET)
    text = path.read_text()
    listen = '[api]\nlisten = "127.0.0.1:0"\n'
    assert listen in text
    path.write_text(text.replace(listen, listen + "tls = true\n"))
    (workdir / "tariff.toml").write_text(TARIFF + DEDICATED_IP)
    proc = CollectorProcess(path).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def tokens(collector: CollectorProcess) -> dict[str, str]:
    return {
        "operator": make_api_token(collector.config, role="operator", name="ops"),
        "ingest": make_api_token(collector.config, role=None, scopes=("ingest",), name="crm"),
    }


@pytest.fixture
async def https(pki_dir: Path) -> AsyncIterator[aiohttp.ClientSession]:
    tls = client_ssl_context(pki_dir / "ca.pem")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls)) as session:
        yield session


def url(collector: CollectorProcess, path: str) -> str:
    return f"https://127.0.0.1:{collector.api_port}{path}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def now_us() -> int:
    return time.time_ns() // 1000


# -- REST over TLS 1.3 ---------------------------------------------------------------------


async def test_the_rest_api_is_served_over_tls13_and_refuses_tls12(
    collector: CollectorProcess, pki_dir: Path
) -> None:
    async def healthz_over_tls13() -> None:
        modern = client_ssl_context(pki_dir / "ca.pem")
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", collector.api_port, ssl=modern, server_hostname="localhost"
        )
        assert writer.get_extra_info("ssl_object").version() == "TLSv1.3"
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 200")
        writer.close()

    await healthz_over_tls13()

    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(cafile=pki_dir / "ca.pem")
    old.minimum_version = ssl.TLSVersion.TLSv1_2
    old.maximum_version = ssl.TLSVersion.TLSv1_2

    def handshake() -> None:
        with (
            socket.create_connection(("127.0.0.1", collector.api_port), timeout=10) as raw,
            old.wrap_socket(raw, server_hostname="localhost"),
        ):
            pass

    with pytest.raises(ssl.SSLError):  # the server ends the handshake
        await asyncio.to_thread(handshake)
    await healthz_over_tls13()  # and goes on serving TLS 1.3


# -- CloudEvents -----------------------------------------------------------------------------


def usage_event(event_id: str, **data: Any) -> CloudEvent:
    end = datetime.now(UTC).replace(microsecond=0)
    return CloudEvent(
        attributes={"id": event_id, "source": "/provisioning/ipam", "type": "ip.assigned",
                    "datacontenttype": "application/json"},
        data={
            "account": "globex",
            "metric": "ip.dedicated_seconds",
            "quantity": "3600",
            "unit": "seconds",
            "window": {"start": (end - timedelta(hours=1)).isoformat(), "end": end.isoformat()},
            **data,
        },
    )


async def test_cloudevents_from_the_sdk_are_rated_and_counted_once(
    collector: CollectorProcess, tokens: dict[str, str], https: aiohttp.ClientSession
) -> None:
    ingest = bearer(tokens["ingest"])
    fmt = JSONFormat()

    async def send(headers: dict[str, str], body: bytes, token: dict[str, str] = ingest
                   ) -> tuple[int, Any]:
        async with https.post(url(collector, "/v1/events"), data=body,
                              headers={**headers, **token}) as r:
            return r.status, await r.json(content_type=None)

    first = to_structured(usage_event("ip-1"), fmt)
    assert first.headers["content-type"] == "application/cloudevents+json"
    status, answer = await send(first.headers, first.body)
    assert status == 200, answer
    assert answer["results"][0]["outcome"] == "accepted"
    status, again = await send(first.headers, first.body)
    assert (status, again["results"][0]["outcome"]) == (200, "duplicate")
    assert again["results"][0]["record_id"] == answer["results"][0]["record_id"]

    binary = to_binary(usage_event("ip-2"), fmt)
    assert "ce-id" in binary.headers
    status, answer = await send(binary.headers, binary.body)
    assert (status, answer["accepted"]) == (200, 1)

    long_ago = {"start": "2025-01-01T00:00:00Z", "end": "2025-01-01T01:00:00Z"}
    batch = [json.loads(to_structured(e, fmt).body) for e in (
        usage_event("ip-1"),  # sent before
        usage_event("ip-3"),
        usage_event("ip-4", quantity=1.5),  # a JSON number: refused
        usage_event("ip-3"),  # twice in the batch
        usage_event("ip-5", window=long_ago),  # beyond the maximum lateness
    )]
    batch_type = {"Content-Type": "application/cloudevents-batch+json"}
    status, answer = await send(batch_type, json.dumps(batch).encode())
    assert status == 200
    assert [r["outcome"] for r in answer["results"]] == [
        "duplicate", "accepted", "rejected", "duplicate", "quarantined"]
    assert "decimal text" in answer["results"][2]["error"]
    status, answer = await send(batch_type, json.dumps(batch[-1:]).encode())
    assert [r["outcome"] for r in answer["results"]] == ["duplicate"]

    status, problem = await send(first.headers, first.body, bearer(tokens["operator"]))
    assert (status, problem["type"]) == (403, "https://meterd.dev/problems/forbidden")
    status, problem = await send(first.headers, first.body, {})
    assert status == 401

    async with https.get(url(collector, "/v1/accounts/globex/usage"),
                         headers=bearer(tokens["operator"])) as r:
        account = await r.json()
    (ip,) = [u for u in account["usage"] if u["metric"] == "ip.dedicated_seconds"]
    assert (ip["quantity"], ip["records"]) == ("10800", 3)  # ip-1, ip-2, ip-3: once each
    # Rated by the tariff like agent usage: 3 hours at 0.50 EUR.
    assert Decimal(account["balance"]["eur"]) == Decimal("1.50")


# -- fleet health ---------------------------------------------------------------------------


def channel(pki: Path, host: str, target: str) -> grpc.aio.Channel:
    creds = grpc_channel_credentials(
        pki / "agents" / f"{host}.pem", pki / "agents" / f"{host}.key", pki / "ca.pem"
    )
    return grpc.aio.secure_channel(target, creds)


def sample(host: str, seq: int, *, end_us: int | None = None) -> UsageRecord:
    end = end_us if end_us is not None else now_us() - 1_000_000
    return UsageRecord(id=new_id(), host_id=host, metric="net.tx_bytes",
                       quantity=Decimal(1000), unit="bytes", start_us=end - 10_000_000,
                       end_us=end, seq=seq)


async def push(pki: Path, collector: CollectorProcess, host: str,
               records: list[UsageRecord], **fields: Any) -> pb.PushResponse:
    async with channel(pki, host, collector.target) as ch:
        stub = pb_grpc.IngestStub(ch)  # type: ignore[no-untyped-call]
        request = pb.PushRequest(records=[to_proto(r) for r in records],
                                 agent_version="9.9.9", sent_at_us=now_us(), **fields)
        response: pb.PushResponse = await stub.Push(request, timeout=10)
        return response


async def metric_samples(session: aiohttp.ClientSession, collector: CollectorProcess
                         ) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with session.get(url(collector, "/metrics")) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def silent_events(workdir: Path, host: str) -> list[dict[str, Any]]:
    store = await SqliteLedger.open(workdir / "ledger.db")
    try:
        events = await outbox_after(store, 0, 1000)
    finally:
        await store.close()
    found = [json.loads(e.data) for e in events if e.event_type == AGENT_SILENT]
    return [d for d in found if d["host_id"] == host]


async def until(check: Any, what: str, deadline_s: float = 30) -> Any:
    """Poll ``check`` until it returns something true (a safety deadline, not a timing
    claim: the test fails only if the collector never gets there)."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.1)


async def rounds_after(session: aiohttp.ClientSession, collector: CollectorProcess,
                       more: int) -> None:
    """Wait until the collector completed ``more`` fleet rounds from now."""
    key = ("meterd_fleet_rounds_total", ())
    start = (await metric_samples(session, collector))[key]

    async def done() -> bool:
        return (await metric_samples(session, collector))[key] >= start + more

    await until(done, f"{more} fleet rounds")


async def test_an_agent_that_stops_shipping_goes_silent_once_across_a_restart(
    collector: CollectorProcess, tokens: dict[str, str], https: aiohttp.ClientSession,
    pki_dir: Path,
) -> None:
    response = await push(pki_dir, collector, "host-b", [sample("host-b", 1)],
                          backlog_records=7, dead_letters=2)
    assert [a.outcome for a in response.acks] == [pb.ACCEPTED]
    ops = bearer(tokens["operator"])

    async def agent() -> dict[str, Any]:
        async with https.get(url(collector, "/v1/fleet/agents/host-b"), headers=ops) as r:
            assert r.status == 200
            body: dict[str, Any] = await r.json()
            return body

    seen = await agent()
    assert (seen["version"], seen["backlog_records"], seen["dead_letters"]) == ("9.9.9", 7, 2)
    assert seen["records_accepted"] == 1
    assert seen["certificate"]["days_left"] > 300  # the test CA issues for years
    assert seen["certificate"]["serial"]

    async def silent_and_announced() -> bool:
        return (await agent())["status"] == "silent" and bool(
            await silent_events(collector.workdir, "host-b"))

    await until(silent_and_announced, "host-b silent and announced")
    await rounds_after(https, collector, 3)
    (event,) = await silent_events(collector.workdir, "host-b")
    assert event["last_seen"] == seen["last_seen"].replace("Z", "+00:00")
    assert (await agent())["silent_announced"] is True

    async with https.get(url(collector, "/v1/fleet/agents?status=silent&sort=last_seen"),
                         headers=ops) as r:
        listed = [a["host_id"] for a in (await r.json())["items"]]
    assert "host-b" in listed
    async with https.get(url(collector, "/v1/fleet/summary"), headers=ops) as r:
        summary = await r.json()
    assert summary["by_status"]["silent"] >= 1
    assert summary["thresholds"]["silent_after_seconds"] == "1"

    collector.stop()
    collector.start()
    after = await agent()  # known from the control shard's table
    assert (after["status"], after["silent_announced"], after["dead_letters"]) == (
        "silent", True, 2)
    # Another agent ships to the restarted collector and goes quiet: once that silence
    # is announced, the collector is past its start-up grace and checking every round.
    announced_a = len(await silent_events(collector.workdir, "host-a"))
    await push(pki_dir, collector, "host-a", [sample("host-a", 100)])

    async def host_a_announced() -> bool:
        return len(await silent_events(collector.workdir, "host-a")) > announced_a

    await until(host_a_announced, "host-a silent and announced after the restart")
    await rounds_after(https, collector, 2)
    assert len(await silent_events(collector.workdir, "host-b")) == 1


# -- /metrics and /readyz --------------------------------------------------------------------


async def test_metrics_parse_with_the_prometheus_parser(
    collector: CollectorProcess, https: aiohttp.ClientSession, pki_dir: Path
) -> None:
    before = await metric_samples(https, collector)
    batch = [sample("host-a", 1), sample("host-a", 2), sample("host-b", 3),  # wrong host
             sample("host-a", 4, end_us=now_us() + 3_600_000_000)]  # an hour ahead
    first = await push(pki_dir, collector, "host-a", batch)
    assert [a.outcome for a in first.acks] == [pb.ACCEPTED, pb.ACCEPTED, pb.REJECTED,
                                               pb.REJECTED]
    await push(pki_dir, collector, "host-a", batch[:2])  # sent again: duplicates
    after = await metric_samples(https, collector)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    total = "meterd_ingest_records_total"
    assert delta(total, source="grpc", outcome="accepted") == 2
    assert delta(total, source="grpc", outcome="duplicate") == 2
    assert delta(total, source="grpc", outcome="rejected") == 2
    assert delta("meterd_ingest_rejects_total", source="grpc", reason="wrong_host") == 1
    assert delta("meterd_ingest_rejects_total", source="grpc", reason="future") == 1
    assert delta("meterd_ingest_calls_total", code="OK") == 2
    assert delta("meterd_ingest_ack_latency_seconds_count") == 2
    shard = f"sqlite:{collector.workdir / 'ledger.db'}"
    assert delta("meterd_ledger_transaction_seconds_count", shard=shard, outcome="commit") >= 2
    # Each call posted in a transaction of its own (nothing else was posting).
    assert delta("meterd_ingest_transaction_calls_count", shard=shard) == 2
    assert delta("meterd_ingest_transaction_calls_sum", shard=shard) == 2
    assert delta("meterd_ingest_transaction_calls_bucket", shard=shard, le="1.0") == 2
    statuses = {dict(labels)["status"]: value for (name, labels), value in after.items()
                if name == "meterd_fleet_agents"}
    assert set(statuses) == {"healthy", "lagging", "silent", "skewed", "expiring"}
    assert sum(statuses.values()) >= 1
    assert ("meterd_outbox_lag_seconds", (("shard", shard),)) in after
    assert after[("meterd_webhook_pending_deliveries", ())] == 0


async def test_readyz_answers_ready_when_every_shard_answers(
    collector: CollectorProcess, https: aiohttp.ClientSession
) -> None:
    async with https.get(url(collector, "/readyz")) as r:
        assert r.status == 200
        body = await r.json()
    assert body["status"] == "ready"
    assert [s["ready"] for s in body["shards"]] == [True]


async def test_readyz_goes_unready_when_a_postgresql_shard_is_dropped(
    tmp_path: Path, pki_dir: Path, pg_server: str
) -> None:
    databases = Databases(pg_server)
    dsns = [await databases.create(), await databases.create()]
    ledger = (
        f'[[ledger.shards]]\ndsn = "{dsns[0]}"\nslots = ["0-511"]\n\n'
        f'[[ledger.shards]]\ndsn = "{dsns[1]}"\nslots = ["512-1023"]\n'
    )
    try:
        async with api_env(tmp_path, pki_dir, ledger=ledger, seed=False) as env, \
                client(env) as c:
            r = await c.get("/readyz")
            assert r.status == 200
            admin = await asyncpg.connect(pg_server)
            try:  # the second shard's database is gone
                await admin.execute(f'DROP DATABASE "{databases.created[1]}" WITH (FORCE)')
            finally:
                await admin.close()
            r = await c.get("/readyz")
            assert r.status == 503
            assert r.content_type == "application/problem+json"
            problem = await r.json()
            assert problem["type"] == "https://meterd.dev/problems/not-ready"
            assert problem["detail"] == "1 of 2 ledger shards do not answer"
            assert [e.split(":")[0] for e in problem["errors"]] == ["shard1"]
    finally:
        await databases.drop_all()
