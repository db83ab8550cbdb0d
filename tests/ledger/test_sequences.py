"""Sequence gaps: usage that never arrived is told apart from zero usage.

The range algebra and the hole history are pure; the bookkeeping runs on the embedded
SQLite file, one PostgreSQL shard and four, and with two collectors on one database.
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from collector.ledger.postgres_store import PostgresLedger
from collector.ledger.service import LedgerService, Outcome
from collector.ledger.store import LedgerStore, SeqHole, merge_seq_ranges, seq_holes_of
from collector.routing import Assignment
from collector.sequences import (
    Sequences,
    check_epoch,
    ranges_of,
    reconcile_holes,
    seq_marks,
    watermark,
)
from common.records import UsageRecord
from tests.ledger.helpers import T0, open_stores, record, router, service
from tests.pg import Databases

GRACE_S = 600
GRACE_US = GRACE_S * 1_000_000


# -- the range algebra ------------------------------------------------------------------------


@given(st.sets(st.integers(0, 200)), st.sets(st.integers(0, 200)))
def test_merged_ranges_hold_exactly_the_union(a: set[int], b: set[int]) -> None:
    merged = merge_seq_ranges(ranges_of(a), ranges_of(b))
    assert {s for lo, hi in merged for s in range(lo, hi)} == a | b
    assert all(hi < lo2 for (_, hi), (lo2, _) in itertools.pairwise(merged))


@given(st.sets(st.integers(0, 200), min_size=1), st.integers(0, 50))
def test_holes_are_what_is_missing_below_the_highest_seq(seen: set[int], start: int) -> None:
    ranges = ranges_of(s for s in seen if s >= start) or [(start, start + 1)]
    top = ranges[-1][1]
    accounted = {s for lo, hi in ranges for s in range(lo, hi)}
    holes = seq_holes_of(ranges, start)
    assert {s for lo, hi in holes for s in range(lo, hi)} == set(range(start, top)) - accounted
    mark = watermark(ranges, start)
    assert set(range(start, mark)) <= accounted
    assert mark not in accounted


def test_marks_take_answered_seqs_and_retired_ranges_and_skip_below_the_start() -> None:
    marks = seq_marks("h", "e", 10, [3, 10, 11, 15], [(12, 14), (0, 4), (20, 20)], T0)
    assert marks.ranges == [(10, 16), (20, 21)]
    assert seq_marks("h", "", None, [], [], T0).ranges == []
    # A range's end is a signed 64-bit integer too: the largest seq is not tracked.
    top = seq_marks("h", "e", 0, [2**63 - 2, 2**63 - 1], [(2**63 - 3, 2**64 - 1)], T0)
    assert top.ranges == [(2**63 - 3, 2**63 - 1)]


def test_bad_epoch_metadata_is_named() -> None:
    assert check_epoch("x" * 65, None, []).startswith("seq_epoch must be")
    assert "ends before it starts" in check_epoch("e", 0, [(5, 4)])
    assert check_epoch("0190a7c2-7d40-7b3e-9c6a-1234567890ab", 0, [(1, 1)]) == ""


def test_a_hole_becomes_a_gap_once_after_the_grace_and_closes_when_filled() -> None:
    def hole(lo: int, hi: int, now: int) -> SeqHole:
        return SeqHole("h", "e", lo, hi, now, None)

    first = reconcile_holes([hole(5, 9, T0)], [], T0, GRACE_US)
    assert first.detected == []
    assert first.holes == [hole(5, 9, T0)]
    # Shrunk and split, it keeps the time it was first seen.
    later = T0 + GRACE_US - 1
    second = reconcile_holes([hole(5, 6, later), hole(7, 9, later)], first.holes, later, GRACE_US)
    assert [h.since_us for h in second.holes] == [T0, T0]
    assert second.detected == []
    due = T0 + GRACE_US
    third = reconcile_holes([hole(5, 6, due), hole(7, 9, due)], second.holes, due, GRACE_US)
    assert [(h.lo, h.detected_us) for h in third.detected] == [(5, due), (7, due)]
    fourth = reconcile_holes([hole(7, 9, due + 1)], third.holes, due + 1, GRACE_US)
    assert fourth.detected == []  # reported once
    assert [(h.lo, h.hi) for h in fourth.closed] == [(5, 6)]


# -- on every store ---------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "pg"])
async def stores(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[list[LedgerStore]]:
    databases: Databases | None = None
    if request.param != "sqlite":
        databases = Databases(request.getfixturevalue("pg_server"))
    if request.param == "pg2":
        assert databases is not None
        opened: list[LedgerStore] = [
            await PostgresLedger.open(await databases.create(), name=f"shard{i}") for i in range(2)
        ]
    else:
        opened = await open_stores(request.param, tmp_path, databases)
    try:
        yield opened
    finally:
        for s in opened:
            await s.close()
        if databases is not None:
            await databases.drop_all()


async def post(
    svc: LedgerService,
    host: str,
    epoch: str,
    seqs: list[int],
    *,
    retired: tuple[int, int] | None = None,
    rejected: tuple[int, ...] = (),
    at: int = T0,
) -> dict[str, Outcome]:
    """Post one record per seq (as one ingest call does) with its marks."""
    records = [record(host, quantity="1000", seq=s) for s in seqs]
    marks = seq_marks(host, epoch, 0, [*seqs, *rejected], [retired] if retired else [], at)
    return await svc.post(records, at, marks)


# On two shards host-c's seqs live on another shard than its account's records, so they
# are written in a transaction of their own after the records' commit.
@pytest.mark.parametrize("stores", ["sqlite", "pg", "pg2"], indirect=True)
async def test_every_outcome_and_retired_seqs_account_for_their_seqs(
    stores: list[LedgerStore],
) -> None:
    svc = service(stores, router(Assignment("host-c", "acme")))
    sequences = Sequences(svc.ledger, GRACE_S)
    await post(svc, "host-c", "e1", [0, 1, 2])
    await post(svc, "host-c", "e1", [0, 1, 2])  # duplicates
    await post(svc, "host-c", "e1", [5], rejected=(3,), retired=(6, 9))
    await post(svc, "host-z", "e9", [0, 1])  # unassigned: held
    await post(svc, "host-c", "e1", [10])
    [c, z] = await sequences.hosts()
    assert (c.host_id, c.watermark, c.highest, c.missing) == ("host-c", 4, 10, 1)
    assert (z.host_id, z.watermark, z.highest, z.missing) == ("host-z", 2, 1, 0)
    assert await sequences.check(T0) == []
    assert await sequences.check(T0 + GRACE_US - 1) == []
    [gap] = await sequences.check(T0 + GRACE_US)
    assert (gap.host_id, gap.epoch, gap.first, gap.last, gap.since_us) == ("host-c", "e1", 4, 4, T0)
    assert await sequences.check(T0 + GRACE_US + 1) == []  # logged and returned once
    assert await sequences.gaps() == [gap]
    assert [h.gaps for h in await sequences.hosts("host-c")] == [(gap,)]
    # The record arrives after all: the gap closes.
    await post(svc, "host-c", "e1", [4])
    assert await sequences.check(T0 + GRACE_US + 2) == []
    assert await sequences.gaps() == []
    assert (await sequences.hosts("host-c"))[0].watermark == 11


async def test_a_lost_spool_starts_a_new_epoch_not_a_gap_or_duplicates(
    stores: list[LedgerStore],
) -> None:
    svc = service(stores)
    sequences = Sequences(svc.ledger, 0)
    await post(svc, "host-a", "old", [0, 1, 2, 4])  # 3 was in the spool that was lost
    outcomes = await post(svc, "host-a", "new", [0, 1, 2])
    assert set(outcomes.values()) == {Outcome.ACCEPTED}
    gaps = await sequences.check(T0)
    assert [(g.epoch, g.first, g.last) for g in gaps] == [("old", 3, 3)]
    views = {h.epoch: h for h in await sequences.hosts("host-a")}
    assert views["new"].missing == 0
    assert views["new"].watermark == 3


async def test_seqs_outlive_the_store_and_combine_across_collectors(
    pg_databases: Databases,
) -> None:
    """Two collectors on one shard mark interleaved seqs of one host at the same time;
    a third opened afterwards (a restart) sees every one of them."""
    dsn = await pg_databases.create()
    first = await PostgresLedger.open(dsn, name="c1")
    second = await PostgresLedger.open(dsn, name="c2")
    try:
        one, two = service([first]), service([second])
        await asyncio.gather(*(
            post(one if n % 2 else two, "host-a", "e", list(range(n * 10, n * 10 + 10)))
            for n in range(20)
        ))
    finally:
        await first.close()
        await second.close()
    again = await PostgresLedger.open(dsn, name="c3")
    try:
        sequences = Sequences(service([again]).ledger, 0)
        [view] = await sequences.hosts()
        assert (view.watermark, view.highest, view.missing) == (200, 199, 0)
        assert await sequences.check(T0) == []
    finally:
        await again.close()


async def test_seqs_are_not_marked_when_their_transaction_fails(tmp_path: Path) -> None:
    [store] = await open_stores("sqlite", tmp_path, None)
    try:
        svc = service([store])
        await post(svc, "host-a", "e", [0])
        with sqlite3.connect(store.path) as conn:  # the next record insert fails
            conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON records"
                         " BEGIN SELECT RAISE(ABORT, 'refused'); END")
        with pytest.raises(sqlite3.IntegrityError, match="refused"):
            await post(svc, "host-a", "e", [1, 2])
        [view] = await Sequences(svc.ledger, 0).hosts()
        assert view.highest == 0
    finally:
        await store.close()


@pytest.mark.parametrize("stores", ["sqlite", "pg"], indirect=True)
async def test_the_largest_seqs_are_stored_and_tracked_up_to_what_a_range_can_hold(
    stores: list[LedgerStore],
) -> None:
    svc = service(stores, router(Assignment("host-c", "acme")))
    top = 2**63 - 1
    outcomes = await post(svc, "host-c", "e1", [top - 1, top])
    assert set(outcomes.values()) == {Outcome.ACCEPTED}
    [c] = await Sequences(svc.ledger, GRACE_S).hosts()
    assert c.highest == top - 1


# A host whose VMs belong to two customers, and a third VM nobody holds yet: one batch of
# it posts two journal entries and holds records.
VMS = router(Assignment("host-v", "acme", cgroup="vm1"), Assignment("host-v", "globex",
                                                                     cgroup="vm2"))


def vm_records(seqs: list[int], *vms: str) -> list[UsageRecord]:
    return [record("host-v", quantity="1000", seq=s, cgroup=vms[s % len(vms)]) for s in seqs]


@pytest.mark.parametrize("stores", ["sqlite", "pg"], indirect=True)
async def test_an_epoch_is_new_once_whichever_statement_writes_its_seqs(
    stores: list[LedgerStore],
) -> None:
    """PostgreSQL writes an ingest call's seqs with its last journal entry, or on their
    own when it holds records or posts no entry: each way, every seq is tracked and the
    epoch's first call, only, is told it began an epoch."""
    svc = service(stores, VMS)

    async def call(epoch: str, records: list[UsageRecord]) -> tuple[set[Outcome], bool]:
        marks = seq_marks("host-v", epoch, 0, [r.seq for r in records], [], T0)
        outcomes = await svc.post(records, T0, marks)
        return set(outcomes.values()), marks.new_epoch

    two_accounts = vm_records([0, 1, 2, 3], "vm1", "vm2")
    assert await call("entries", two_accounts) == ({Outcome.ACCEPTED}, True)
    assert await call("entries", vm_records([4, 5], "vm1", "vm2")) == ({Outcome.ACCEPTED}, False)
    with_held = vm_records([0, 1, 2], "vm1", "vm2", "vm3")
    assert await call("held", with_held) == ({Outcome.ACCEPTED, Outcome.HELD}, True)
    assert await call("held", vm_records([3], "vm3")) == ({Outcome.HELD}, False)
    # Only records already posted: no entry, the seqs written on their own.
    assert await call("resent", two_accounts) == ({Outcome.DUPLICATE}, True)
    assert await call("resent", two_accounts[:1]) == ({Outcome.DUPLICATE}, False)
    views = {v.epoch: v for v in await Sequences(svc.ledger, 0).hosts("host-v")}
    assert {e: (v.watermark, v.missing) for e, v in views.items()} == {
        "entries": (6, 0), "held": (4, 0), "resent": (4, 0),
    }


async def test_two_collectors_posting_one_hosts_entries_and_held_records_never_deadlock(
    pg_databases: Databases,
) -> None:
    """One host's calls through two collectors on one shard at once, as when an agent
    resends: every call through both, and beside each call that holds records another
    with only those. Calls post entries of one or two accounts, some hold records.
    PostgreSQL finds no deadlock (the seq track is every transaction's last lock),
    every seq is tracked and every record is posted or held once."""
    dsn = await pg_databases.create()
    first = await PostgresLedger.open(dsn, name="c1")
    second = await PostgresLedger.open(dsn, name="c2")
    kinds = [("vm1", "vm2", "vm3"), ("vm2", "vm3"), ("vm2", "vm1"), ("vm3",)]
    try:
        one, two = service([first], VMS), service([second], VMS)

        async def call(svc: LedgerService, records: list[UsageRecord]) -> None:
            marks = seq_marks("host-v", "e", 0, [r.seq for r in records], [], T0)
            await svc.post(records, T0, marks)

        calls = []
        for n in range(24):
            records = vm_records(list(range(n * 6, n * 6 + 6)), *kinds[n % len(kinds)])
            held = [r for r in records if r.labels["cgroup"] == "vm3"]
            calls += [call(one, records), call(two, records)]
            if held and len(held) < len(records):
                calls.append(call(one if n % 2 else two, held))
        await asyncio.gather(*calls)
        [view] = await Sequences(one.ledger, 0).hosts("host-v")
        assert (view.watermark, view.missing) == (144, 0)
        held_ids = {r.id for r in await first.held("host-v")}
        assert len(held_ids) == sum(
            sum(1 for s in range(6) if kinds[n % 4][s % len(kinds[n % 4])] == "vm3")
            for n in range(24)
        )
        totals = {u.metric: u.records for u in await first.usage("acme")}
        totals_globex = {u.metric: u.records for u in await first.usage("globex")}
        assert totals["net.tx_bytes"] + totals_globex["net.tx_bytes"] + len(held_ids) == 144
    finally:
        await first.close()
        await second.close()


async def test_a_call_that_holds_records_locks_its_hosts_seqs_after_them(
    pg_databases: Databases,
) -> None:
    """A call that posts entries and holds a record, while another collector holds that
    record in a transaction that goes on to write the host's seqs: the call waits for
    the record without the host's seq track (written after the held records), so both
    commit and PostgreSQL finds no deadlock."""
    dsn = await pg_databases.create()
    first = await PostgresLedger.open(dsn, name="c1")
    second = await PostgresLedger.open(dsn, name="c2")
    probe = await asyncpg.connect(dsn)
    try:
        svc = service([first], VMS)
        records = vm_records([0, 1, 2], "vm1", "vm2", "vm3")  # acme's, globex's, held
        unassigned = records[2]
        held, release = asyncio.Event(), asyncio.Event()

        async def other_collector() -> None:
            async with second.transaction() as tx:
                await tx.hold([unassigned], T0)
                held.set()
                await release.wait()
                await tx.account_seqs(seq_marks("host-v", "e", 0, [2], [], T0))

        other = asyncio.create_task(other_collector())
        await asyncio.wait_for(held.wait(), 10)
        marks = seq_marks("host-v", "e", 0, [0, 1, 2], [], T0)
        posting = asyncio.create_task(svc.post(records, T0, marks))
        for _ in range(250):  # the call now waits for the other's held record
            waiting = await probe.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query LIKE '%INSERT INTO held%' AND pid <> pg_backend_pid()"
            )
            if waiting:
                break
            await asyncio.sleep(0.02)
        assert waiting == 1
        release.set()
        await asyncio.wait_for(asyncio.gather(other, posting), 10)
        assert posting.result()[unassigned.id] is Outcome.DUPLICATE
        [view] = await Sequences(svc.ledger, 0).hosts("host-v")
        assert (view.watermark, view.missing) == (3, 0)
    finally:
        await probe.close()
        await first.close()
        await second.close()
