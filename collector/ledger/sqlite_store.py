"""The embedded ledger: one SQLite file, the single-machine default.

All access goes through one connection owned by one dedicated thread, so the event
loop never blocks on SQLite; an asyncio lock makes each unit of work exclusive and
``BEGIN IMMEDIATE`` takes SQLite's write lock at its start. The file runs in WAL mode
with ``synchronous=FULL``: a committed batch survives a power cut. Decimals are stored
as exact decimal text. Triggers refuse UPDATE and DELETE on records, journal entries
and postings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

from collector.ledger.journal import (
    GENESIS_HASH,
    ChainLink,
    JournalEntry,
    Posting,
    entry_hash,
    restore_entry,
)
from collector.ledger.store import (
    ENTRY_RECORDS_SQL,
    ORPHAN_RECORDS_SQL,
    Counter,
    CounterKey,
    UsageTotal,
    describe_balance_mismatches,
    describe_unlinked,
    record_from_json,
    record_to_json,
)
from common.errors import StoreUnavailable
from common.money import CONTEXT, canonical_text
from common.records import UsageRecord

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    record_id   TEXT PRIMARY KEY,
    account_id  TEXT NOT NULL,
    entry_id    TEXT NOT NULL,
    host_id     TEXT NOT NULL,
    metric      TEXT NOT NULL,
    unit        TEXT NOT NULL,
    quantity    TEXT NOT NULL,
    start_us    INTEGER NOT NULL,
    end_us      INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    labels      TEXT NOT NULL,
    received_us INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS records_account ON records (account_id, metric);
CREATE INDEX IF NOT EXISTS records_entry ON records (entry_id);
CREATE TABLE IF NOT EXISTS held (
    record_id   TEXT PRIMARY KEY,
    host_id     TEXT NOT NULL,
    record      TEXT NOT NULL,
    received_us INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS journal (
    entry_id       TEXT PRIMARY KEY,
    account_id     TEXT NOT NULL,
    chain_seq      INTEGER NOT NULL,
    kind           TEXT NOT NULL,
    memo           TEXT NOT NULL,
    created_us     INTEGER NOT NULL,
    records_digest TEXT NOT NULL,
    prev_hash      TEXT NOT NULL,
    hash           TEXT NOT NULL,
    UNIQUE (account_id, chain_seq)
);
CREATE TABLE IF NOT EXISTS postings (
    entry_id       TEXT NOT NULL,
    idx            INTEGER NOT NULL,
    account_id     TEXT NOT NULL,
    ledger_account TEXT NOT NULL,
    currency       TEXT NOT NULL,
    amount         TEXT NOT NULL,
    PRIMARY KEY (entry_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS balances (
    account_id     TEXT NOT NULL,
    ledger_account TEXT NOT NULL,
    currency       TEXT NOT NULL,
    amount         TEXT NOT NULL,
    PRIMARY KEY (account_id, ledger_account, currency)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chain_heads (
    account_id TEXT PRIMARY KEY,
    chain_seq  INTEGER NOT NULL,
    hash       TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (
    account_id      TEXT NOT NULL,
    price_id        TEXT NOT NULL,
    period_start_us INTEGER NOT NULL,
    quantity        TEXT NOT NULL,
    amount          TEXT NOT NULL,
    PRIMARY KEY (account_id, price_id, period_start_us)
) WITHOUT ROWID;
"""

APPEND_ONLY_TABLES = ("records", "journal", "postings")


def _append_only_triggers() -> str:
    parts = []
    for table in APPEND_ONLY_TABLES:
        for op in ("UPDATE", "DELETE"):
            parts.append(
                f"CREATE TRIGGER IF NOT EXISTS {table}_no_{op.lower()} BEFORE {op} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, 'meterd: {table} is append-only'); END;"
            )
    return "\n".join(parts)


class SqliteLedger:
    """The ledger in one SQLite file (one shard)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.name = f"sqlite:{self.path}"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-sqlite")
        self._lock = asyncio.Lock()
        self._conn: sqlite3.Connection | None = None

    @classmethod
    async def open(cls, path: Path) -> SqliteLedger:
        store = cls(path)
        await store._run(store._connect)
        return store

    def _connect(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=10000")
        conn.executescript(SCHEMA + _append_only_triggers())
        self._conn = conn

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"{self.name}: {exc}") from exc

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreUnavailable(f"{self.name} is closed")
        return self._conn

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_SqliteTx]:
        """One unit of work. Whatever interrupts it (an error, a cancelled call, a failed
        COMMIT), a rollback is queued on the ledger thread behind the statements already
        sent, so the next unit of work never finds a transaction left open."""
        async with self._lock:
            try:
                await self._run(self.conn.execute, "BEGIN IMMEDIATE")
                yield _SqliteTx(self)
                await self._run(self.conn.execute, "COMMIT")
            except BaseException:
                rollback = asyncio.get_running_loop().run_in_executor(
                    self._executor, self._rollback_if_open
                )
                with contextlib.suppress(BaseException):
                    await asyncio.shield(rollback)
                raise

    def _rollback_if_open(self) -> None:
        conn = self._conn
        if conn is not None and conn.in_transaction:
            conn.execute("ROLLBACK")

    async def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        def fetch() -> list[tuple[Any, ...]]:
            return self.conn.execute(sql, params).fetchall()

        return await self._run(fetch)

    async def balances(self, account_id: str) -> dict[tuple[str, str], Decimal]:
        rows = await self._query(
            "SELECT ledger_account, currency, amount FROM balances WHERE account_id = ?",
            (account_id,),
        )
        return {(a, c): Decimal(v) for a, c, v in rows}

    async def usage(self, account_id: str) -> list[UsageTotal]:
        rows = await self._query(
            "SELECT metric, unit, quantity FROM records WHERE account_id = ? ORDER BY metric",
            (account_id,),
        )
        totals: dict[tuple[str, str], list[Decimal]] = {}
        for metric, unit, quantity in rows:
            totals.setdefault((metric, unit), []).append(Decimal(quantity))
        return [
            UsageTotal(m, u, sum(q, Decimal(0)), len(q)) for (m, u), q in sorted(totals.items())
        ]

    async def held(self, host_id: str | None = None) -> list[UsageRecord]:
        if host_id is None:
            rows = await self._query("SELECT record FROM held ORDER BY record_id")
        else:
            rows = await self._query(
                "SELECT record FROM held WHERE host_id = ? ORDER BY record_id", (host_id,)
            )
        return [record_from_json(r[0]) for r in rows]

    async def accounts(self) -> list[str]:
        rows = await self._query("SELECT account_id FROM chain_heads ORDER BY account_id")
        return [r[0] for r in rows]

    async def chain(self, account_id: str) -> AsyncIterator[ChainLink]:
        rows = await self._query(
            "SELECT entry_id, chain_seq, kind, memo, created_us, records_digest, prev_hash, hash"
            " FROM journal WHERE account_id = ? ORDER BY chain_seq",
            (account_id,),
        )
        for entry_id, seq, kind, memo, created_us, digest, prev_hash, hash_ in rows:
            postings = await self.postings_of(entry_id)
            entry = restore_entry(entry_id, account_id, kind, memo, created_us, postings, digest)
            yield ChainLink(entry, seq, prev_hash, hash_)

    async def postings_of(self, entry_id: str) -> list[Posting]:
        rows = await self._query(
            "SELECT ledger_account, currency, amount FROM postings WHERE entry_id = ?"
            " ORDER BY idx",
            (entry_id,),
        )
        return [Posting(a, c, Decimal(v)) for a, c, v in rows]

    async def balance_mismatches(self) -> list[str]:
        sums: dict[tuple[str, str, str], Decimal] = {}
        for acc, ledger_account, currency, amount in await self._query(
            "SELECT account_id, ledger_account, currency, amount FROM postings"
        ):
            key = (acc, ledger_account, currency)
            sums[key] = CONTEXT.add(sums.get(key, Decimal(0)), Decimal(amount))
        stored = {
            (a, la, c): Decimal(v)
            for a, la, c, v in await self._query(
                "SELECT account_id, ledger_account, currency, amount FROM balances"
            )
        }
        return describe_balance_mismatches(sums, stored)

    async def duplicate_record_ids(self) -> list[str]:
        rows = await self._query(
            "SELECT record_id FROM records GROUP BY record_id HAVING count(*) > 1"
        )
        return [r[0] for r in rows]

    async def unlinked_records(self) -> list[str]:
        return describe_unlinked(
            await self._query(ENTRY_RECORDS_SQL), await self._query(ORPHAN_RECORDS_SQL)
        )

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.get_running_loop().run_in_executor(self._executor, conn.close)
        self._executor.shutdown(wait=True)


class _SqliteTx:
    def __init__(self, store: SqliteLedger) -> None:
        self._store = store

    async def insert_records(
        self, account_id: str, entry_id: str, records: Sequence[UsageRecord], received_us: int
    ) -> set[str]:
        def insert() -> set[str]:
            conn = self._store.conn
            new: set[str] = set()
            for r in sorted(records, key=lambda r: r.id):
                cur = conn.execute(
                    "INSERT INTO records VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
                    " ON CONFLICT (record_id) DO NOTHING",
                    (
                        r.id, account_id, entry_id, r.host_id, r.metric, r.unit, r.quantity_text,
                        r.start_us, r.end_us, r.seq, json.dumps(dict(r.labels), sort_keys=True),
                        received_us,
                    ),
                )
                if cur.rowcount == 1:
                    new.add(r.id)
            return new

        return await self._store._run(insert)

    async def hold(self, records: Sequence[UsageRecord], received_us: int) -> set[str]:
        def insert() -> set[str]:
            conn = self._store.conn
            new: set[str] = set()
            for r in records:
                known = conn.execute(
                    "SELECT 1 FROM records WHERE record_id = ?", (r.id,)
                ).fetchone()
                if known:
                    continue
                cur = conn.execute(
                    "INSERT INTO held VALUES (?,?,?,?) ON CONFLICT (record_id) DO NOTHING",
                    (r.id, r.host_id, record_to_json(r), received_us),
                )
                if cur.rowcount == 1:
                    new.add(r.id)
            return new

        return await self._store._run(insert)

    async def release(self, record_ids: Sequence[str]) -> None:
        def delete() -> None:
            self._store.conn.executemany(
                "DELETE FROM held WHERE record_id = ?", [(i,) for i in record_ids]
            )

        await self._store._run(delete)

    async def load_counters(self, keys: Sequence[CounterKey]) -> dict[CounterKey, Counter]:
        def load() -> dict[CounterKey, Counter]:
            found: dict[CounterKey, Counter] = {}
            for k in keys:
                row = self._store.conn.execute(
                    "SELECT quantity, amount FROM counters"
                    " WHERE account_id = ? AND price_id = ? AND period_start_us = ?",
                    (k.account_id, k.price_id, k.period_start_us),
                ).fetchone()
                if row:
                    found[k] = Counter(Decimal(row[0]), Decimal(row[1]))
            return found

        return await self._store._run(load)

    async def save_counters(self, values: Mapping[CounterKey, Counter]) -> None:
        def save() -> None:
            self._store.conn.executemany(
                "INSERT INTO counters VALUES (?,?,?,?,?) ON CONFLICT DO UPDATE"
                " SET quantity = excluded.quantity, amount = excluded.amount",
                [
                    (
                        k.account_id, k.price_id, k.period_start_us,
                        canonical_text(v.quantity), canonical_text(v.amount),
                    )
                    for k, v in sorted(values.items())
                ],
            )

        await self._store._run(save)

    async def append_entry(self, entry: JournalEntry) -> ChainLink:
        def append() -> ChainLink:
            conn = self._store.conn
            head = conn.execute(
                "SELECT chain_seq, hash FROM chain_heads WHERE account_id = ?",
                (entry.account_id,),
            ).fetchone()
            seq, prev = (head[0] + 1, head[1]) if head else (1, GENESIS_HASH)
            digest = entry_hash(entry, seq, prev)
            conn.execute(
                "INSERT INTO journal VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    entry.id, entry.account_id, seq, entry.kind, entry.memo, entry.created_us,
                    entry.records_digest, prev, digest,
                ),
            )
            conn.executemany(
                "INSERT INTO postings VALUES (?,?,?,?,?,?)",
                [
                    (entry.id, i, entry.account_id, p.ledger_account, p.currency,
                     canonical_text(p.amount))
                    for i, p in enumerate(entry.postings)
                ],
            )
            for p in entry.postings:
                row = conn.execute(
                    "SELECT amount FROM balances"
                    " WHERE account_id = ? AND ledger_account = ? AND currency = ?",
                    (entry.account_id, p.ledger_account, p.currency),
                ).fetchone()
                total = CONTEXT.add(Decimal(row[0]) if row else Decimal(0), p.amount)
                conn.execute(
                    "INSERT INTO balances VALUES (?,?,?,?) ON CONFLICT DO UPDATE"
                    " SET amount = excluded.amount",
                    (entry.account_id, p.ledger_account, p.currency, canonical_text(total)),
                )
            conn.execute(
                "INSERT INTO chain_heads VALUES (?,?,?) ON CONFLICT DO UPDATE"
                " SET chain_seq = excluded.chain_seq, hash = excluded.hash",
                (entry.account_id, seq, digest),
            )
            return ChainLink(entry, seq, prev, digest)

        return await self._store._run(append)
