"""The ledger store port: what the ingest path and ``ledger verify`` need from storage.

Two adapters implement it and pass one contract suite (``tests/ledger``):
:mod:`collector.ledger.sqlite_store` (the embedded single-file default) and
:mod:`collector.ledger.postgres_store` (one per PostgreSQL shard).

One unit of work is ``async with store.transaction() as tx:``; everything done
through ``tx`` commits together or not at all. The tables that hold usage records,
journal entries and postings refuse UPDATE and DELETE at the database level.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

from collector.ledger.journal import ChainLink, JournalEntry, Posting, records_digest
from common.money import canonical_text
from common.records import UsageRecord


@dataclass(frozen=True, slots=True, order=True)
class CounterKey:
    """A running usage counter: one account, one price, one billing period."""

    account_id: str
    price_id: str
    period_start_us: int


@dataclass(frozen=True, slots=True)
class Counter:
    """Cumulative quantity (the metric's base units) and the rounded amount posted so far."""

    quantity: Decimal
    amount: Decimal


ZERO_COUNTER = Counter(Decimal(0), Decimal(0))


@dataclass(frozen=True, slots=True)
class UsageTotal:
    """Rated usage of one account for one metric, as the REST API reports it."""

    metric: str
    unit: str
    quantity: Decimal
    records: int


class LedgerTx(Protocol):
    async def insert_records(
        self, account_id: str, entry_id: str, records: Sequence[UsageRecord], received_us: int
    ) -> set[str]:
        """Insert records not seen before; return the ids that were new (the rest are
        duplicates). Concurrent inserts of the same id: exactly one wins."""

    async def hold(self, records: Sequence[UsageRecord], received_us: int) -> set[str]:
        """Keep records of an unassigned host until it is assigned; return the new ids."""

    async def release(self, record_ids: Sequence[str]) -> None:
        """Remove held records once they have been posted."""

    async def load_counters(self, keys: Sequence[CounterKey]) -> dict[CounterKey, Counter]:
        """Current counters, locked until the transaction ends; missing ones are zero."""

    async def save_counters(self, values: Mapping[CounterKey, Counter]) -> None: ...

    async def append_entry(self, entry: JournalEntry) -> ChainLink:
        """Chain the entry after its account's head, store it and update balances."""


class LedgerStore(Protocol):
    name: str

    def transaction(self) -> AbstractAsyncContextManager[LedgerTx]: ...

    async def balances(self, account_id: str) -> dict[tuple[str, str], Decimal]: ...

    async def usage(self, account_id: str) -> list[UsageTotal]: ...

    async def held(self, host_id: str | None = None) -> list[UsageRecord]: ...

    async def accounts(self) -> list[str]: ...

    def chain(self, account_id: str) -> AsyncIterator[ChainLink]: ...

    async def postings_of(self, entry_id: str) -> list[Posting]: ...

    async def balance_mismatches(self) -> list[str]:
        """Balances that differ from the sum of their postings, described."""

    async def duplicate_record_ids(self) -> list[str]: ...

    async def unlinked_records(self) -> list[str]:
        """Records whose entry is missing, or whose entry's digest does not match them."""

    async def close(self) -> None: ...


def record_to_json(record: UsageRecord) -> str:
    """A held record as JSON text (exact decimal text for the quantity)."""
    return json.dumps(
        {
            "id": record.id,
            "host_id": record.host_id,
            "metric": record.metric,
            "quantity": record.quantity_text,
            "unit": record.unit,
            "start_us": record.start_us,
            "end_us": record.end_us,
            "seq": record.seq,
            "labels": dict(record.labels),
        },
        sort_keys=True,
    )


def record_from_json(text: str) -> UsageRecord:
    return UsageRecord(**json.loads(text))


def describe_balance_mismatches(
    sums: Mapping[tuple[str, str, str], Decimal], stored: Mapping[tuple[str, str, str], Decimal]
) -> list[str]:
    """Each (account, ledger account, currency) whose stored balance is not its postings' sum."""
    problems = []
    for key in sorted(set(sums) | set(stored)):
        expected = sums.get(key, Decimal(0))
        actual = stored.get(key, Decimal(0))
        if expected != actual:
            account, ledger_account, currency = key
            problems.append(
                f"account {account} {ledger_account} {currency}: balance {actual}"
                f" but postings sum to {expected}"
            )
    return problems


# The queries behind ``unlinked_records``, the same on every store.
ENTRY_RECORDS_SQL = (
    "SELECT j.entry_id, j.records_digest, r.record_id, r.quantity FROM journal j"
    " LEFT JOIN records r ON r.entry_id = j.entry_id WHERE j.kind = 'usage'"
    " ORDER BY j.entry_id"
)
ORPHAN_RECORDS_SQL = (
    "SELECT r.record_id FROM records r LEFT JOIN journal j ON j.entry_id = r.entry_id"
    " WHERE j.entry_id IS NULL"
)


def describe_unlinked(
    entry_records: Iterable[Sequence[Any]], orphans: Iterable[Sequence[Any]]
) -> list[str]:
    """Usage entries whose records no longer match the digest they were chained with,
    and records whose entry is missing, from the rows of the two queries above."""
    grouped: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    for entry_id, digest, record_id, quantity in entry_records:
        items = grouped.setdefault(entry_id, (digest, []))[1]
        if record_id is not None:
            items.append((record_id, canonical_text(Decimal(quantity))))
    problems = [
        f"entry {e}: its records do not match its digest"
        for e, (digest, items) in grouped.items()
        if records_digest(items) != digest
    ]
    problems += [f"record {r[0]}: its journal entry is missing" for r in orphans]
    return problems
