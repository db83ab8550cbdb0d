"""The embedded ledger's reads see what is committed: never a unit of work in progress
(an API read while ingest is inside its transaction), nor one that rolls back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from collector.ledger.journal import JournalEntry, Posting, records_digest
from collector.ledger.sqlite_store import SqliteLedger
from collector.ledger.store import UsageQuery
from common.ids import new_id
from tests.ledger.helpers import T0, record

HANG_GUARD_SECONDS = 60  # only keeps a broken run from hanging; nothing is timed


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteLedger]:
    opened = await SqliteLedger.open(tmp_path / "ledger.db")
    try:
        yield opened
    finally:
        await opened.close()


def usage_entry(entry_id: str, record_id: str) -> JournalEntry:
    return JournalEntry(
        entry_id, "acme", "usage", "", T0,
        (Posting("receivable", "eur", 1), Posting("revenue:Bandwidth", "eur", -1)),
        records_digest([(record_id, "1000000000")]),
    )


async def what_reads_see(store: SqliteLedger) -> dict[str, Any]:
    """Everything a REST API read of acme shows, through the store's read methods."""
    usage = UsageQuery(bucket="day", from_us=0, to_us=2**62, account_id="acme")
    return {
        "balances": await store.balances("acme"),
        "usage": await store.usage("acme"),
        "accounts": await store.accounts(),
        "journal": await store.journal_page("acme", from_us=0, to_us=2**62, after_seq=0,
                                            limit=10),
        "usage_series": await store.usage_series(usage),
        "revenue": await store.revenue(0, 2**62),
    }


async def during_a_transaction(
    store: SqliteLedger, then: Callable[[], Coroutine[Any, Any, None]]
) -> dict[str, Any]:
    """What reads see while a unit of work has inserted a record and appended its entry
    and not committed yet; ``then`` ends the unit of work (commit, or raise to roll back)."""
    inside = asyncio.Event()
    finish = asyncio.Event()

    async def write() -> None:
        async with store.transaction() as tx:
            item = record()
            entry_id = new_id()
            await tx.insert_records("acme", entry_id, [item], T0)
            await tx.append_entry(usage_entry(entry_id, item.id))
            inside.set()
            await finish.wait()
            await then()

    writer = asyncio.create_task(write())
    await asyncio.wait_for(inside.wait(), HANG_GUARD_SECONDS)
    try:
        # The unit of work is open and holds the file's write lock: reads still answer.
        seen = await asyncio.wait_for(what_reads_see(store), HANG_GUARD_SECONDS)
    finally:
        finish.set()
        await asyncio.gather(writer, return_exceptions=True)
    return seen


NOTHING: dict[str, Any] = {"balances": {}, "usage": [], "accounts": [], "journal": [],
                           "usage_series": [], "revenue": []}


async def test_a_read_during_a_transaction_does_not_see_its_uncommitted_rows(
    store: SqliteLedger,
) -> None:
    async def commit() -> None:
        return None

    assert await during_a_transaction(store, commit) == NOTHING
    after = await what_reads_see(store)
    assert after["balances"] == {("receivable", "eur"): 1, ("revenue:Bandwidth", "eur"): -1}
    assert [link.chain_seq for link in after["journal"]] == [1]
    assert after["accounts"] == ["acme"]


async def test_a_read_never_sees_a_transaction_that_rolls_back(store: SqliteLedger) -> None:
    async def fail() -> None:
        raise RuntimeError("the unit of work fails after its writes")

    assert await during_a_transaction(store, fail) == NOTHING
    assert await what_reads_see(store) == NOTHING


async def test_reads_do_not_wait_for_a_unit_of_work_and_answer_the_last_commit(
    store: SqliteLedger,
) -> None:
    async def commit() -> None:
        return None

    await during_a_transaction(store, commit)
    first = await what_reads_see(store)

    async def commit_again() -> None:
        return None

    # A second unit of work in progress: reads answer with the first one, in full.
    assert await during_a_transaction(store, commit_again) == first
    assert (await store.balances("acme"))[("receivable", "eur")] == 2
