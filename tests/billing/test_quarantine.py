"""Ingest over real mTLS: a record beyond the maximum lateness is quarantined, not
rejected; the agent may delete it; an operator releases it and it is billed once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest

from collector.config import IngestConfig
from collector.fleet import Fleet
from collector.ingest import IngestService
from collector.ledger.verify import verify_ledger
from common.proto import meterd_pb2 as pb
from tests.billing.conftest import World, open_world
from tests.billing.scenario import GB, PRICEBOOK, at, record
from tests.e2e.test_ingest_policy import push
from tests.tlsutil import serve_ingest

NOW = at("2026-06-10T12:00:00+00:00")
DAY_US = 86_400_000_000


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    path = tmp_path / "collector.toml"
    path.write_text(
        f'tariff = "{PRICEBOOK}"\n\n[ledger]\nsqlite_path = "ledger.db"\n\n'
        '[accounts.acme]\ncurrency = "eur"\nprices = ["egress"]\n\n'
        '[[assignments]]\nhost = "host-a"\naccount = "acme"\n'
    )
    opened = await open_world(path)
    try:
        yield opened
    finally:
        await opened.ledger.close()


@pytest.fixture
async def target(world: World, pki_dir: Path) -> AsyncIterator[str]:
    service = IngestService(
        lambda: world.service, IngestConfig(max_lateness_days=30), Fleet(), clock_us=lambda: NOW
    )
    server, port = await serve_ingest(service, pki_dir)
    try:
        yield f"localhost:{port}"
    finally:
        await server.stop(None)


async def test_a_record_beyond_the_maximum_lateness_is_quarantined_then_billed_once(
    world: World, target: str, pki_dir: Path
) -> None:
    stale = record("host-a", "net.tx_bytes", 1500 * GB, NOW - 45 * DAY_US)
    fresh = record("host-a", "net.tx_bytes", 1200 * GB, NOW - 2 * DAY_US)
    answer = await push(pki_dir, "host-a", target, [stale, fresh])
    assert {a.id: a.outcome for a in answer.acks} == {stale.id: pb.ACCEPTED, fresh.id: pb.ACCEPTED}
    [kept] = await world.billing.quarantined()
    assert kept.record == stale
    assert kept.account_id == "acme"
    assert "more than 30 days ago" in kept.reason
    assert await world.receivable("acme") == Decimal("2.00")  # (1200 - 1000) GB * 0.01

    again = await push(pki_dir, "host-a", target, [stale, fresh])
    assert {a.outcome for a in again.acks} == {pb.DUPLICATE}
    released = await world.billing.release(None, NOW + 1, actor="cli:ops")
    assert (released.record_ids, released.accepted) == ((stale.id,), 1)
    assert await world.billing.quarantined() == []
    [history] = await world.billing.quarantined(released=True)
    assert history.released_by == "cli:ops"
    assert await world.receivable("acme") == Decimal("7.00")  # April: (1500 - 1000) GB * 0.01
    third = await push(pki_dir, "host-a", target, [stale])
    assert [a.outcome for a in third.acks] == [pb.DUPLICATE]
    assert await world.receivable("acme") == Decimal("7.00")
    assert (await verify_ledger(list(world.ledger.stores))).ok
