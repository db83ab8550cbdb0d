"""Calls that wait for a shard's transactions are posted together (see
``collector.ledger.service._ShardQueue``): one transaction for several calls, no two of
one account in it, each call answered for its own records only, nothing posted twice,
and one call's failure is its own.

Each scenario holds the shard's only transaction (``group_transactions=1``) while the
calls queue behind it, then lets it go and counts the transactions that followed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from collector.config import load_collector_config
from collector.daemon import build_service
from collector.ledger.postgres_store import PostgresLedger
from collector.ledger.service import LedgerService, Outcome, ShardedLedger
from collector.ledger.sharding import ShardMap
from collector.ledger.store import LedgerStore
from collector.ledger.verify import verify_ledger
from collector.pricing import AccountPrices, AccountTerms
from collector.rating.tariff import Price, parse_tariff_text
from collector.routing import Assignment, Router
from collector.sequences import Sequences, seq_marks
from common.errors import ConfigError, StoreUnavailable, ValidationError
from common.records import UsageRecord
from tests.ledger.helpers import T0, TARIFF, open_stores, record
from tests.pg import Databases

ACCOUNTS = [f"acct-{i}" for i in range(6)]


class Refusing(AccountPrices):
    """The test tariff, whose lookups fail for one account: a call the ledger refuses."""

    def prices_for(self, account_id: str, metric: str, at: datetime) -> Sequence[Price]:
        if account_id == "acct-5":
            raise ValidationError("acct-5 has no usable tariff")
        return super().prices_for(account_id, metric, at)


class Counted:
    """A store that counts its transactions and, while ``gate`` is clear, holds them."""

    def __init__(self, store: LedgerStore) -> None:
        self._store = self.inner = store
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered = asyncio.Event()
        self.transactions = 0
        self.fail: Exception | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        self.transactions += 1
        self.entered.set()
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        async with self._store.transaction() as tx:
            yield tx


@pytest.fixture(params=["sqlite", "pg"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Counted]:
    databases = None if request.param == "sqlite" else Databases(
        request.getfixturevalue("pg_server"))
    [opened] = await open_stores(request.param, tmp_path, databases)
    try:
        yield Counted(opened)
    finally:
        await opened.close()
        if databases is not None:
            await databases.drop_all()


def grouped(store: Counted, *, group_records: int = 4000) -> LedgerService:
    tariff = parse_tariff_text(TARIFF, "test-tariff.toml")
    prices = Refusing(tariff, {a: AccountTerms("eur") for a in ACCOUNTS})
    hosts = Router([Assignment(f"host-{i}", account) for i, account in enumerate(ACCOUNTS)])
    ledger = ShardedLedger([store], ShardMap.even(1))  # type: ignore[list-item]
    return LedgerService(ledger, hosts, prices, group_records=group_records,
                         group_transactions=1)


def batch(host: int, count: int, first_seq: int = 0) -> list[UsageRecord]:
    return [record(f"host-{host}", quantity="1000000000", seq=first_seq + i)
            for i in range(count)]


async def queued(store: Counted, calls: list[Any]) -> tuple[list[Any], int]:
    """Run ``calls`` (coroutines) while the first holds the shard's one transaction;
    the rest wait behind it. Their results (an exception for a call that raised), and
    the transactions that followed the first."""
    store.gate.clear()
    store.entered.clear()
    first = asyncio.create_task(calls[0])
    await asyncio.wait_for(store.entered.wait(), 10)
    rest = [asyncio.create_task(c) for c in calls[1:]]
    await asyncio.sleep(0.05)  # every call routed and waiting
    before = store.transactions
    store.gate.set()
    results = await asyncio.gather(first, *rest, return_exceptions=True)
    return results, store.transactions - before


async def egress(svc: LedgerService, account: str) -> Decimal:
    totals = {u.metric: u.quantity for u in await svc.ledger.stores[0].usage(account)}
    return totals.get("net.tx_bytes", Decimal(0))


async def test_waiting_calls_of_different_accounts_share_one_transaction(store: Counted) -> None:
    svc = grouped(store)
    batches = [batch(i, 30) for i in range(5)]
    results, transactions = await queued(store, [svc.post(b, T0) for b in batches])
    assert transactions == 1
    for b, outcomes in zip(batches, results, strict=True):
        assert outcomes == dict.fromkeys((r.id for r in b), Outcome.ACCEPTED)
    for i in range(5):
        assert await egress(svc, ACCOUNTS[i]) == 30 * 10**9
    assert (await verify_ledger([store])).ok  # type: ignore[list-item]


async def test_calls_of_one_account_never_share_a_transaction(store: Counted) -> None:
    """Each account's counters and chain head are locked once per transaction, in
    account order: a second call of an account waits for the next transaction."""
    svc = grouped(store)
    calls = [batch(0, 5), batch(0, 5, 5), batch(1, 5), batch(0, 5, 10), batch(2, 5)]
    results, transactions = await queued(store, [svc.post(b, T0) for b in calls])
    # The first alone (it held the transaction); then {0, 1, 2}, then {0}.
    assert transactions == 2
    assert all(set(o.values()) == {Outcome.ACCEPTED} for o in results)
    assert await egress(svc, "acct-0") == 15 * 10**9
    chain = [link async for link in store.chain("acct-0")]
    assert len(chain) == 3  # one entry per call
    assert (await verify_ledger([store])).ok  # type: ignore[list-item]


async def test_a_group_holds_at_most_its_records(store: Counted) -> None:
    svc = grouped(store, group_records=50)
    calls = [batch(i, 30) for i in range(5)]
    results, transactions = await queued(store, [svc.post(b, T0) for b in calls])
    # 30 + 30 > 50: after the first, each transaction takes one call.
    assert transactions == 4
    assert all(set(o.values()) == {Outcome.ACCEPTED} for o in results)


async def test_a_resend_in_a_group_is_answered_duplicate_and_counted_once(
    store: Counted,
) -> None:
    svc = grouped(store)
    sent = batch(1, 250)  # above COPY_MIN_RECORDS: PostgreSQL's optimistic COPY
    assert set((await svc.post(sent, T0)).values()) == {Outcome.ACCEPTED}
    fresh = [batch(2, 250), batch(3, 10)]
    partly = sent[:100] + batch(1, 50, 1000)  # a resend with new records of the account
    calls = [batch(0, 5), *fresh, partly]
    results, transactions = await queued(store, [svc.post(b, T0) for b in calls])
    # PostgreSQL: the group's one COPY fails on the resent ids, and the group runs again
    # inserting each record unless stored. SQLite inserts that way the first time.
    assert transactions == (2 if isinstance(store.inner, PostgresLedger) else 1)
    for b, outcomes in zip(fresh, results[1:3], strict=True):
        assert outcomes == dict.fromkeys((r.id for r in b), Outcome.ACCEPTED)
    assert [results[3][r.id] for r in partly] == (
        [Outcome.DUPLICATE] * 100 + [Outcome.ACCEPTED] * 50
    )
    assert await egress(svc, "acct-1") == 300 * 10**9
    assert await egress(svc, "acct-2") == 250 * 10**9
    report = await verify_ledger([store])  # type: ignore[list-item]
    assert report.ok, report.problems


@pytest.mark.parametrize(("calls", "size", "copies", "inserts"), [(4, 60, 1, 0), (3, 50, 0, 3)])
async def test_small_calls_of_a_group_share_one_copy_when_they_are_enough(
    pg_databases: Databases, monkeypatch: pytest.MonkeyPatch, calls: int, size: int,
    copies: int, inserts: int,
) -> None:
    """Four calls of 60 records: 240, enough for one COPY. Three of 50: 150, each
    inserted on its own."""
    store = Counted(await PostgresLedger.open(await pg_databases.create()))
    sent = {"copy": 0, "insert": 0}
    copy_to_table, fetchval = asyncpg.Connection.copy_to_table, asyncpg.Connection.fetchval

    async def counted_copy(conn: asyncpg.Connection, *args: Any, **kwargs: Any) -> Any:
        sent["copy"] += 1
        return await copy_to_table(conn, *args, **kwargs)

    async def counted_fetchval(conn: asyncpg.Connection, query: str, *args: Any,
                               **kwargs: Any) -> Any:
        sent["insert"] += query.startswith("WITH new AS (INSERT INTO records")
        return await fetchval(conn, query, *args, **kwargs)

    monkeypatch.setattr(asyncpg.Connection, "copy_to_table", counted_copy)
    monkeypatch.setattr(asyncpg.Connection, "fetchval", counted_fetchval)
    try:
        svc = grouped(store)
        batches = [batch(0, 5)] + [batch(i, size) for i in range(1, calls + 1)]
        results, transactions = await queued(store, [svc.post(b, T0) for b in batches])
        assert transactions == 1
        for b, outcomes in zip(batches, results, strict=True):
            assert outcomes == dict.fromkeys((r.id for r in b), Outcome.ACCEPTED)
        # The first call alone: 5 records, inserted. Then the group.
        assert sent == {"copy": copies, "insert": 1 + inserts}
        for i in range(1, calls + 1):
            assert await egress(svc, ACCOUNTS[i]) == size * 10**9
        assert (await verify_ledger([store.inner])).ok
    finally:
        await store.inner.close()


async def test_a_call_the_ledger_refuses_fails_alone(store: Counted) -> None:
    svc = grouped(store)
    observed: list[tuple[str, int]] = []
    svc.observe_calls = lambda shard, calls: observed.append((shard, calls))
    calls = [batch(0, 5), batch(1, 5), batch(5, 5), batch(2, 5)]
    results, _ = await queued(store, [svc.post(b, T0) for b in calls])
    assert isinstance(results[2], ValidationError)
    # The first alone; the group of three failed, then ran call by call: two committed.
    assert observed == [(store.name, 1)] * 3
    for i in (0, 1, 3):
        assert set(results[i].values()) == {Outcome.ACCEPTED}
    assert await egress(svc, "acct-5") == 0
    assert [await egress(svc, ACCOUNTS[i]) for i in (0, 1, 2)] == [5 * 10**9] * 3
    assert (await verify_ledger([store])).ok  # type: ignore[list-item]


async def test_a_failing_observer_neither_fails_nor_reposts_a_call(
    store: Counted, capsys: pytest.CaptureFixture[str]
) -> None:
    svc = grouped(store)
    seen: list[int] = []

    def broken(shard: str, calls: int) -> None:
        seen.append(calls)
        raise RuntimeError("metrics registry gone")

    svc.observe_calls = broken
    batches = [batch(i, 5) for i in range(3)]
    results, transactions = await queued(store, [svc.post(b, T0) for b in batches])
    assert transactions == 1  # no call of the group was posted again on its own
    assert seen == [1, 2]
    for b, outcomes in zip(batches, results, strict=True):
        assert outcomes == dict.fromkeys((r.id for r in b), Outcome.ACCEPTED)
    logged = capsys.readouterr()
    assert (logged.out + logged.err).count("metrics registry gone") == 2
    assert await svc.post(batch(3, 5), T0)  # the queue still runs


async def test_an_unavailable_store_fails_every_call_of_the_group(store: Counted) -> None:
    svc = grouped(store)
    store.gate.clear()
    store.entered.clear()
    first = asyncio.create_task(svc.post(batch(0, 5), T0))
    await asyncio.wait_for(store.entered.wait(), 10)
    rest = [asyncio.create_task(svc.post(batch(i, 5), T0)) for i in (1, 2, 3)]
    await asyncio.sleep(0.05)
    store.fail = StoreUnavailable("shard0: connection refused")
    store.gate.set()
    results = await asyncio.gather(first, *rest, return_exceptions=True)
    assert all(isinstance(r, StoreUnavailable) for r in results)
    assert store.transactions == 2
    store.fail = None
    assert [await egress(svc, ACCOUNTS[i]) for i in range(4)] == [0] * 4


async def test_a_call_whose_caller_gave_up_while_waiting_is_not_posted(store: Counted) -> None:
    svc = grouped(store)
    kept, dropped = batch(1, 5), batch(2, 5)
    store.gate.clear()
    store.entered.clear()
    first = asyncio.create_task(svc.post(batch(0, 5), T0))
    await asyncio.wait_for(store.entered.wait(), 10)
    waiting = [asyncio.create_task(svc.post(b, T0)) for b in (kept, dropped)]
    await asyncio.sleep(0.05)
    waiting[1].cancel()
    store.gate.set()
    await first
    assert set((await waiting[0]).values()) == {Outcome.ACCEPTED}
    with pytest.raises(asyncio.CancelledError):
        await waiting[1]
    assert await egress(svc, "acct-1") == 5 * 10**9
    assert await egress(svc, "acct-2") == 0


async def test_each_call_of_a_group_is_told_whether_it_began_its_epoch(store: Counted) -> None:
    """Seqs of several hosts in one transaction: every one tracked, and the first call
    of each epoch, only, told it began it."""
    svc = grouped(store)

    def call(host: int, epoch: str, seqs: range) -> tuple[list[UsageRecord], Any]:
        records = [record(f"host-{host}", seq=s) for s in seqs]
        return records, seq_marks(f"host-{host}", epoch, 0, list(seqs), [], T0)

    calls = [call(0, "a", range(3)), call(1, "b", range(3)), call(2, "c", range(2)),
             call(1, "b", range(3, 6)), call(3, "d", range(0))]
    await queued(store, [svc.post(records, T0, marks) for records, marks in calls])
    assert [marks.new_epoch for _, marks in calls] == [True, True, True, False, False]
    views = {v.host_id: (v.watermark, v.missing) for v in await Sequences(svc.ledger, 0).hosts()}
    assert views == {"host-0": (3, 0), "host-1": (6, 0), "host-2": (2, 0)}


async def test_two_collectors_grouping_overlapping_calls_post_each_record_once(
    pg_databases: Databases,
) -> None:
    """Two collectors on one database, each posting groups of calls of six accounts,
    every call sent through both (an agent's resend to another collector): no deadlock,
    each record posted once, every amount exact."""
    from collector.ledger.postgres_store import PostgresLedger

    dsn = await pg_databases.create()
    ledgers = [await PostgresLedger.open(dsn, name=f"c{i}") for i in range(2)]
    try:
        tariff = parse_tariff_text(TARIFF, "test-tariff.toml")
        prices = AccountPrices(tariff, {a: AccountTerms("eur") for a in ACCOUNTS[:5]})
        hosts = Router([Assignment(f"host-{i}", a) for i, a in enumerate(ACCOUNTS[:5])])
        services = [
            LedgerService(ShardedLedger([ledger], ShardMap.even(1)), hosts, prices,
                          group_transactions=2)
            for ledger in ledgers
        ]
        calls = [batch(n % 5, 220 if n % 3 else 7, n * 1000) for n in range(30)]
        results = await asyncio.gather(*(
            svc.post(b, T0) for b in calls for svc in services
        ))
        for n, b in enumerate(calls):
            one, other = results[2 * n], results[2 * n + 1]
            for r in b:  # posted by exactly one of the two collectors
                assert {one[r.id], other[r.id]} == {Outcome.ACCEPTED, Outcome.DUPLICATE}
        for i in range(5):
            sent = sum(len(b) for n, b in enumerate(calls) if n % 5 == i)
            assert await egress(services[0], ACCOUNTS[i]) == sent * 10**9
        report = await verify_ledger([ledgers[0]])
        assert report.ok, report.problems
    finally:
        for ledger in ledgers:
            await ledger.close()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[ledger]\ningest_transactions = 0", "ledger.ingest_transactions: must be at least 1"),
        ("[ledger]\ningest_group_records = 0", "ledger.ingest_group_records: must be at least 1"),
    ],
)
def test_a_bad_grouping_setting_names_its_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "collector.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_collector_config(path)
    assert str(caught.value).startswith(f"{path}: {message}")


def test_the_collector_groups_as_configured(tmp_path: Path) -> None:
    (tmp_path / "tariff.toml").write_text(TARIFF)
    path = tmp_path / "collector.toml"
    path.write_text('tariff = "tariff.toml"\n')
    default = build_service(load_collector_config(path), ShardedLedger([], ShardMap.even(1)))
    assert (default.group_transactions, default.group_records) == (4, 4000)
    path.write_text('tariff = "tariff.toml"\n[ledger]\ningest_transactions = 2\n'
                    "ingest_group_records = 1500\n")
    configured = build_service(load_collector_config(path), ShardedLedger([], ShardMap.even(1)))
    assert (configured.group_transactions, configured.group_records) == (2, 1500)
