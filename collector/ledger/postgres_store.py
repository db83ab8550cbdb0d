"""One PostgreSQL shard of the ledger, through asyncpg.

A unit of work is one transaction on one pooled connection (READ COMMITTED). The
unique key on ``records.record_id`` decides which of two concurrent collectors posts a
record: the loser's ``INSERT ... ON CONFLICT DO NOTHING`` waits for the winner's commit
and then inserts nothing, so it answers ``duplicate``. Counters and chain heads are
locked in a fixed order (sorted keys, then accounts in order), so concurrent
transactions queue instead of deadlocking.

Append-only: a trigger refuses UPDATE, DELETE and TRUNCATE on records, journal and
postings for every role; amounts are NUMERIC.

Round trips: a posting transaction costs BEGIN, the record insert, the counter lock
(which creates missing counters at zero, so that they can be locked too), the
chain-head lock and one statement that writes the journal entry, its postings,
balances, the saved counters and the new chain head together, then COMMIT. Counters
saved with :meth:`_PgTx.save_counters` are written with the next entry, or before the
next counter read or the commit, whichever comes first.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

import asyncpg

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
from common.records import UsageRecord

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    record_id   TEXT PRIMARY KEY,
    account_id  TEXT NOT NULL,
    entry_id    TEXT NOT NULL,
    host_id     TEXT NOT NULL,
    metric      TEXT NOT NULL,
    unit        TEXT NOT NULL,
    quantity    NUMERIC NOT NULL,
    start_us    BIGINT NOT NULL,
    end_us      BIGINT NOT NULL,
    seq         BIGINT NOT NULL,
    labels      JSONB NOT NULL,
    received_us BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS records_account ON records (account_id, metric);
CREATE INDEX IF NOT EXISTS records_entry ON records (entry_id);
CREATE TABLE IF NOT EXISTS held (
    record_id   TEXT PRIMARY KEY,
    host_id     TEXT NOT NULL,
    record      TEXT NOT NULL,
    received_us BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS journal (
    entry_id       TEXT PRIMARY KEY,
    account_id     TEXT NOT NULL,
    chain_seq      BIGINT NOT NULL,
    kind           TEXT NOT NULL,
    memo           TEXT NOT NULL,
    created_us     BIGINT NOT NULL,
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
    amount         NUMERIC NOT NULL,
    PRIMARY KEY (entry_id, idx)
);
CREATE TABLE IF NOT EXISTS balances (
    account_id     TEXT NOT NULL,
    ledger_account TEXT NOT NULL,
    currency       TEXT NOT NULL,
    amount         NUMERIC NOT NULL,
    PRIMARY KEY (account_id, ledger_account, currency)
);
CREATE TABLE IF NOT EXISTS chain_heads (
    account_id TEXT PRIMARY KEY,
    chain_seq  BIGINT NOT NULL,
    hash       TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    account_id      TEXT NOT NULL,
    price_id        TEXT NOT NULL,
    period_start_us BIGINT NOT NULL,
    quantity        NUMERIC NOT NULL,
    amount          NUMERIC NOT NULL,
    PRIMARY KEY (account_id, price_id, period_start_us)
);
CREATE OR REPLACE FUNCTION meterd_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'meterd: % on % is refused: the ledger is append-only', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END $$;
DO $$
DECLARE t TEXT;
BEGIN
    FOREACH t IN ARRAY ARRAY['records', 'journal', 'postings'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = t || '_append_only') THEN
            EXECUTE format('CREATE TRIGGER %I BEFORE UPDATE OR DELETE ON %I FOR EACH ROW'
                           ' EXECUTE FUNCTION meterd_append_only()', t || '_append_only', t);
            EXECUTE format('CREATE TRIGGER %I BEFORE TRUNCATE ON %I FOR EACH STATEMENT'
                           ' EXECUTE FUNCTION meterd_append_only()', t || '_no_truncate', t);
        END IF;
    END LOOP;
END $$;
"""

# Errors that mean "the database is not reachable or not accepting work right now".
UNAVAILABLE = (
    OSError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
    TimeoutError,
)

# The new ids come back as one array, not one result row per record.
_INSERT_RECORDS = (
    "WITH new AS (INSERT INTO records SELECT r.id, $1, $2, r.host, r.metric, r.unit,"
    " r.q::numeric, r.s, r.e, r.seq, r.labels::jsonb, $3"
    " FROM unnest($4::text[], $5::text[], $6::text[], $7::text[], $8::text[],"
    " $9::bigint[], $10::bigint[], $11::bigint[], $12::text[])"
    " AS r(id, host, metric, unit, q, s, e, seq, labels)"
    " ON CONFLICT (record_id) DO NOTHING RETURNING record_id)"
    " SELECT coalesce(array_agg(record_id), '{}') FROM new"
)
# Locks every counter a batch touches, creating the missing ones at zero first: a
# counter that does not exist yet cannot be locked with SELECT ... FOR UPDATE, and two
# transactions rating the first usage of a period would then both start from zero and
# the later one would overwrite the other's quantity. With the upsert the later one
# waits for the earlier one's commit and reads its result. Sorted keys, fixed order.
_LOCK_COUNTERS = (
    "INSERT INTO counters SELECT k.a, k.p, k.s, 0, 0"
    " FROM unnest($1::text[], $2::text[], $3::bigint[]) AS k(a, p, s) ORDER BY k.a, k.p, k.s"
    " ON CONFLICT (account_id, price_id, period_start_us)"
    " DO UPDATE SET quantity = counters.quantity"
    " RETURNING account_id, price_id, period_start_us, quantity, amount"
)
_SAVE_COUNTERS = (
    "INSERT INTO counters SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[],"
    " $4::numeric[], $5::numeric[]) ON CONFLICT (account_id, price_id, period_start_us)"
    " DO UPDATE SET quantity = EXCLUDED.quantity, amount = EXCLUDED.amount"
)
_LOCK_HEAD = "SELECT chain_seq, hash FROM chain_heads WHERE account_id = $1 FOR UPDATE"
_NEW_HEAD = "INSERT INTO chain_heads VALUES ($1, 0, $2) ON CONFLICT (account_id) DO NOTHING"
# The sub-statements touch different tables, so their order within the statement does
# not matter; all of them run to completion whether or not the UPDATE reads them.
_APPEND_ENTRY = (
    "WITH journal_row AS (INSERT INTO journal VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)),"
    " posting_rows AS (INSERT INTO postings SELECT $1, p.i, $2, p.a, p.c, p.v"
    " FROM unnest($10::int[], $11::text[], $12::text[], $13::numeric[]) AS p(i, a, c, v)),"
    " balance_rows AS (INSERT INTO balances SELECT $2, b.a, b.c, sum(b.v)"
    " FROM unnest($11::text[], $12::text[], $13::numeric[]) AS b(a, c, v)"
    " GROUP BY b.a, b.c ORDER BY b.a, b.c"
    " ON CONFLICT (account_id, ledger_account, currency)"
    " DO UPDATE SET amount = balances.amount + EXCLUDED.amount),"
    " counter_rows AS (INSERT INTO counters SELECT * FROM unnest($14::text[], $15::text[],"
    " $16::bigint[], $17::numeric[], $18::numeric[])"
    " ON CONFLICT (account_id, price_id, period_start_us)"
    " DO UPDATE SET quantity = EXCLUDED.quantity, amount = EXCLUDED.amount)"
    " UPDATE chain_heads SET chain_seq = $3, hash = $9 WHERE account_id = $2"
)
_LABELS_JSON = json.JSONEncoder(sort_keys=True)


def _counter_columns(
    ordered: Sequence[tuple[CounterKey, Counter]],
) -> tuple[list[str], list[str], list[int], list[Decimal], list[Decimal]]:
    return (
        [k.account_id for k, _ in ordered],
        [k.price_id for k, _ in ordered],
        [k.period_start_us for k, _ in ordered],
        [v.quantity for _, v in ordered],
        [v.amount for _, v in ordered],
    )


def _record_id(record: UsageRecord) -> str:
    return record.id


@functools.lru_cache(maxsize=4096)
def _labels_items_json(items: tuple[tuple[str, str], ...]) -> str:
    return _LABELS_JSON.encode(dict(items))


def _labels_json(labels: Mapping[str, str]) -> str:
    """The labels as JSON text; a fleet repeats a few label sets, each encoded once."""
    return _labels_items_json(tuple(labels.items()))


_SCHEMA_LOCK = 0x6D65746572  # advisory lock id ("meter") serialising schema creation


async def _nothing_to_reset(conn: asyncpg.Connection) -> None:
    """Pool release hook. The ledger leaves no session state on a connection (no SET,
    LISTEN, cursor or session advisory lock; its one advisory lock is transaction
    scoped) and asyncpg rolls back any open transaction before calling this, so the
    round trip of asyncpg's default reset query (RESET ALL, UNLISTEN *, ...) after
    every transaction is skipped."""


class PostgresLedger:
    """One shard: a connection pool to one PostgreSQL database."""

    def __init__(self, dsn: str, pool: asyncpg.Pool, name: str) -> None:
        self.dsn = dsn
        self.name = name
        self._pool = pool

    @classmethod
    async def open(
        cls, dsn: str, *, name: str | None = None, min_size: int = 1, max_size: int = 10
    ) -> PostgresLedger:
        try:
            pool = await asyncpg.create_pool(
                dsn, min_size=min_size, max_size=max_size, command_timeout=60,
                reset=_nothing_to_reset,
            )
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
                await conn.execute(SCHEMA)
        except UNAVAILABLE as exc:
            raise StoreUnavailable(f"PostgreSQL shard {name or dsn}: {exc}") from exc
        return cls(dsn, pool, name or _redact(dsn))

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_PgTx]:
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                tx = _PgTx(conn)
                yield tx
                await tx.flush()
        except UNAVAILABLE as exc:
            raise StoreUnavailable(f"{self.name}: {type(exc).__name__}: {exc}") from exc

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        try:
            async with self._pool.acquire() as conn:
                return list(await conn.fetch(sql, *args))
        except UNAVAILABLE as exc:
            raise StoreUnavailable(f"{self.name}: {type(exc).__name__}: {exc}") from exc

    async def ping(self) -> None:
        await self._fetch("SELECT 1")

    async def balances(self, account_id: str) -> dict[tuple[str, str], Decimal]:
        rows = await self._fetch(
            "SELECT ledger_account, currency, amount FROM balances WHERE account_id = $1",
            account_id,
        )
        return {(r[0], r[1]): r[2] for r in rows}

    async def usage(self, account_id: str) -> list[UsageTotal]:
        rows = await self._fetch(
            "SELECT metric, unit, sum(quantity), count(*) FROM records WHERE account_id = $1"
            " GROUP BY metric, unit ORDER BY metric, unit",
            account_id,
        )
        return [UsageTotal(r[0], r[1], r[2], r[3]) for r in rows]

    async def held(self, host_id: str | None = None) -> list[UsageRecord]:
        if host_id is None:
            rows = await self._fetch("SELECT record FROM held ORDER BY record_id")
        else:
            rows = await self._fetch(
                "SELECT record FROM held WHERE host_id = $1 ORDER BY record_id", host_id
            )
        return [record_from_json(r[0]) for r in rows]

    async def accounts(self) -> list[str]:
        rows = await self._fetch("SELECT account_id FROM chain_heads ORDER BY account_id")
        return [r[0] for r in rows]

    async def chain(self, account_id: str) -> AsyncIterator[ChainLink]:
        entries = await self._fetch(
            "SELECT entry_id, chain_seq, kind, memo, created_us, records_digest, prev_hash, hash"
            " FROM journal WHERE account_id = $1 ORDER BY chain_seq",
            account_id,
        )
        postings: dict[str, list[Posting]] = {}
        for r in await self._fetch(
            "SELECT entry_id, ledger_account, currency, amount FROM postings"
            " WHERE account_id = $1 ORDER BY entry_id, idx",
            account_id,
        ):
            postings.setdefault(r[0], []).append(Posting(r[1], r[2], r[3]))
        for e in entries:
            entry = restore_entry(e[0], account_id, e[2], e[3], e[4], postings.get(e[0], []), e[5])
            yield ChainLink(entry, e[1], e[6], e[7])

    async def postings_of(self, entry_id: str) -> list[Posting]:
        rows = await self._fetch(
            "SELECT ledger_account, currency, amount FROM postings WHERE entry_id = $1"
            " ORDER BY idx",
            entry_id,
        )
        return [Posting(r[0], r[1], r[2]) for r in rows]

    async def balance_mismatches(self) -> list[str]:
        sums = {
            (r[0], r[1], r[2]): r[3]
            for r in await self._fetch(
                "SELECT account_id, ledger_account, currency, sum(amount) FROM postings"
                " GROUP BY account_id, ledger_account, currency"
            )
        }
        stored = {
            (r[0], r[1], r[2]): r[3]
            for r in await self._fetch(
                "SELECT account_id, ledger_account, currency, amount FROM balances"
            )
        }
        return describe_balance_mismatches(sums, stored)

    async def duplicate_record_ids(self) -> list[str]:
        rows = await self._fetch(
            "SELECT record_id FROM records GROUP BY record_id HAVING count(*) > 1"
        )
        return [r[0] for r in rows]

    async def unlinked_records(self) -> list[str]:
        return describe_unlinked(
            await self._fetch(ENTRY_RECORDS_SQL), await self._fetch(ORPHAN_RECORDS_SQL)
        )

    async def close(self) -> None:
        await self._pool.close()


class _PgTx:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self._counters: list[tuple[CounterKey, Counter]] = []  # saved, not yet written

    async def flush(self) -> None:
        """Write the counters saved since the last write."""
        if self._counters:
            ordered, self._counters = self._counters, []
            await self._conn.execute(_SAVE_COUNTERS, *_counter_columns(ordered))

    async def insert_records(
        self, account_id: str, entry_id: str, records: Sequence[UsageRecord], received_us: int
    ) -> set[str]:
        if not records:
            return set()
        # One pass over the records, then one column per array parameter.
        columns = zip(
            *[
                (r.id, r.host_id, r.metric, r.unit, r.quantity_text, r.start_us, r.end_us,
                 r.seq, _labels_json(r.labels))
                for r in sorted(records, key=_record_id)
            ],
            strict=True,
        )
        new: list[str] = await self._conn.fetchval(
            _INSERT_RECORDS, account_id, entry_id, received_us, *columns
        )
        return set(new)

    async def hold(self, records: Sequence[UsageRecord], received_us: int) -> set[str]:
        ordered = sorted(records, key=lambda r: r.id)
        rows = await self._conn.fetch(
            "INSERT INTO held SELECT r.id, r.host, r.record, $1"
            " FROM unnest($2::text[], $3::text[], $4::text[]) AS r(id, host, record)"
            " WHERE NOT EXISTS (SELECT 1 FROM records WHERE record_id = r.id)"
            " ON CONFLICT (record_id) DO NOTHING RETURNING record_id",
            received_us,
            [r.id for r in ordered],
            [r.host_id for r in ordered],
            [record_to_json(r) for r in ordered],
        )
        return {r[0] for r in rows}

    async def release(self, record_ids: Sequence[str]) -> None:
        await self._conn.execute("DELETE FROM held WHERE record_id = ANY($1::text[])", record_ids)

    async def load_counters(self, keys: Sequence[CounterKey]) -> dict[CounterKey, Counter]:
        await self.flush()
        ordered = sorted(set(keys))
        if not ordered:
            return {}
        rows = await self._conn.fetch(
            _LOCK_COUNTERS,
            [k.account_id for k in ordered],
            [k.price_id for k in ordered],
            [k.period_start_us for k in ordered],
        )
        return {CounterKey(r[0], r[1], r[2]): Counter(r[3], r[4]) for r in rows}

    async def save_counters(self, values: Mapping[CounterKey, Counter]) -> None:
        await self.flush()
        self._counters = sorted(values.items())

    async def append_entry(self, entry: JournalEntry) -> ChainLink:
        conn = self._conn
        head = await conn.fetchrow(_LOCK_HEAD, entry.account_id)
        if head is None:  # the account's first entry: create its chain head, then lock it
            await conn.execute(_NEW_HEAD, entry.account_id, GENESIS_HASH)
            head = await conn.fetchrow(_LOCK_HEAD, entry.account_id)
            assert head is not None
        seq, prev = head[0] + 1, head[1]
        digest = entry_hash(entry, seq, prev)
        counters, self._counters = self._counters, []
        postings = entry.postings
        await conn.execute(
            _APPEND_ENTRY,
            entry.id, entry.account_id, seq, entry.kind, entry.memo, entry.created_us,
            entry.records_digest, prev, digest,
            list(range(len(postings))),
            [p.ledger_account for p in postings],
            [p.currency for p in postings],
            [p.amount for p in postings],
            *_counter_columns(counters),
        )
        return ChainLink(entry, seq, prev, digest)


def _redact(dsn: str) -> str:
    """The DSN without its password, for logs and messages."""
    if "@" in dsn and "://" in dsn:
        scheme, rest = dsn.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}@{host}"
    return dsn
