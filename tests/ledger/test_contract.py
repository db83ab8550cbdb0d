"""The ledger contract: every store kind keeps the same promises.

Run against the embedded SQLite file, one PostgreSQL shard, and four PostgreSQL
shards (four databases).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from collector.daemon import _release_after_reload
from collector.ledger.service import LedgerService, Outcome
from collector.ledger.store import LedgerStore
from collector.ledger.verify import verify_ledger
from collector.routing import Assignment
from tests.ledger.helpers import T0, open_stores, receivable, record, router, service
from tests.pg import Databases

KINDS = ["sqlite", "pg", "pg4"]


@pytest.fixture(params=KINDS)
async def stores(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[list[LedgerStore]]:
    databases: Databases | None = None
    if request.param != "sqlite":
        databases = Databases(request.getfixturevalue("pg_server"))
    opened = await open_stores(request.param, tmp_path, databases)
    try:
        yield opened
    finally:
        for s in opened:
            await s.close()
        if databases is not None:
            await databases.drop_all()


@pytest.fixture
def svc(stores: list[LedgerStore]) -> LedgerService:
    return service(stores)


async def test_accepts_and_rates_exactly(svc: LedgerService) -> None:
    # 2.5 GB egress at 0.013 = 0.0325 -> 0.03 (half-even); 7200 s CPU at 0.0125/h = 0.025 -> 0.02
    batch = [
        record(quantity="1500000000"),
        record(quantity="1000000000"),
        record(metric="cpu.seconds", quantity="7200"),
    ]
    outcomes = await svc.post(batch, T0)
    assert set(outcomes.values()) == {Outcome.ACCEPTED}
    assert await receivable(svc, "acme") == Decimal("0.05")
    balances = await svc.ledger.for_account("acme").balances("acme")
    assert balances[("revenue:Bandwidth", "eur")] == Decimal("-0.03")
    assert balances[("revenue:Compute", "eur")] == Decimal("-0.02")


async def test_same_batch_again_changes_nothing(svc: LedgerService) -> None:
    batch = [record(quantity=str(n * 10**8)) for n in range(1, 6)]
    await svc.post(batch, T0)
    store = svc.ledger.for_account("acme")
    before = (
        await store.balances("acme"),
        await store.usage("acme"),
        [link.hash async for link in store.chain("acme")],
    )
    outcomes = await svc.post(batch, T0 + 1)
    assert set(outcomes.values()) == {Outcome.DUPLICATE}
    after = (
        await store.balances("acme"),
        await store.usage("acme"),
        [link.hash async for link in store.chain("acme")],
    )
    assert after == before


async def test_a_small_resend_with_new_records_posts_only_the_new(svc: LedgerService) -> None:
    """Below the COPY size: PostgreSQL's optimistic INSERT finds the stored ones, and
    the transaction runs again inserting each record unless stored."""
    batch = [record(quantity="1000000000", seq=n) for n in range(5)]
    await svc.post(batch, T0)
    more = [record(quantity="1000000000", seq=5 + n) for n in range(2)]
    outcomes = await svc.post(batch[3:] + more, T0 + 1)
    assert outcomes == {**{r.id: Outcome.DUPLICATE for r in batch[3:]},
                        **{r.id: Outcome.ACCEPTED for r in more}}
    usage = await svc.ledger.for_account("acme").usage("acme")
    assert [(u.metric, u.quantity, u.records) for u in usage] == [
        ("net.tx_bytes", Decimal("7000000000"), 7)
    ]
    assert await receivable(svc, "acme") == Decimal("0.09")  # 7 GB * 0.013 = 0.091


async def test_split_batches_telescope_to_the_rounded_total(svc: LedgerService) -> None:
    # 37 pieces of 0.1 GB at 0.013/GB: rounding each piece would post 0.00 every time.
    for i in range(37):
        await svc.post([record(quantity="100000000", seq=i)], T0 + i)
    assert await receivable(svc, "acme") == Decimal("0.05")  # 3.7 GB * 0.013 = 0.0481


async def test_accounts_are_kept_apart(svc: LedgerService) -> None:
    await svc.post(
        [record("host-a", quantity="10000000000"), record("host-b", quantity="20000000000")], T0
    )
    assert await receivable(svc, "acme") == Decimal("0.13")
    assert await receivable(svc, "globex") == Decimal("0.26")
    usage = await svc.ledger.for_account("globex").usage("globex")
    assert [(u.metric, u.quantity, u.records) for u in usage] == [
        ("net.tx_bytes", Decimal("20000000000"), 1)
    ]


async def test_unassigned_host_is_held_then_rated_once_assigned(
    svc: LedgerService, stores: list[LedgerStore]
) -> None:
    batch = [record("host-z", quantity="1000000000") for _ in range(3)]
    outcomes = await svc.post(batch, T0)
    assert set(outcomes.values()) == {Outcome.HELD}
    assert await svc.post(batch, T0) == {r.id: Outcome.DUPLICATE for r in batch}
    assert len(await svc.ledger.for_host("host-z").held("host-z")) == 3
    assert await receivable(svc, "acme") == 0
    assigned = service(stores, router(Assignment("host-z", "acme")))
    assert await assigned.release_held(T0 + 5) == 3
    assert await assigned.release_held(T0 + 6) == 0
    assert await receivable(assigned, "acme") == Decimal("0.04")  # 3 GB * 0.013 = 0.039
    assert await svc.ledger.for_host("host-z").held() == []
    assert (await verify_ledger(list(stores))).ok


class Gated:
    """A store whose transactions wait for ``gate`` (and say so in ``entered``)."""

    def __init__(self, store: LedgerStore, gate: asyncio.Event, entered: asyncio.Event) -> None:
        self._store, self._gate, self._entered = store, gate, entered

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        self._entered.set()
        await self._gate.wait()
        async with self._store.transaction() as tx:
            yield tx


async def test_the_release_after_a_reload_waits_for_posts_routed_before_it(
    stores: list[LedgerStore],
) -> None:
    """A post routed with the old assignments holds its records; if its transaction
    begins after the reload's release read the held rows, the release must have
    waited for it, or its records stay held though their host is assigned."""
    gate, entered = asyncio.Event(), asyncio.Event()
    old = service([Gated(s, gate, entered) for s in stores])  # type: ignore[misc]
    new = service(stores, router(Assignment("host-z", "acme")))
    batch = [record("host-z", quantity="1000000000") for _ in range(3)]
    posting = asyncio.create_task(old.post(batch, T0))
    await asyncio.wait_for(entered.wait(), 10)  # routed (held), its transaction not begun
    release = asyncio.create_task(_release_after_reload(new, old))
    await asyncio.sleep(0.2)
    assert not release.done()
    gate.set()
    assert set((await posting).values()) == {Outcome.HELD}
    await asyncio.wait_for(release, 10)
    assert await new.ledger.for_host("host-z").held() == []
    assert await receivable(new, "acme") == Decimal("0.04")
    assert (await verify_ledger(list(stores))).ok


async def test_assignment_history_bills_whoever_held_the_host(stores: list[LedgerStore]) -> None:
    handover = T0 + 3_600_000_000
    rt = router(Assignment("host-c", "acme", 0, handover), Assignment("host-c", "globex", handover))
    svc = service(stores, rt)
    await svc.post(
        [
            record("host-c", quantity="10000000000", at_us=T0),
            record("host-c", quantity="10000000000", at_us=handover),
        ],
        T0,
    )
    assert await receivable(svc, "acme") == Decimal("0.13")
    assert await receivable(svc, "globex") == Decimal("0.13")


async def test_verify_is_clean_after_posting(svc: LedgerService, stores: list[LedgerStore]) -> None:
    for i in range(5):
        await svc.post(
            [
                record("host-a", quantity="123456789", seq=i),
                record("host-b", metric="cpu.seconds", quantity="3601", seq=i),
            ],
            T0 + i,
        )
    report = await verify_ledger(list(stores))
    assert report.ok, report.problems
    assert report.accounts == 2
    assert report.entries == 10


async def _tamper(store: LedgerStore, sql: str) -> None:
    """Change a row behind the ledger's back, the way only a superuser could."""
    from collector.ledger.postgres_store import PostgresLedger
    from collector.ledger.sqlite_store import SqliteLedger

    if isinstance(store, SqliteLedger):
        conn = sqlite3.connect(store.path)
        for table in ("records", "journal", "postings"):
            conn.execute(f"DROP TRIGGER IF EXISTS {table}_no_update")
        conn.execute(sql)
        conn.commit()
        conn.close()
    else:
        assert isinstance(store, PostgresLedger)
        conn2 = await asyncpg.connect(store.dsn)
        await conn2.execute("SET session_replication_role = replica")
        await conn2.execute(sql)
        await conn2.close()


@pytest.mark.parametrize(
    ("sql", "finding"),
    [
        ("UPDATE postings SET amount = amount * 2 WHERE ledger_account = 'receivable'",
         "do not balance"),
        ("UPDATE balances SET amount = 0", "but postings sum to"),
        ("UPDATE journal SET memo = 'edited'", "contents changed"),
        ("UPDATE records SET quantity = '1'", "do not match its digest"),
    ],
)
async def test_verify_finds_rows_changed_behind_its_back(
    svc: LedgerService, stores: list[LedgerStore], sql: str, finding: str
) -> None:
    await svc.post([record(quantity="5000000000")], T0)
    await svc.post([record(quantity="5000000000")], T0 + 1)
    store = svc.ledger.for_account("acme")
    await _tamper(store, sql)
    report = await verify_ledger(list(stores))
    assert not report.ok
    assert any(finding in p for p in report.problems), report.problems


async def test_journal_refuses_update_and_delete(svc: LedgerService) -> None:
    from collector.ledger.postgres_store import PostgresLedger
    from collector.ledger.sqlite_store import SqliteLedger

    await svc.post([record()], T0)
    store = svc.ledger.for_account("acme")
    statements = [
        "UPDATE journal SET memo = 'x'",
        "DELETE FROM postings",
        "DELETE FROM records",
        "UPDATE postings SET amount = 0",
    ]
    if isinstance(store, SqliteLedger):
        conn = sqlite3.connect(store.path)
        for sql in statements:
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                conn.execute(sql)
        conn.close()
    else:
        assert isinstance(store, PostgresLedger)
        conn2 = await asyncpg.connect(store.dsn)
        try:
            for sql in [*statements, "TRUNCATE journal", "UPDATE usage_sums SET quantity = 0",
                        "DELETE FROM usage_sums", "TRUNCATE usage_sums"]:
                with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                    await conn2.execute(sql)
        finally:
            await conn2.close()
    assert (await verify_ledger([store])).ok
