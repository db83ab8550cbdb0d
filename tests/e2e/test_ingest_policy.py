"""Ingest policy: deny-listed certificates, back-pressure, clock skew."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest

from collector.config import IngestConfig
from collector.fleet import Fleet
from collector.ingest import IngestService
from collector.ledger.service import Outcome
from collector.ledger.store import SeqMarks
from common.pki import certificate_serial
from common.proto import meterd_pb2 as pb
from common.proto import meterd_pb2_grpc as pb_grpc
from common.records import UsageRecord
from common.wire import to_proto
from tests.e2e.test_end_to_end import channel, samples
from tests.harness import CollectorProcess, collector_config
from tests.tlsutil import serve_ingest


async def push(
    pki: Path, host: str, target: str, records: Sequence[UsageRecord]
) -> pb.PushResponse:
    ch = channel(pki, host, target)
    try:
        stub = pb_grpc.IngestStub(ch)
        return await stub.Push(pb.PushRequest(records=[to_proto(r) for r in records]), timeout=10)
    finally:
        await ch.close()


async def test_a_denied_serial_is_shut_out_after_sighup(tmp_path: Path, pki_dir: Path) -> None:
    config = collector_config(tmp_path, pki_dir)
    with CollectorProcess(config) as collector:
        assert (await push(pki_dir, "host-a", collector.target, samples("host-a", 2, 1))).acks
        serial = certificate_serial((pki_dir / "agents" / "host-a.pem").read_bytes())
        text = config.read_text().replace("[tls]\n", f'[tls]\ndenied_serials = ["{serial:X}"]\n', 1)
        config.write_text(text)
        assert collector.proc is not None
        collector.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        refused: grpc.aio.AioRpcError | None = None
        accepted_before_reload = 0
        while refused is None:
            try:
                await push(pki_dir, "host-a", collector.target, samples("host-a", 1, 2))
                accepted_before_reload += 1
            except grpc.aio.AioRpcError as exc:
                refused = exc
            assert time.monotonic() < deadline, "deny list not applied after SIGHUP"
            await asyncio.sleep(0.1)
        assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
        assert f"{serial:x}" in (refused.details() or "")
        other = await push(pki_dir, "host-b", collector.target, samples("host-b", 2, 3))
        assert {a.outcome for a in other.acks} == {pb.ACCEPTED}
        usage = collector.get("/v1/accounts/acme/usage")["usage"]
        assert sum(u["records"] for u in usage) == 2 + accepted_before_reload


class BlockingLedger:
    """A ledger service that holds every call until released: work stays in flight."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.entered = asyncio.Event()

    async def post(
        self, records: Sequence[UsageRecord], now_us: int, marks: SeqMarks | None = None
    ) -> dict[str, Outcome]:
        self.entered.set()
        await self.release.wait()
        return {r.id: Outcome.ACCEPTED for r in records}


async def test_back_pressure_answers_resource_exhausted_with_a_delay(pki_dir: Path) -> None:
    ledger = BlockingLedger()
    config = IngestConfig(max_in_flight_records=8, retry_after_ms=1500)
    service = IngestService(lambda: ledger, config, Fleet())  # type: ignore[arg-type, return-value]
    server, port = await serve_ingest(service, pki_dir)
    target = f"localhost:{port}"
    try:
        first = asyncio.create_task(push(pki_dir, "host-a", target, samples("host-a", 5, 1)))
        await asyncio.wait_for(ledger.entered.wait(), 10)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await push(pki_dir, "host-a", target, samples("host-a", 5, 2))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ("retry-after-ms", "1500") in tuple(info.value.trailing_metadata() or ())
        ledger.release.set()
        assert {a.outcome for a in (await first).acks} == {pb.ACCEPTED}
        again = await push(pki_dir, "host-a", target, samples("host-a", 5, 2))
        assert {a.outcome for a in again.acks} == {pb.ACCEPTED}
    finally:
        await server.stop(None)


async def test_clock_skew_is_measured_and_returned(
    collector_proc: CollectorProcess, pki_dir: Path
) -> None:
    ch = channel(pki_dir, "host-a", collector_proc.target)
    try:
        stub = pb_grpc.IngestStub(ch)
        an_hour_behind = time.time_ns() // 1000 - 3_600_000_000
        response = await stub.Push(
            pb.PushRequest(
                records=[to_proto(r) for r in samples("host-a", 1, 9)],
                sent_at_us=an_hour_behind,
                agent_version="9.9",
            ),
            timeout=10,
        )
    finally:
        await ch.close()
    assert abs(response.clock_skew_us - 3_600_000_000) < 60_000_000
    hosts = {h["host_id"]: h for h in collector_proc.get("/v1/hosts")["hosts"]}
    assert abs(hosts["host-a"]["clock_skew_ms"] - 3_600_000) < 60_000
    assert hosts["host-a"]["version"] == "9.9"


@pytest.fixture
def collector_proc(tmp_path: Path, pki_dir: Path) -> CollectorProcess:
    proc = CollectorProcess(collector_config(tmp_path, pki_dir)).start()
    yield proc  # type: ignore[misc]
    proc.stop()
