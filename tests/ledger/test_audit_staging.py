"""Audit rows of changes on an account's shard: written in the change's own transaction,
appended to the control shard's log exactly once (collector.audit)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from collector.audit import AuditLog, verify_audit_log
from collector.ledger.service import ShardedLedger
from collector.ledger.sharding import ShardMap
from collector.ledger.store import AuditRow, LedgerStore, StagedAudit
from collector.ledger.verify import verify_ledger
from common.errors import StoreUnavailable
from tests.ledger.helpers import open_stores
from tests.pg import Databases


@pytest.fixture(params=["sqlite", "pg4"])
async def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ShardedLedger]:
    """The embedded file (the account's shard is the control shard), or four shards."""
    databases = None
    if request.param != "sqlite":
        databases = Databases(request.getfixturevalue("pg_server"))
    stores = await open_stores(request.param, tmp_path, databases)
    try:
        yield ShardedLedger(stores, ShardMap.even(len(stores)))
    finally:
        for s in stores:
            await s.close()
        if databases is not None:
            await databases.drop_all()


@pytest.fixture
async def pg_ledger(pg_databases: Databases) -> AsyncIterator[ShardedLedger]:
    stores = await open_stores("pg4", None, pg_databases)
    try:
        yield ShardedLedger(stores, ShardMap.even(len(stores)))
    finally:
        for s in stores:
            await s.close()


async def log_rows(ledger: ShardedLedger) -> list[AuditRow]:
    return await ledger.control.audit_rows(from_us=0, to_us=2**62, after_seq=0, limit=None)


async def staged(store: LedgerStore) -> list[StagedAudit]:
    async with store.transaction() as tx:
        return await tx.staged_audits()


async def change(audit: AuditLog, store: LedgerStore, target: str) -> None:
    """A change on ``store`` that records its audit row in its own transaction."""
    async with store.transaction() as tx:
        await audit.stage(store, tx, "cli:ops", "invoice.finalize", target, None,
                          {"total": Decimal("10.50")})


class Boom(Exception):
    pass


async def test_the_row_commits_or_rolls_back_with_its_change(ledger: ShardedLedger) -> None:
    audit = AuditLog.for_ledger(ledger, clock=lambda: 1_000)
    store = ledger.stores[-1]

    async def fails_after_the_change() -> None:
        async with store.transaction() as tx:
            await audit.stage(store, tx, "cli:ops", "invoice.finalize", "invoice/INV-1",
                              None, {"total": Decimal("10.50")})
            raise Boom

    with pytest.raises(Boom):
        await fails_after_the_change()
    assert await staged(store) == []
    assert await log_rows(ledger) == []

    await change(audit, store, "invoice/INV-1")
    if store is ledger.control:  # appended in the change's transaction itself
        assert len(await log_rows(ledger)) == 1
        assert await staged(store) == []
    else:  # kept on the account's shard with the change, not yet in the log
        assert len(await staged(store)) == 1
        assert await log_rows(ledger) == []
    assert await audit.relay(store) == (0 if store is ledger.control else 1)

    [row] = await log_rows(ledger)
    assert (row.seq, row.at_us, row.actor, row.action, row.target, row.before, row.after) == (
        1, 1_000, "cli:ops", "invoice.finalize", "invoice/INV-1", "null", '{"total":"10.5"}'
    )
    assert await staged(store) == []
    assert await audit.relay(store) == 0
    assert await verify_audit_log(ledger.control) == (1, [])


async def test_bad_fields_are_refused_before_anything_is_written(ledger: ShardedLedger) -> None:
    audit = AuditLog.for_ledger(ledger)
    store = ledger.stores[-1]
    with pytest.raises(Exception, match="floats are not recorded"):
        async with store.transaction() as tx:
            await audit.stage(store, tx, "cli:ops", "invoice.credit", "invoice/INV-1", None,
                              {"total": 1.5})
    with pytest.raises(Exception, match="audit target"):
        async with store.transaction() as tx:
            await audit.stage(store, tx, "cli:ops", "invoice.credit", "", None, None)
    assert await staged(store) == []
    assert await log_rows(ledger) == []


def failing_on(store: LedgerStore, call: int) -> Callable[..., Any]:
    """``store.transaction`` that fails (the shard out of reach) on its ``call``-th use."""
    original = store.transaction
    calls = 0

    def transaction() -> Any:
        nonlocal calls
        calls += 1
        if calls == call:
            raise StoreUnavailable(f"{store.name}: connection refused")
        return original()

    return transaction


async def test_a_relay_stopped_after_the_append_appends_nothing_twice(
    pg_ledger: ShardedLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    audit = AuditLog.for_ledger(pg_ledger)
    store = pg_ledger.stores[2]
    for n in range(3):
        await change(audit, store, f"invoice/INV-{n}")
    # The log's transaction commits, then the account's shard goes away before the
    # staged rows are dropped there.
    monkeypatch.setattr(store, "transaction", failing_on(store, call=2))
    with pytest.raises(StoreUnavailable):
        await audit.relay(store)
    monkeypatch.undo()
    assert len(await log_rows(pg_ledger)) == 3
    assert len(await staged(store)) == 3

    # The next relay (another command, the collector's start) finds them appended.
    assert await AuditLog.for_ledger(pg_ledger).relay_all(pg_ledger.stores) == 0
    assert [r.target for r in await log_rows(pg_ledger)] == [
        "invoice/INV-0", "invoice/INV-1", "invoice/INV-2"
    ]
    assert await staged(store) == []
    assert await verify_audit_log(pg_ledger.control) == (3, [])


async def test_a_relay_that_cannot_reach_the_log_leaves_the_rows_staged(
    pg_ledger: ShardedLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    audit = AuditLog.for_ledger(pg_ledger)
    store = pg_ledger.stores[1]
    await change(audit, store, "invoice/INV-7")
    monkeypatch.setattr(pg_ledger.control, "transaction", failing_on(pg_ledger.control, call=1))
    with pytest.raises(StoreUnavailable):
        await audit.relay(store)
    monkeypatch.undo()
    assert await log_rows(pg_ledger) == []
    assert len(await staged(store)) == 1
    report = await verify_ledger(list(pg_ledger.stores))  # told, not a violation
    assert (report.ok, report.audit_rows, report.audit_staged) == (True, 0, 1)
    assert await audit.relay_all(pg_ledger.stores) == 1
    report = await verify_ledger(list(pg_ledger.stores))
    assert (report.ok, report.audit_rows, report.audit_staged) == (True, 1, 0)
    assert [r.target for r in await log_rows(pg_ledger)] == ["invoice/INV-7"]


async def test_concurrent_relays_append_each_row_once(pg_ledger: ShardedLedger) -> None:
    audit = AuditLog.for_ledger(pg_ledger)
    shards = pg_ledger.stores[1:]
    for n, store in enumerate(shards * 2):
        await change(audit, store, f"invoice/INV-{n}")
    relays = [AuditLog.for_ledger(pg_ledger).relay_all(shards) for _ in range(4)]
    appended = await asyncio.gather(*relays)
    assert sum(appended) == 2 * len(shards)
    rows = await log_rows(pg_ledger)
    assert sorted(r.target for r in rows) == sorted(f"invoice/INV-{n}" for n in range(6))
    assert await verify_audit_log(pg_ledger.control) == (6, [])
    for store in shards:
        assert await staged(store) == []
    assert await audit.relay_all(pg_ledger.stores) == 0
