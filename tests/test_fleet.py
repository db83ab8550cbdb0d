"""Fleet health: statuses, the merge rule of the control shard's fleet table, and the
agent.silent event (once per silence, across restarts and two collectors)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest

from collector.config import FleetConfig
from collector.fleet import DAY_US, SECOND_US, Fleet, Status, Thresholds, conditions, merge
from collector.ledger.outbox import AGENT_SILENT, OutboxEvent
from collector.ledger.postgres_store import PostgresLedger
from collector.ledger.sqlite_store import SqliteLedger
from collector.ledger.store import AgentFacts, LedgerStore
from collector.webhooks.state import outbox_after
from tests.ledger.helpers import T0
from tests.pg import Databases

CONFIG = FleetConfig(
    silent_after_seconds=Decimal(60),
    lagging_backlog_records=1000,
    skew_tolerance_seconds=Decimal(2),
    expiring_within_days=14,
    persist_interval_seconds=Decimal(5),
)
LIMITS = Thresholds.of(CONFIG)


def facts(**kw: object) -> AgentFacts:
    base = AgentFacts("web-1", first_seen_us=T0, last_seen_us=T0, cert_expiry_us=T0 + 365 * DAY_US)
    return replace(base, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "now_offset", "expected"),
    [
        ({}, 0, ()),
        ({}, 60 * SECOND_US, (Status.SILENT,)),
        ({}, 59 * SECOND_US, ()),
        ({"backlog_records": 1000}, 0, (Status.LAGGING,)),
        ({"backlog_records": 999}, 0, ()),
        ({"clock_skew_us": -2 * SECOND_US - 1}, 0, (Status.SKEWED,)),
        ({"clock_skew_us": 2 * SECOND_US}, 0, ()),
        ({"cert_expiry_us": T0 + 14 * DAY_US}, 0, (Status.EXPIRING,)),
        ({"cert_expiry_us": T0 - 1}, 0, (Status.EXPIRING,)),
        ({"cert_expiry_us": 0}, 0, ()),  # unknown expiry: not expiring
        (
            {"backlog_records": 5000, "clock_skew_us": 9 * SECOND_US,
             "cert_expiry_us": T0 + DAY_US},
            61 * SECOND_US,
            (Status.SILENT, Status.EXPIRING, Status.SKEWED, Status.LAGGING),
        ),
    ],
)
def test_conditions_follow_the_thresholds_most_urgent_first(
    changes: dict[str, int], now_offset: int, expected: tuple[Status, ...]
) -> None:
    assert conditions(facts(**changes), LIMITS, T0 + now_offset) == expected


def test_a_fleet_view_gives_each_agent_its_most_urgent_status() -> None:
    fleet = Fleet(lambda: CONFIG, clock_us=lambda: T0)
    fleet.seen("a", now_us=T0, version="1", backlog=5000, skew_us=9 * SECOND_US, accepted=1,
               rejected=0, last_seq=1, serial=1, cert_expiry_us=T0 + 365 * DAY_US)
    fleet.seen("b", now_us=T0, version="1", backlog=0, skew_us=0, accepted=1, rejected=0,
               last_seq=1, serial=2, cert_expiry_us=T0 + 365 * DAY_US)
    view = {a.facts.host_id: a for a in fleet.view()}
    assert view["a"].status is Status.SKEWED
    assert view["a"].conditions == (Status.SKEWED, Status.LAGGING)
    assert view["b"].status is Status.HEALTHY
    assert fleet.by_status() == {"silent": 0, "expiring": 0, "skewed": 1, "lagging": 0,
                                 "healthy": 1}


# -- the control shard ------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "pg"])
async def control(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[LedgerStore]:
    if request.param == "sqlite":
        store: LedgerStore = await SqliteLedger.open(tmp_path / "ledger.db")
        yield store
        await store.close()
        return
    databases = Databases(request.getfixturevalue("pg_server"))
    pg = await PostgresLedger.open(await databases.create())
    try:
        yield pg
    finally:
        await pg.close()
        await databases.drop_all()


async def test_the_stores_merge_sightings_by_the_rule_the_fleet_applies(
    control: LedgerStore,
) -> None:
    first = facts(host_id="web-1", first_seen_us=T0, last_seen_us=T0 + 10, version="1.0",
                  backlog_records=7, dead_letters=None, records_accepted=5, records_rejected=1,
                  last_seq=50, cert_serial="1F")
    # An older sighting written later (the other collector's round came second).
    older = facts(host_id="web-1", first_seen_us=T0 - 100, last_seen_us=T0 + 5, version="0.9",
                  backlog_records=900, dead_letters=3, records_accepted=2, records_rejected=4,
                  last_seq=40, cert_serial="0A")
    newer = facts(host_id="web-1", first_seen_us=T0 + 20, last_seen_us=T0 + 30, version="1.1",
                  backlog_records=0, dead_letters=2, records_accepted=1, records_rejected=0,
                  last_seq=60, cert_serial="1F")
    expected = None
    for update in (first, older, newer):
        async with control.transaction() as tx:
            await tx.upsert_fleet_agents([update])
        expected = merge(expected, update)
    (row,) = await control.fleet_agents()
    assert row == expected
    assert (row.first_seen_us, row.last_seen_us, row.version, row.backlog_records) == (
        T0 - 100, T0 + 30, "1.1", 0)
    assert (row.records_accepted, row.records_rejected, row.last_seq, row.dead_letters) == (
        8, 5, 60, 2)


def _silent_events(events: list[OutboxEvent]) -> list[OutboxEvent]:
    return [e for e in events if e.event_type == AGENT_SILENT]


async def test_an_agent_that_stops_shipping_goes_silent_and_is_announced_once(
    control: LedgerStore,
) -> None:
    now = [T0]
    fleet = Fleet(lambda: CONFIG, clock_us=lambda: now[0])

    def ship() -> None:
        fleet.seen("web-1", now_us=now[0], version="1.0", backlog=3, skew_us=100, accepted=10,
                   rejected=1, last_seq=10, serial=0x1F, cert_expiry_us=T0 + 365 * DAY_US,
                   dead_letters=1)

    ship()
    assert await fleet.persist(control) == []
    assert [a.status for a in fleet.view()] == [Status.HEALTHY]

    now[0] += 61 * SECOND_US  # the agent stopped shipping
    assert [a.status for a in fleet.view()] == [Status.SILENT]
    assert await fleet.persist(control) == ["web-1"]
    assert await fleet.persist(control) == []  # announced once, not every round

    restarted = Fleet(lambda: CONFIG, clock_us=lambda: now[0])  # a collector restart
    await restarted.load(control)
    (agent,) = restarted.view()
    assert agent.status is Status.SILENT
    assert agent.facts.records_accepted == 10
    assert agent.facts.dead_letters == 1
    assert await restarted.persist(control) == []

    events = _silent_events(await outbox_after(control, 0, 100))
    assert len(events) == 1
    assert json.loads(events[0].data)["host_id"] == "web-1"

    # It ships again (to the restarted collector): healthy; quiet again: announced again.
    fleet = restarted
    ship()
    assert [a.status for a in fleet.view()] == [Status.HEALTHY]
    assert await fleet.persist(control) == []
    now[0] += 61 * SECOND_US
    assert await fleet.persist(control) == ["web-1"]
    assert len(_silent_events(await outbox_after(control, 0, 100))) == 2
    (row,) = await control.fleet_agents()
    assert row.records_accepted == 20  # each sighting's counts written exactly once


async def test_a_restarted_collector_gives_agents_time_to_reconnect_before_announcing(
    control: LedgerStore,
) -> None:
    now = [T0]
    before = Fleet(lambda: CONFIG, clock_us=lambda: now[0])
    before.seen("web-1", now_us=now[0], version="1.0", backlog=0, skew_us=0, accepted=1,
                rejected=0, last_seq=1, serial=1)
    await before.persist(control)
    now[0] += 3600 * SECOND_US  # every collector was down for an hour
    restarted = Fleet(lambda: CONFIG, clock_us=lambda: now[0])
    assert await restarted.persist(control) == []
    assert [a.status for a in restarted.view()] == [Status.SILENT]  # the fact stands
    now[0] += 61 * SECOND_US  # up for silent_after, and the agent has not come back
    assert await restarted.persist(control) == ["web-1"]


async def test_two_collectors_share_the_fleet_and_announce_a_silence_once(
    pg_databases: Databases,
) -> None:
    dsn = await pg_databases.create()
    one, two = await PostgresLedger.open(dsn), await PostgresLedger.open(dsn)
    try:
        now = [T0]
        first = Fleet(lambda: CONFIG, clock_us=lambda: now[0])
        second = Fleet(lambda: CONFIG, clock_us=lambda: now[0])
        # The agent shipped to the first collector, then (after a reconnect) the second.
        first.seen("web-1", now_us=now[0], version="1.0", backlog=0, skew_us=0, accepted=4,
                   rejected=0, last_seq=4, serial=1)
        await first.persist(one)
        now[0] += 1
        second.seen("web-1", now_us=now[0], version="1.1", backlog=0, skew_us=0, accepted=6,
                    rejected=0, last_seq=10, serial=1)
        await second.persist(two)
        await first.persist(one)
        for fleet in (first, second):
            (agent,) = fleet.view()
            assert (agent.facts.version, agent.facts.records_accepted) == ("1.1", 10)

        now[0] += 61 * SECOND_US
        announced = await asyncio.gather(first.persist(one), second.persist(two))
        assert sorted(announced) == [[], ["web-1"]]
        assert len(_silent_events(await outbox_after(one, 0, 100))) == 1
    finally:
        await one.close()
        await two.close()
