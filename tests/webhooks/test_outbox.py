"""The outbox: events commit or roll back with the change that causes them, never change,
and are numbered in commit order without gaps."""

from __future__ import annotations

import asyncio
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from collector.ledger.journal import JournalEntry, Posting
from collector.ledger.outbox import INVOICE_FINALIZED, USAGE_LATE
from collector.ledger.service import ShardedLedger
from collector.ledger.store import LedgerStore
from collector.webhooks.state import outbox_after, outbox_position
from common.errors import ValidationError
from common.ids import new_id
from tests.ledger.helpers import T0
from tests.pg import Databases
from tests.webhooks.helpers import open_ledger


def invoice_entry(account: str, amount: str) -> JournalEntry:
    return JournalEntry(
        id=new_id(),
        account_id=account,
        kind="invoice",
        memo="test",
        created_us=T0,
        postings=(
            Posting("receivable", "eur", Decimal(amount)),
            Posting("revenue:Test", "eur", -Decimal(amount)),
        ),
    )


async def test_an_event_commits_with_its_cause(ledger: ShardedLedger) -> None:
    store = ledger.for_account("acme")
    async with store.transaction() as tx:
        link = await tx.append_entry(invoice_entry("acme", "12.50"))
        event_id = await tx.emit(INVOICE_FINALIZED, "acme", {"total": Decimal("12.50")})
    [event] = await outbox_after(store, 0, 10)
    assert (event.seq, event.event_id, event.event_type, event.account_id) == (
        1, event_id, INVOICE_FINALIZED, "acme"
    )
    assert event.data == '{"total":"12.50"}'
    assert [c.entry.id async for c in store.chain("acme")] == [link.entry.id]


async def test_a_rolled_back_transaction_leaves_no_event(ledger: ShardedLedger) -> None:
    store = ledger.for_account("acme")
    source, before = await outbox_position(store)

    async def failing_change() -> None:
        async with store.transaction() as tx:
            await tx.append_entry(invoice_entry("acme", "3.00"))
            await tx.emit(INVOICE_FINALIZED, "acme", {"total": "3.00"})
            raise RuntimeError("the change fails after the event was emitted")

    with pytest.raises(RuntimeError, match="the change fails"):
        await failing_change()
    assert await outbox_after(store, 0, 10) == []
    assert await outbox_position(store) == (source, before)
    assert [c async for c in store.chain("acme")] == []
    # The next event takes the sequence the rolled-back one would have had: no gap.
    async with store.transaction() as tx:
        await tx.emit(USAGE_LATE, "acme", {"n": 1})
    assert [e.seq for e in await outbox_after(store, 0, 10)] == [1]


async def change_with_event(store: LedgerStore, event_type: str, data: Any) -> None:
    async with store.transaction() as tx:
        await tx.append_entry(invoice_entry("acme", "1.00"))
        await tx.emit(event_type, "acme", data)


async def test_bad_events_are_refused_and_nothing_is_written(ledger: ShardedLedger) -> None:
    store = ledger.for_account("acme")
    for event_type, data, message in [
        ("invoice.finalised", {}, "unknown event type 'invoice.finalised'"),
        (USAGE_LATE, {"quantity": 1.5}, "data.quantity is the float 1.5"),
        (USAGE_LATE, {"at": object()}, "data.at is a object"),
        (USAGE_LATE, {"x": Decimal("NaN")}, "expected a finite decimal"),
    ]:
        with pytest.raises(ValidationError, match=message):
            await change_with_event(store, event_type, data)
    assert await outbox_after(store, 0, 10) == []
    assert [c async for c in store.chain("acme")] == []


async def test_outbox_events_never_change(ledger: ShardedLedger) -> None:
    store = ledger.control
    async with store.transaction() as tx:
        await tx.emit(USAGE_LATE, "acme", {"n": 1})
    refused = (sqlite3.IntegrityError, asyncpg.exceptions.InsufficientPrivilegeError)
    from collector.webhooks.state import unit

    with pytest.raises(refused):
        async with unit(store) as sql:
            await sql.execute("UPDATE outbox SET data = '{}'")
    assert [e.data for e in await outbox_after(store, 0, 10)] == ['{"n":1}']


async def test_concurrent_transactions_number_events_in_commit_order_without_gaps(
    ledger: ShardedLedger,
) -> None:
    store = ledger.control

    async def one(n: int) -> str:
        async with store.transaction() as tx:
            first = await tx.emit(USAGE_LATE, "acme", {"n": n})
            await asyncio.sleep(0)
            await tx.emit(USAGE_LATE, "acme", {"n": n, "second": True})
            return first

    firsts = await asyncio.gather(*(one(n) for n in range(20)))
    events = await outbox_after(store, 0, 100)
    assert [e.seq for e in events] == list(range(1, 41))
    assert {e.event_id for e in events[::2]} == set(firsts)
    # The two events of each transaction are adjacent: no other commit came between.
    for a, b in zip(events[::2], events[1::2], strict=True):
        assert b.data == a.data[:-1] + ',"second":true}'


async def test_an_event_never_appears_behind_one_already_read(
    pg_databases: Databases, tmp_path: Path
) -> None:
    # PostgreSQL runs transactions side by side: one that emitted first but commits last
    # must still be numbered after the events a reader has already seen.
    ledger = await open_ledger("pg", tmp_path, pg_databases)
    store = ledger.control
    emitted, release = asyncio.Event(), asyncio.Event()

    async def slow() -> str:
        async with store.transaction() as tx:
            event_id = await tx.emit(USAGE_LATE, "acme", {"who": "slow"})
            emitted.set()
            await release.wait()
            return event_id

    try:
        slow_task = asyncio.create_task(slow())
        await emitted.wait()
        async with store.transaction() as tx:
            quick = await tx.emit(USAGE_LATE, "acme", {"who": "quick"})
        seen = await outbox_after(store, 0, 10)
        assert [(e.seq, e.event_id) for e in seen] == [(1, quick)]
        release.set()
        late = await slow_task
        assert [(e.seq, e.event_id) for e in await outbox_after(store, 1, 10)] == [(2, late)]
    finally:
        await ledger.close()
