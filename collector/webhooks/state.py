"""Webhook subscriptions and their delivery state, kept on the control shard.

Tables (created when the worker or a command first opens them):

* ``webhook_subscriptions``: endpoint URL, sealed secret (see
  :mod:`collector.webhooks.secretbox`), event-type filter, enabled flag; and the
  subscription's runtime state: the next delivery sequence to hand out and the lease
  of the worker that is sending to it.
* ``webhook_cursors``: per subscription and outbox (each shard's outbox has a random
  ``source`` id of its own, so reordering shards in the configuration moves nothing),
  the last outbox sequence already turned into deliveries.
* ``webhook_deliveries``: one row per (subscription, event): the body as sent, its
  per-subscription ``seq``, and what happened: ``pending`` (with the time of the next
  try), ``delivered`` or ``dead`` (the tries ran out), tries so far, the last HTTP
  status and error.

Fan-out reads an outbox (on its own shard) past the lowest cursor, then, in one
control-shard transaction with the subscriptions locked, re-reads each cursor, queues
the events past it that the subscription's filter takes, numbering them on from its
``next_seq``, and moves the cursor. Two collectors fanning out at once therefore queue
each event once. Sending happens outside any transaction: :meth:`WebhookState.claim`
takes the subscription's lease and its lowest pending delivery, the worker sends it,
then records the outcome. A subscription is sent to by one worker at a time, one
delivery at a time, so deliveries arrive in ``seq`` order.

The SQL is written once, with ``$n`` parameters, for both stores (SQLite reads them as
``?n``, and every SQLite unit of work already holds the file's write lock, so ``FOR
UPDATE`` is dropped there).
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import asyncpg

from collector.ledger.outbox import OutboxEvent
from collector.ledger.postgres_store import PostgresLedger
from collector.ledger.sqlite_store import SqliteLedger
from collector.ledger.store import LedgerStore, LedgerTx
from collector.webhooks.payload import delivery_body, matches

T = TypeVar("T")

PENDING = "pending"
DELIVERED = "delivered"
DEAD = "dead"
STATUSES = (PENDING, DELIVERED, DEAD)

_SCHEMA_LOCK = 0x77656268  # advisory lock id ("webh") serialising schema creation

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS webhook_subscriptions (
        subscription_id TEXT PRIMARY KEY,
        url             TEXT NOT NULL,
        description     TEXT NOT NULL,
        event_types     TEXT NOT NULL,
        enabled         BIGINT NOT NULL,
        secret_sealed   TEXT NOT NULL,
        created_us      BIGINT NOT NULL,
        next_seq        BIGINT NOT NULL,
        lease_owner     TEXT NOT NULL,
        lease_until_us  BIGINT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS webhook_cursors (
        subscription_id TEXT NOT NULL,
        source          TEXT NOT NULL,
        outbox_seq      BIGINT NOT NULL,
        PRIMARY KEY (subscription_id, source)
    )""",
    """CREATE TABLE IF NOT EXISTS webhook_deliveries (
        subscription_id TEXT NOT NULL,
        seq             BIGINT NOT NULL,
        event_id        TEXT NOT NULL,
        event_type      TEXT NOT NULL,
        account_id      TEXT NOT NULL,
        body            TEXT NOT NULL,
        status          TEXT NOT NULL,
        attempts        BIGINT NOT NULL,
        next_attempt_us BIGINT NOT NULL,
        last_attempt_us BIGINT NOT NULL,
        last_status     BIGINT NOT NULL,
        last_error      TEXT NOT NULL,
        delivered_us    BIGINT NOT NULL,
        PRIMARY KEY (subscription_id, seq),
        UNIQUE (subscription_id, event_id)
    )""",
    """CREATE INDEX IF NOT EXISTS webhook_deliveries_status
        ON webhook_deliveries (subscription_id, status, seq)""",
)


@dataclass(frozen=True, slots=True)
class Subscription:
    id: str
    url: str
    description: str
    event_types: tuple[str, ...]  # empty: every event type
    enabled: bool
    created_us: int


@dataclass(frozen=True, slots=True)
class SubscriptionSummary:
    subscription: Subscription
    pending: int
    delivered: int
    dead: int
    last_delivered_us: int  # 0: never
    sequences: int  # deliveries queued so far (the last sequence handed out)


@dataclass(frozen=True, slots=True)
class Delivery:
    subscription_id: str
    seq: int
    event_id: str
    event_type: str
    account_id: str
    body: str
    status: str
    attempts: int
    next_attempt_us: int
    last_attempt_us: int
    last_status: int  # HTTP status of the last try; 0: no answer
    last_error: str
    delivered_us: int


@dataclass(frozen=True, slots=True)
class Claim:
    """The next delivery of a subscription, leased to one worker until ``lease_until_us``."""

    delivery: Delivery
    url: str
    sealed_secret: str


_SUBSCRIPTION_COLUMNS = "subscription_id, url, description, event_types, enabled, created_us"
_DELIVERY_COLUMNS = (
    "subscription_id, seq, event_id, event_type, account_id, body, status, attempts,"
    " next_attempt_us, last_attempt_us, last_status, last_error, delivered_us"
)


def _subscription(row: Sequence[Any]) -> Subscription:
    return Subscription(row[0], row[1], row[2], tuple(json.loads(row[3])), bool(row[4]), row[5])


def _delivery(row: Sequence[Any]) -> Delivery:
    return Delivery(*row)


AuditHook = Callable[[LedgerTx, Any], Awaitable[object]]
"""Called inside a change's transaction with the transaction and the change's result, to
append its audit row (:func:`collector.audit.append`) so that both commit together."""


class Sql(Protocol):
    """One unit of work on a store, speaking the SQL of this module."""

    @property
    def tx(self) -> LedgerTx:
        """The store's own unit of work this runs in."""

    async def fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]: ...

    async def execute(self, sql: str, *args: Any) -> int:
        """Run one statement; the number of rows it changed."""

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...


class _SqliteUnit(LedgerTx, Protocol):
    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T: ...


_PARAM = re.compile(r"\$(\d+)")


def _sqlite_text(sql: str) -> str:
    return _PARAM.sub(r"?\1", sql.replace(" FOR UPDATE", ""))


class _SqliteSql:
    def __init__(self, tx: _SqliteUnit) -> None:
        self._tx = tx

    @property
    def tx(self) -> LedgerTx:
        return self._tx

    async def fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        text = _sqlite_text(sql)
        return await self._tx.call(lambda c: list(c.execute(text, args).fetchall()))

    async def execute(self, sql: str, *args: Any) -> int:
        text = _sqlite_text(sql)
        return await self._tx.call(lambda c: c.execute(text, args).rowcount)

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        text = _sqlite_text(sql)
        await self._tx.call(lambda c: c.executemany(text, rows))


class _PgSql:
    def __init__(self, tx: LedgerTx, conn: asyncpg.Connection) -> None:
        self._tx = tx
        self._conn = conn

    @property
    def tx(self) -> LedgerTx:
        return self._tx

    async def fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        return [tuple(r) for r in await self._conn.fetch(sql, *args)]

    async def execute(self, sql: str, *args: Any) -> int:
        status: str = await self._conn.execute(sql, *args)
        last = status.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else 0

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            await self._conn.executemany(sql, rows)


@asynccontextmanager
async def unit(store: LedgerStore) -> AsyncIterator[Sql]:
    """One transaction on ``store`` (an embedded SQLite file or a PostgreSQL shard)."""
    if isinstance(store, SqliteLedger):
        async with store.transaction() as stx:
            yield _SqliteSql(stx)
    elif isinstance(store, PostgresLedger):
        async with store.transaction() as ptx:
            yield _PgSql(ptx, ptx.connection)
    else:
        raise TypeError(f"webhooks need a SQLite or PostgreSQL ledger store, not {store!r}")


# --- the outbox of each shard, as the worker reads it -------------------------------------


async def outbox_position(store: LedgerStore) -> tuple[str, int]:
    """The outbox's source id and its last sequence."""
    async with unit(store) as sql:
        rows = await sql.fetch("SELECT source, last_seq FROM outbox_head WHERE id = 1")
    return rows[0][0], rows[0][1]


async def outbox_after(store: LedgerStore, after_seq: int, limit: int) -> list[OutboxEvent]:
    """Committed events past ``after_seq``, in sequence order. Sequence order is commit
    order on each shard, so what one read returns is complete up to its last event."""
    async with unit(store) as sql:
        rows = await sql.fetch(
            "SELECT seq, event_id, event_type, account_id, data, created_us FROM outbox"
            " WHERE seq > $1 ORDER BY seq LIMIT $2",
            after_seq, limit,
        )
    return [OutboxEvent(*r) for r in rows]


# --- subscriptions and deliveries, on the control shard -----------------------------------


class WebhookState:
    def __init__(self, control: LedgerStore) -> None:
        self.control = control

    @classmethod
    async def open(cls, control: LedgerStore) -> WebhookState:
        async with unit(control) as sql:
            if isinstance(control, PostgresLedger):
                await sql.fetch("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
            for statement in SCHEMA:
                await sql.execute(statement)
        return cls(control)

    # subscriptions

    async def create(
        self,
        sub: Subscription,
        sealed_secret: str,
        cursors: Mapping[str, int],
        audit: AuditHook | None = None,
    ) -> None:
        """Store a subscription whose deliveries start after ``cursors`` (outbox source
        to sequence; an outbox not named starts from its beginning)."""
        async with unit(self.control) as sql:
            await sql.execute(
                "INSERT INTO webhook_subscriptions VALUES ($1,$2,$3,$4,$5,$6,$7,1,'',0)",
                sub.id, sub.url, sub.description, json.dumps(list(sub.event_types)),
                int(sub.enabled), sealed_secret, sub.created_us,
            )
            await sql.executemany(
                "INSERT INTO webhook_cursors VALUES ($1, $2, $3)",
                [(sub.id, source, seq) for source, seq in sorted(cursors.items())],
            )
            if audit is not None:
                await audit(sql.tx, sub)

    async def get(self, subscription_id: str) -> Subscription | None:
        async with unit(self.control) as sql:
            rows = await sql.fetch(
                f"SELECT {_SUBSCRIPTION_COLUMNS} FROM webhook_subscriptions"
                " WHERE subscription_id = $1",
                subscription_id,
            )
        return _subscription(rows[0]) if rows else None

    async def summaries(self) -> list[SubscriptionSummary]:
        async with unit(self.control) as sql:
            subs = await sql.fetch(
                f"SELECT {_SUBSCRIPTION_COLUMNS}, next_seq FROM webhook_subscriptions"
                " ORDER BY subscription_id"
            )
            counts = await sql.fetch(
                "SELECT subscription_id, status, count(*), max(delivered_us)"
                " FROM webhook_deliveries GROUP BY subscription_id, status"
            )
        by_sub: dict[str, dict[str, tuple[int, int]]] = {}
        for sub_id, status, count, last in counts:
            by_sub.setdefault(sub_id, {})[status] = (count, last or 0)
        out = []
        for row in subs:
            c = by_sub.get(row[0], {})
            out.append(
                SubscriptionSummary(
                    _subscription(row),
                    pending=c.get(PENDING, (0, 0))[0],
                    delivered=c.get(DELIVERED, (0, 0))[0],
                    dead=c.get(DEAD, (0, 0))[0],
                    last_delivered_us=c.get(DELIVERED, (0, 0))[1],
                    sequences=row[6] - 1,
                )
            )
        return out

    async def set_enabled(
        self, subscription_id: str, enabled: bool, audit: AuditHook | None = None
    ) -> Subscription | None:
        """The subscription as changed; None if there is none with this id."""
        async with unit(self.control) as sql:
            changed = await sql.execute(
                "UPDATE webhook_subscriptions SET enabled = $2 WHERE subscription_id = $1",
                subscription_id, int(enabled),
            )
            if changed != 1:
                return None
            rows = await sql.fetch(
                f"SELECT {_SUBSCRIPTION_COLUMNS} FROM webhook_subscriptions"
                " WHERE subscription_id = $1",
                subscription_id,
            )
            after = _subscription(rows[0])
            if audit is not None:
                await audit(sql.tx, after)
        return after

    async def remove(self, subscription_id: str, audit: AuditHook | None = None) -> bool:
        """Delete the subscription with its cursors and deliveries."""
        async with unit(self.control) as sql:
            removed = await sql.execute(
                "DELETE FROM webhook_subscriptions WHERE subscription_id = $1", subscription_id
            )
            await sql.execute(
                "DELETE FROM webhook_cursors WHERE subscription_id = $1", subscription_id
            )
            await sql.execute(
                "DELETE FROM webhook_deliveries WHERE subscription_id = $1", subscription_id
            )
            if removed == 1 and audit is not None:
                await audit(sql.tx, None)
        return removed == 1

    # fan-out

    async def cursor_floor(self, source: str) -> int | None:
        """The lowest cursor of any subscription on outbox ``source``; None without any
        subscription."""
        async with unit(self.control) as sql:
            rows = await sql.fetch(
                "SELECT count(*), min(coalesce(c.outbox_seq, 0)) FROM webhook_subscriptions s"
                " LEFT JOIN webhook_cursors c"
                " ON c.subscription_id = s.subscription_id AND c.source = $1",
                source,
            )
        count, floor = rows[0]
        return None if count == 0 else int(floor)

    async def fan_out(self, source: str, events: Sequence[OutboxEvent], now_us: int) -> int:
        """Queue ``events`` (consecutive outbox events of ``source``) for every
        subscription whose cursor they pass and whose filter takes them; the number of
        deliveries queued. Disabled subscriptions queue too: they send once enabled."""
        if not events:
            return 0
        async with unit(self.control) as sql:
            subs = await sql.fetch(
                "SELECT subscription_id, event_types, next_seq FROM webhook_subscriptions"
                " ORDER BY subscription_id FOR UPDATE"
            )
            cursors = {
                r[0]: r[1]
                for r in await sql.fetch(
                    "SELECT subscription_id, outbox_seq FROM webhook_cursors WHERE source = $1",
                    source,
                )
            }
            queued: list[tuple[Any, ...]] = []
            moved: list[tuple[Any, ...]] = []
            for sub_id, types_json, next_seq in subs:
                filters = json.loads(types_json)
                cursor = cursors.get(sub_id, 0)
                seq, last = next_seq, cursor
                for event in events:
                    if event.seq <= cursor:
                        continue
                    last = event.seq
                    if matches(filters, event.event_type):
                        queued.append(
                            (sub_id, seq, event.event_id, event.event_type, event.account_id,
                             delivery_body(event, seq), PENDING, 0, now_us, 0, 0, "", 0)
                        )
                        seq += 1
                if last > cursor:
                    moved.append((sub_id, source, last, seq))
            await sql.executemany(
                "INSERT INTO webhook_deliveries VALUES"
                " ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13)",
                queued,
            )
            await sql.executemany(
                "INSERT INTO webhook_cursors VALUES ($1, $2, $3)"
                " ON CONFLICT (subscription_id, source) DO UPDATE SET outbox_seq = $3",
                [m[:3] for m in moved],
            )
            await sql.executemany(
                "UPDATE webhook_subscriptions SET next_seq = $2 WHERE subscription_id = $1",
                [(m[0], m[3]) for m in moved],
            )
        return len(queued)

    # sending

    async def due(self, now_us: int, owner: str) -> list[str]:
        """Enabled subscriptions whose lowest pending delivery is due and that no other
        worker holds."""
        async with unit(self.control) as sql:
            rows = await sql.fetch(
                "SELECT s.subscription_id FROM webhook_subscriptions s"
                " JOIN webhook_deliveries d ON d.subscription_id = s.subscription_id"
                " WHERE s.enabled = 1"
                " AND (s.lease_owner = '' OR s.lease_owner = $2 OR s.lease_until_us <= $1)"
                " AND d.status = 'pending' AND d.next_attempt_us <= $1"
                " AND d.seq = (SELECT min(h.seq) FROM webhook_deliveries h"
                " WHERE h.subscription_id = s.subscription_id AND h.status = 'pending')"
                " ORDER BY s.subscription_id",
                now_us, owner,
            )
        return [r[0] for r in rows]

    async def claim(
        self, subscription_id: str, owner: str, now_us: int, lease_until_us: int
    ) -> Claim | None:
        """Lease the subscription to ``owner`` and return its lowest pending delivery
        if that one is due; otherwise give the lease back and return None. A lease of
        ``owner``'s with more than half its length left is kept as it is (no write)."""
        async with unit(self.control) as sql:
            rows = await sql.fetch(
                "SELECT enabled, lease_owner, lease_until_us, url, secret_sealed"
                " FROM webhook_subscriptions WHERE subscription_id = $1 FOR UPDATE",
                subscription_id,
            )
            if not rows:
                return None
            enabled, lease_owner, lease_until, url, sealed = rows[0]
            if lease_owner not in ("", owner) and lease_until > now_us:
                return None  # another worker is sending to it
            head = await sql.fetch(
                f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries"
                " WHERE subscription_id = $1 AND status = 'pending' ORDER BY seq LIMIT 1",
                subscription_id,
            )
            if not enabled or not head or head[0][8] > now_us:
                await sql.execute(
                    "UPDATE webhook_subscriptions SET lease_owner = '', lease_until_us = 0"
                    " WHERE subscription_id = $1 AND lease_owner = $2",
                    subscription_id, owner,
                )
                return None
            half_left = now_us + (lease_until_us - now_us) // 2
            if lease_owner != owner or lease_until < half_left:
                await sql.execute(
                    "UPDATE webhook_subscriptions SET lease_owner = $2, lease_until_us = $3"
                    " WHERE subscription_id = $1",
                    subscription_id, owner, lease_until_us,
                )
        return Claim(_delivery(head[0]), url, sealed)

    async def delivered(
        self, subscription_id: str, seq: int, now_us: int, http_status: int
    ) -> None:
        async with unit(self.control) as sql:
            await sql.execute(
                "UPDATE webhook_deliveries SET status = 'delivered', attempts = attempts + 1,"
                " last_attempt_us = $3, last_status = $4, last_error = '', delivered_us = $3"
                " WHERE subscription_id = $1 AND seq = $2 AND status = 'pending'",
                subscription_id, seq, now_us, http_status,
            )

    async def failed(
        self,
        subscription_id: str,
        seq: int,
        *,
        now_us: int,
        http_status: int,
        error: str,
        retry_at_us: int,
        max_attempts: int,
    ) -> str:
        """Record a failed try; the delivery's status after it (``dead`` once the tries
        ran out)."""
        async with unit(self.control) as sql:
            await sql.execute(
                "UPDATE webhook_deliveries SET attempts = attempts + 1, last_attempt_us = $3,"
                " last_status = $4, last_error = $5, next_attempt_us = $6,"
                " status = CASE WHEN attempts + 1 >= $7 THEN 'dead' ELSE 'pending' END"
                " WHERE subscription_id = $1 AND seq = $2 AND status = 'pending'",
                subscription_id, seq, now_us, http_status, error[:500], retry_at_us,
                max_attempts,
            )
            rows = await sql.fetch(
                "SELECT status FROM webhook_deliveries WHERE subscription_id = $1 AND seq = $2",
                subscription_id, seq,
            )
        return str(rows[0][0]) if rows else DEAD

    async def release(self, owner: str, subscription_id: str | None = None) -> None:
        """Give back ``owner``'s lease on one subscription, or on all of them."""
        async with unit(self.control) as sql:
            if subscription_id is None:
                await sql.execute(
                    "UPDATE webhook_subscriptions SET lease_owner = '', lease_until_us = 0"
                    " WHERE lease_owner = $1",
                    owner,
                )
            else:
                await sql.execute(
                    "UPDATE webhook_subscriptions SET lease_owner = '', lease_until_us = 0"
                    " WHERE subscription_id = $1 AND lease_owner = $2",
                    subscription_id, owner,
                )

    # inspection and replay

    async def deliveries(
        self, subscription_id: str, *, status: str | None, after_seq: int, limit: int
    ) -> list[Delivery]:
        async with unit(self.control) as sql:
            if status is None:
                rows = await sql.fetch(
                    f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries"
                    " WHERE subscription_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                    subscription_id, after_seq, limit,
                )
            else:
                rows = await sql.fetch(
                    f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries"
                    " WHERE subscription_id = $1 AND status = $4 AND seq > $2"
                    " ORDER BY seq LIMIT $3",
                    subscription_id, after_seq, limit, status,
                )
        return [_delivery(r) for r in rows]

    async def sequence_of(self, subscription_id: str, event_id: str) -> int | None:
        async with unit(self.control) as sql:
            rows = await sql.fetch(
                "SELECT seq FROM webhook_deliveries WHERE subscription_id = $1 AND event_id = $2",
                subscription_id, event_id,
            )
        return int(rows[0][0]) if rows else None

    async def replay(
        self,
        subscription_id: str,
        now_us: int,
        *,
        dead_only: bool,
        from_seq: int = 0,
        audit: AuditHook | None = None,
    ) -> int:
        """Queue again, due now and with a fresh count of tries: the dead letters
        (``dead_only``), or every delivery from ``from_seq`` on, whatever its state. The
        number queued. They go out in sequence order, before anything pending later."""
        async with unit(self.control) as sql:
            condition = "status = 'dead'" if dead_only else "seq >= $3"
            queued = await sql.execute(
                "UPDATE webhook_deliveries SET status = 'pending', attempts = 0,"
                " next_attempt_us = $2"
                f" WHERE subscription_id = $1 AND {condition}",
                *((subscription_id, now_us) if dead_only else (subscription_id, now_us, from_seq)),
            )
            if audit is not None:
                await audit(sql.tx, queued)
        return queued

    async def prune_delivered(self, before_us: int) -> int:
        async with unit(self.control) as sql:
            return await sql.execute(
                "DELETE FROM webhook_deliveries WHERE status = 'delivered' AND delivered_us < $1",
                before_us,
            )
