"""Records in column form (``PushRequest.columns``, what the agent sends): the same
records, verdicts and ledger as one message per record; columns that cannot be read
as records refuse the call with nothing written; an agent whose collector does not
read the column form sends rows instead."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from agent.shipper import ROWS_RETRY_US, Shipper, ShipperSettings
from agent.spool import Spool
from common.proto import meterd_pb2 as pb
from common.proto import meterd_pb2_grpc as pb_grpc
from common.wire import column_messages, to_columns, to_proto
from tests.e2e.test_end_to_end import by_hand, channel, link, samples
from tests.harness import CollectorProcess, collector_config
from tests.tlsutil import serve_ingest

Ctx = grpc.aio.ServicerContext[pb.PushRequest, pb.PushResponse]


@pytest.fixture
def collector(tmp_path: Path, pki_dir: Path) -> Iterator[CollectorProcess]:
    proc = CollectorProcess(collector_config(tmp_path, pki_dir))
    proc.start()
    yield proc
    proc.stop()


async def push(pki_dir: Path, target: str, request: pb.PushRequest) -> pb.PushResponse:
    ch = channel(pki_dir, "host-a", target)
    try:
        response: pb.PushResponse = await pb_grpc.IngestStub(ch).Push(request, timeout=10)
        return response
    finally:
        await ch.close()


def test_columns_carry_the_same_records_as_rows() -> None:
    records = samples("host-a", 40, seed=5)
    columns = to_columns(records)
    assert columns is not None
    assert len(columns.series_table) == 2  # two metrics, no labels: each series once
    messages, refused = column_messages(columns)
    assert refused == {}
    assert messages == [to_proto(r) for r in records]
    assert to_columns([*records, *samples("host-b", 1, seed=6)]) is None  # one host only


async def test_the_same_records_in_either_form_are_posted_once(
    collector: CollectorProcess, pki_dir: Path
) -> None:
    records = samples("host-a", 60, seed=8)
    columns = to_columns(records)
    first = await push(pki_dir, collector.target, pb.PushRequest(columns=columns))
    assert [a.id for a in first.acks] == [r.id for r in records]
    assert {a.outcome for a in first.acks} == {pb.ACCEPTED}
    again = pb.PushRequest(records=[to_proto(r) for r in records])
    second = await push(pki_dir, collector.target, again)
    assert {a.outcome for a in second.acks} == {pb.DUPLICATE}
    third = await push(pki_dir, collector.target, pb.PushRequest(columns=columns))
    assert {a.outcome for a in third.acks} == {pb.DUPLICATE}
    report = collector.get("/v1/accounts/acme/usage")
    assert sum(u["records"] for u in report["usage"]) == 60
    assert report["balance"]["eur"] == str(by_hand(records))


async def test_columns_of_another_host_are_rejected_record_by_record(
    collector: CollectorProcess, pki_dir: Path
) -> None:
    forged = to_columns(samples("host-b", 3, seed=2))
    response = await push(pki_dir, collector.target, pb.PushRequest(columns=forged))
    assert [a.outcome for a in response.acks] == [pb.REJECTED] * 3
    assert all("certificate is for 'host-a'" in a.reason for a in response.acks)
    assert collector.get("/v1/accounts/globex/usage")["usage"] == []


async def test_unreadable_columns_refuse_the_call_and_write_nothing(
    collector: CollectorProcess, pki_dir: Path
) -> None:
    records = samples("host-a", 4, seed=9)
    short = to_columns(records)
    assert short is not None
    del short.quantities[-1]
    both = pb.PushRequest(records=[to_proto(records[0])], columns=to_columns(records[1:]))
    for request, reason in [
        (pb.PushRequest(columns=short), "record columns differ in length (ids 4, series 4,"
                                        " quantities 3"),
        (both, "as `records` or as `columns`, not both"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await push(pki_dir, collector.target, request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert reason in (info.value.details() or "")
    assert collector.get("/v1/accounts/acme/usage")["usage"] == []


class RowsOnlyCollector(pb_grpc.IngestServicer):
    """A collector from before the column form: it reads ``records`` alone, until it is
    ``upgraded``."""

    def __init__(self) -> None:
        self.requests: list[pb.PushRequest] = []
        self.upgraded = False

    async def Push(self, request: pb.PushRequest, context: Ctx) -> pb.PushResponse:
        self.requests.append(request)
        ids = list(request.columns.ids) if self.upgraded else [m.id for m in request.records]
        return pb.PushResponse(acks=[pb.RecordAck(id=i, outcome=pb.ACCEPTED) for i in ids])


@pytest.fixture
async def rows_only(pki_dir: Path) -> AsyncIterator[tuple[RowsOnlyCollector, str]]:
    servicer = RowsOnlyCollector()
    server, port = await serve_ingest(servicer, pki_dir)
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def test_an_agent_sends_rows_to_a_collector_that_reads_no_columns(
    rows_only: tuple[RowsOnlyCollector, str], pki_dir: Path, tmp_path: Path
) -> None:
    servicer, target = rows_only
    records = samples("host-a", 30, seed=11)
    spool = Spool(tmp_path / "spool.db")
    spool.append(records)
    ch = link(pki_dir, "host-a", target)
    try:
        shipper = Shipper(spool, ch, ShipperSettings(batch_max_records=10), "test")
        assert await shipper.drain() == 30
    finally:
        await ch.close()
    assert spool.stats().records == 0
    assert spool.stats().dead_letters == 0
    spool.close()
    forms = ["columns" if r.HasField("columns") else "rows" for r in servicer.requests]
    assert forms == ["columns", "rows", "rows", "rows"]  # the first batch went again as rows
    assert servicer.requests[0].columns.ids == [m.id for m in servicer.requests[1].records]
    sent = [m.id for r in servicer.requests[1:] for m in r.records]
    assert sent == [r.id for r in records]


async def test_an_agent_on_rows_tries_columns_again_after_an_hour(
    rows_only: tuple[RowsOnlyCollector, str], pki_dir: Path, tmp_path: Path
) -> None:
    """Rows for an hour after the collector answered no column; then columns again: one
    more unanswered call while the collector is old, and columns for good once it is
    upgraded. No record is lost or sent twice but the unanswered batches."""
    servicer, target = rows_only
    records = samples("host-a", 50, seed=12)
    spool = Spool(tmp_path / "spool.db")
    now = [1_800_000_000_000_000]  # the shipper's clock, µs
    ch = link(pki_dir, "host-a", target)

    async def ship(count: int) -> None:
        spool.append(records[:count])
        del records[:count]
        assert await asyncio.wait_for(shipper.drain(), 30) == count

    try:
        shipper = Shipper(spool, ch, ShipperSettings(batch_max_records=10), "test",
                          clock_us=lambda: now[0])
        await ship(10)  # columns unanswered, then rows
        now[0] += ROWS_RETRY_US - 1
        await ship(10)  # still rows
        now[0] += 1
        await ship(10)  # columns again: still unanswered, rows for another hour
        now[0] += ROWS_RETRY_US
        servicer.upgraded = True
        await ship(20)  # columns, answered: columns from now on
    finally:
        await ch.close()
    assert spool.stats().records == 0
    spool.close()
    forms = ["columns" if r.HasField("columns") else "rows" for r in servicer.requests]
    assert forms == ["columns", "rows", "rows", "columns", "rows", "columns", "columns"]
