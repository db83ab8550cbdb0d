"""The embedded ledger: one SQLite file, the single-machine default.

Units of work go through one connection owned by one dedicated thread, so the event
loop never blocks on SQLite; an asyncio lock makes each unit of work exclusive and
``BEGIN IMMEDIATE`` takes SQLite's write lock at its start. Reads outside a unit of
work (the store's query methods: the REST API, verify, fleet health) go through a
second, read-only connection on a thread of its own: in WAL mode each statement there
reads the last committed state, so a read never sees a unit of work in progress (nor
one that rolls back), and it neither waits for one nor makes ingest wait. The file runs
in WAL mode with ``synchronous=FULL``: a committed batch survives a power cut. Decimals are stored
as exact decimal text. Triggers refuse UPDATE and DELETE on records, journal entries
and postings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from collector.ledger.journal import (
    GENESIS_HASH,
    ChainLink,
    JournalEntry,
    Posting,
    entry_hash,
    restore_entry,
)
from collector.ledger.outbox import encode_data
from collector.ledger.store import (
    AUDIT_COLUMNS,
    AUDIT_STAGING_SCHEMA,
    BUCKETS,
    CREDIT_NOTE_COLUMNS,
    ENTRY_RECORDS_SQL,
    FLEET_AGENT_COLUMNS,
    INVOICE_COLUMNS,
    ORPHAN_RECORDS_SQL,
    REVENUE_PREFIX,
    STAGED_AUDIT_COLUMNS,
    TOKEN_COLUMNS,
    AgentFacts,
    ApiToken,
    AuditRow,
    Counter,
    CounterKey,
    InvoiceQuery,
    PeriodPosting,
    QuarantinedRecord,
    RevenueRow,
    SeqHole,
    SeqMarks,
    SeqTrack,
    StagedAudit,
    StoredCreditNote,
    StoredInvoice,
    UsageBucket,
    UsageQuery,
    UsageTotal,
    describe_balance_mismatches,
    describe_unlinked,
    invoice_query_filter,
    merge_seq_ranges,
    parse_seq_ranges,
    record_from_json,
    record_to_json,
    seq_holes_of,
    series_held,
)
from collector.ledger.timing import timed_transaction
from common.errors import IntegrityError, StoreUnavailable
from common.ids import new_id
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

# --- REST API: the control shard's API tokens and audit log -------------------------------
# A token may be revoked once and never un-revoked or deleted; the audit log is
# append-only like the journal.
API_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_tokens (
    token_id   TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    role       TEXT NOT NULL,
    scopes     TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_us INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    revoked_us INTEGER,
    revoked_by TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS api_tokens_no_delete BEFORE DELETE ON api_tokens
BEGIN SELECT RAISE(ABORT, 'meterd: API tokens are revoked, never deleted'); END;
CREATE TRIGGER IF NOT EXISTS api_tokens_revoke_only BEFORE UPDATE ON api_tokens
WHEN OLD.revoked_us IS NOT NULL OR NEW.revoked_us IS NULL
  OR NEW.token_id IS NOT OLD.token_id OR NEW.name IS NOT OLD.name
  OR NEW.role IS NOT OLD.role OR NEW.scopes IS NOT OLD.scopes
  OR NEW.token_hash IS NOT OLD.token_hash OR NEW.created_us IS NOT OLD.created_us
  OR NEW.created_by IS NOT OLD.created_by
BEGIN SELECT RAISE(ABORT, 'meterd: an API token can only be revoked, once'); END;
CREATE TABLE IF NOT EXISTS audit_log (
    seq         INTEGER PRIMARY KEY,
    at_us       INTEGER NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    target      TEXT NOT NULL,
    before_json TEXT NOT NULL,
    after_json  TEXT NOT NULL,
    prev_hash   TEXT NOT NULL,
    hash        TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_log_at ON audit_log (at_us);
""" + AUDIT_STAGING_SCHEMA + """
CREATE TRIGGER IF NOT EXISTS audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'meterd: audit_log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'meterd: audit_log is append-only'); END;
"""

def _bucket_sql(bucket: str, column: str = "start_us") -> str:
    """The start of the bucket (microseconds) a timestamp column falls in."""
    width = BUCKETS[bucket]
    if width:
        return f"({column} - {column} % {width})"
    return (
        f"CAST(strftime('%s', {column} / 1000000, 'unixepoch', 'start of month')"
        " AS INTEGER) * 1000000"
    )


class _DecimalSum:
    """``meterd_dsum(text)``: an exact sum of decimal text (SQLite's sum() is a float)."""

    def __init__(self) -> None:
        self.total = Decimal(0)

    def step(self, value: str) -> None:
        self.total = CONTEXT.add(self.total, Decimal(value))

    def finalize(self) -> str:
        return canonical_text(self.total)

# --- end REST API -------------------------------------------------------------------------


def _append_only_triggers() -> str:
    parts = []
    for table in APPEND_ONLY_TABLES:
        for op in ("UPDATE", "DELETE"):
            parts.append(
                f"CREATE TRIGGER IF NOT EXISTS {table}_no_{op.lower()} BEFORE {op} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, 'meterd: {table} is append-only'); END;"
            )
    return "\n".join(parts)


# --- billing (collector.billing): period postings, invoices, credit notes, quarantine -----
# Finalized invoices, credit notes and period postings refuse UPDATE and DELETE, like the
# journal; a number series only counts up by one; a quarantined record is released
# (marked, once), never deleted.
BILLING_SCHEMA = """
CREATE TABLE IF NOT EXISTS period_postings (
    entry_id        TEXT NOT NULL,
    account_id      TEXT NOT NULL,
    price_id        TEXT NOT NULL,
    currency        TEXT NOT NULL,
    period_start_us INTEGER NOT NULL,
    origin_start_us INTEGER NOT NULL,
    amount          TEXT NOT NULL,
    PRIMARY KEY (entry_id, price_id, origin_start_us)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS period_postings_period ON period_postings (account_id, period_start_us);
CREATE TABLE IF NOT EXISTS invoices (
    invoice_id        TEXT PRIMARY KEY,
    account_id        TEXT NOT NULL,
    period_start_us   INTEGER NOT NULL,
    period_end_us     INTEGER NOT NULL,
    status            TEXT NOT NULL CHECK (status IN ('draft', 'finalized')),
    number            TEXT UNIQUE,
    currency          TEXT NOT NULL,
    total             TEXT NOT NULL,
    document          TEXT NOT NULL,
    digest            TEXT NOT NULL,
    entry_id          TEXT NOT NULL,
    rounding_entry_id TEXT NOT NULL,
    created_us        INTEGER NOT NULL,
    finalized_us      INTEGER NOT NULL,
    quote_request     TEXT NOT NULL,
    CHECK ((status = 'draft') = (number IS NULL)),
    UNIQUE (account_id, period_start_us)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS invoices_finalized_no_update BEFORE UPDATE ON invoices
WHEN OLD.status = 'finalized'
BEGIN SELECT RAISE(ABORT, 'meterd: a finalized invoice never changes'); END;
CREATE TRIGGER IF NOT EXISTS invoices_finalized_no_delete BEFORE DELETE ON invoices
WHEN OLD.status = 'finalized'
BEGIN SELECT RAISE(ABORT, 'meterd: a finalized invoice never changes'); END;
CREATE TABLE IF NOT EXISTS credit_notes (
    credit_note_id TEXT PRIMARY KEY,
    number         TEXT NOT NULL UNIQUE,
    invoice_id     TEXT NOT NULL,
    account_id     TEXT NOT NULL,
    currency       TEXT NOT NULL,
    total          TEXT NOT NULL,
    document       TEXT NOT NULL,
    digest         TEXT NOT NULL,
    entry_id       TEXT NOT NULL,
    created_us     INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS credit_notes_invoice ON credit_notes (invoice_id);
CREATE TABLE IF NOT EXISTS number_series (
    kind   TEXT PRIMARY KEY,
    series TEXT NOT NULL UNIQUE,
    last   INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS number_series_count_up BEFORE UPDATE ON number_series
WHEN NEW.kind IS NOT OLD.kind OR NEW.series IS NOT OLD.series OR NEW.last IS NOT OLD.last + 1
BEGIN SELECT RAISE(ABORT, 'meterd: a number series only counts up by one'); END;
CREATE TRIGGER IF NOT EXISTS number_series_no_delete BEFORE DELETE ON number_series
BEGIN SELECT RAISE(ABORT, 'meterd: a number series only counts up by one'); END;
CREATE TABLE IF NOT EXISTS quarantine (
    record_id   TEXT PRIMARY KEY,
    account_id  TEXT NOT NULL,
    host_id     TEXT NOT NULL,
    record      TEXT NOT NULL,
    reason      TEXT NOT NULL,
    received_us INTEGER NOT NULL,
    released_us INTEGER NOT NULL DEFAULT 0,
    released_by TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS quarantine_release_only BEFORE UPDATE ON quarantine
WHEN OLD.released_us != 0 OR NEW.released_us = 0 OR NEW.record_id IS NOT OLD.record_id
  OR NEW.account_id IS NOT OLD.account_id OR NEW.host_id IS NOT OLD.host_id
  OR NEW.record IS NOT OLD.record OR NEW.reason IS NOT OLD.reason
  OR NEW.received_us IS NOT OLD.received_us
BEGIN SELECT RAISE(ABORT, 'meterd: a quarantined record is released once, never changed'); END;
CREATE TRIGGER IF NOT EXISTS quarantine_no_delete BEFORE DELETE ON quarantine
BEGIN SELECT RAISE(ABORT, 'meterd: a quarantined record is released, never deleted'); END;
""" + "\n".join(
    f"CREATE TRIGGER IF NOT EXISTS {table}_no_{op.lower()} BEFORE {op} ON {table} "
    f"BEGIN SELECT RAISE(ABORT, 'meterd: {table} is append-only'); END;"
    for table in ("period_postings", "credit_notes")
    for op in ("UPDATE", "DELETE")
)

_PERIOD_POSTING_COLUMNS = (
    "entry_id, account_id, price_id, currency, period_start_us, origin_start_us, amount"
)
_QUARANTINE_COLUMNS = "record, account_id, reason, received_us, released_us, released_by"


def _stored_invoice(row: Sequence[Any]) -> StoredInvoice:
    return StoredInvoice(
        row[0], row[1], row[2], row[3], row[4], row[5], row[6], Decimal(row[7]), row[8],
        row[9], row[10], row[11], row[12], row[13], row[14],
    )


def _stored_credit_note(row: Sequence[Any]) -> StoredCreditNote:
    return StoredCreditNote(
        row[0], row[1], row[2], row[3], row[4], Decimal(row[5]), row[6], row[7], row[8], row[9]
    )


def _period_posting(row: Sequence[Any]) -> PeriodPosting:
    return PeriodPosting(row[0], row[1], row[2], row[3], row[4], row[5], Decimal(row[6]))


def _quarantined(row: Sequence[Any]) -> QuarantinedRecord:
    return QuarantinedRecord(record_from_json(row[0]), row[1], row[2], row[3], row[4], row[5])


def _invoice_row(invoice: StoredInvoice) -> tuple[Any, ...]:
    return (
        invoice.invoice_id, invoice.account_id, invoice.period_start_us, invoice.period_end_us,
        invoice.status, invoice.number, invoice.currency, canonical_text(invoice.total),
        invoice.document, invoice.digest, invoice.entry_id, invoice.rounding_entry_id,
        invoice.created_us, invoice.finalized_us, invoice.quote_request,
    )


_UPSERT_INVOICE = (
    f"INSERT INTO invoices ({INVOICE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
    " ON CONFLICT (account_id, period_start_us) DO UPDATE SET"
    " status = excluded.status, number = excluded.number, total = excluded.total,"
    " document = excluded.document, digest = excluded.digest, entry_id = excluded.entry_id,"
    " rounding_entry_id = excluded.rounding_entry_id, finalized_us = excluded.finalized_us,"
    " quote_request = excluded.quote_request"
    " WHERE invoices.status = 'draft'"
)


class _SqliteBillingStore:
    """The billing reads of :class:`SqliteLedger` (see :class:`LedgerStore`)."""

    if TYPE_CHECKING:

        async def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
            ...

    async def invoices(self, query: InvoiceQuery) -> list[StoredInvoice]:
        conditions, params = invoice_query_filter(query)
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        limit = -1 if query.limit is None else query.limit
        rows = await self._query(
            f"SELECT {INVOICE_COLUMNS} FROM invoices{where}"
            " ORDER BY period_start_us, invoice_id LIMIT ?",
            (*params, limit),
        )
        return [_stored_invoice(r) for r in rows]

    async def invoice(self, ref: str) -> StoredInvoice | None:
        rows = await self._query(
            f"SELECT {INVOICE_COLUMNS} FROM invoices WHERE invoice_id = ? OR number = ?",
            (ref, ref),
        )
        return _stored_invoice(rows[0]) if rows else None

    async def credit_notes(
        self, *, account_id: str | None = None, ref: str | None = None
    ) -> list[StoredCreditNote]:
        conditions, params = [], []
        if account_id is not None:
            conditions.append("account_id = ?")
            params.append(account_id)
        if ref is not None:
            conditions.append("(credit_note_id = ? OR number = ?)")
            params += [ref, ref]
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        rows = await self._query(
            f"SELECT {CREDIT_NOTE_COLUMNS} FROM credit_notes{where} ORDER BY created_us, number",
            params,
        )
        return [_stored_credit_note(r) for r in rows]

    async def quarantined(
        self, host_id: str | None = None, *, released: bool = False
    ) -> list[QuarantinedRecord]:
        conditions, params = [], []
        if host_id is not None:
            conditions.append("host_id = ?")
            params.append(host_id)
        if not released:
            conditions.append("released_us = 0")
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        rows = await self._query(
            f"SELECT {_QUARANTINE_COLUMNS} FROM quarantine{where} ORDER BY record_id", params
        )
        return [_quarantined(r) for r in rows]

    async def period_posting_totals(
        self,
    ) -> tuple[dict[str, Decimal], dict[tuple[str, int], Decimal]]:
        by_entry: dict[str, Decimal] = {}
        by_period: dict[tuple[str, int], Decimal] = {}
        for entry_id, account_id, period, amount in await self._query(
            "SELECT entry_id, account_id, period_start_us, amount FROM period_postings"
        ):
            value = Decimal(amount)
            by_entry[entry_id] = CONTEXT.add(by_entry.get(entry_id, Decimal(0)), value)
            key = (account_id, period)
            by_period[key] = CONTEXT.add(by_period.get(key, Decimal(0)), value)
        return by_entry, by_period

    async def number_series(self) -> dict[str, str]:
        rows = await self._query("SELECT kind, series FROM number_series")
        return {str(kind): str(series) for kind, series in rows}


class _SqliteBillingTx:
    """The billing statements of :class:`_SqliteTx` (see :class:`LedgerTx`)."""

    _store: SqliteLedger

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._store._run(fn, self._store.conn)

    async def lock_account(self, account_id: str) -> None:
        """Nothing to do: the unit of work already holds the file's write lock."""

    async def finalized_periods(self, account_id: str, from_us: int) -> list[int]:
        rows = await self._call(
            lambda c: c.execute(
                "SELECT period_start_us FROM invoices WHERE account_id = ?"
                " AND status = 'finalized' AND period_start_us >= ? ORDER BY period_start_us",
                (account_id, from_us),
            ).fetchall()
        )
        return [r[0] for r in rows]

    async def insert_period_postings(self, rows: Sequence[PeriodPosting]) -> None:
        values = [
            (r.entry_id, r.account_id, r.price_id, r.currency, r.period_start_us,
             r.origin_start_us, canonical_text(r.amount))
            for r in rows
        ]
        await self._call(
            lambda c: c.executemany(
                f"INSERT INTO period_postings ({_PERIOD_POSTING_COLUMNS}) VALUES (?,?,?,?,?,?,?)",
                values,
            )
        )

    async def period_counters(self, account_id: str, period_start_us: int) -> dict[str, Counter]:
        rows = await self._call(
            lambda c: c.execute(
                "SELECT price_id, quantity, amount FROM counters"
                " WHERE account_id = ? AND period_start_us = ?",
                (account_id, period_start_us),
            ).fetchall()
        )
        return {r[0]: Counter(Decimal(r[1]), Decimal(r[2])) for r in rows}

    async def period_postings(self, account_id: str, period_start_us: int) -> list[PeriodPosting]:
        rows = await self._call(
            lambda c: c.execute(
                f"SELECT {_PERIOD_POSTING_COLUMNS} FROM period_postings"
                " WHERE account_id = ? AND period_start_us = ? ORDER BY entry_id, price_id",
                (account_id, period_start_us),
            ).fetchall()
        )
        return [_period_posting(r) for r in rows]

    async def record_quantities(
        self, account_id: str, metrics: Sequence[str], from_us: int, to_us: int
    ) -> list[tuple[str, int, Decimal]]:
        if not metrics:
            return []
        marks = ",".join("?" for _ in metrics)
        rows = await self._call(
            lambda c: c.execute(
                "SELECT metric, start_us, quantity FROM records WHERE account_id = ?"
                f" AND metric IN ({marks}) AND start_us >= ? AND start_us < ?"
                " ORDER BY start_us, record_id",
                (account_id, *metrics, from_us, to_us),
            ).fetchall()
        )
        return [(r[0], r[1], Decimal(r[2])) for r in rows]

    async def first_usage_us(self, account_id: str) -> int | None:
        row = await self._call(
            lambda c: c.execute(
                "SELECT min(start_us) FROM records WHERE account_id = ?", (account_id,)
            ).fetchone()
        )
        return None if row is None or row[0] is None else int(row[0])

    async def invoices_of(self, account_id: str, from_us: int, to_us: int) -> list[StoredInvoice]:
        rows = await self._call(
            lambda c: c.execute(
                f"SELECT {INVOICE_COLUMNS} FROM invoices WHERE account_id = ?"
                " AND period_start_us >= ? AND period_start_us < ? ORDER BY period_start_us",
                (account_id, from_us, to_us),
            ).fetchall()
        )
        return [_stored_invoice(r) for r in rows]

    async def save_draft(self, invoice: StoredInvoice) -> bool:
        row = _invoice_row(invoice)
        cursor = await self._call(lambda c: c.execute(_UPSERT_INVOICE, row))
        return cursor.rowcount == 1

    async def save_finalized(self, invoice: StoredInvoice) -> None:
        row = _invoice_row(invoice)
        cursor = await self._call(lambda c: c.execute(_UPSERT_INVOICE, row))
        if cursor.rowcount != 1:
            raise IntegrityError(
                f"invoice of account {invoice.account_id} for period {invoice.period_start_us}"
                " is already finalized"
            )

    async def next_number(self, kind: str, series: str) -> tuple[str, int]:
        def take(conn: sqlite3.Connection) -> tuple[str, int]:
            row = conn.execute(
                "SELECT series, last FROM number_series WHERE kind = ?", (kind,)
            ).fetchone()
            if row is None:
                holder = conn.execute(
                    "SELECT kind FROM number_series WHERE series = ?", (series,)
                ).fetchone()
                if holder is not None:
                    raise series_held(series, kind, str(holder[0]))
                conn.execute("INSERT INTO number_series VALUES (?, ?, 1)", (kind, series))
                return series, 1
            conn.execute("UPDATE number_series SET last = last + 1 WHERE kind = ?", (kind,))
            return str(row[0]), int(row[1]) + 1

        return await self._call(take)

    async def insert_credit_note(self, note: StoredCreditNote) -> None:
        values = (
            note.credit_note_id, note.number, note.invoice_id, note.account_id, note.currency,
            canonical_text(note.total), note.document, note.digest, note.entry_id,
            note.created_us,
        )
        await self._call(
            lambda c: c.execute(
                f"INSERT INTO credit_notes ({CREDIT_NOTE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                values,
            )
        )

    async def credit_notes_of(self, invoice_id: str) -> list[StoredCreditNote]:
        rows = await self._call(
            lambda c: c.execute(
                f"SELECT {CREDIT_NOTE_COLUMNS} FROM credit_notes WHERE invoice_id = ?"
                " ORDER BY created_us, number",
                (invoice_id,),
            ).fetchall()
        )
        return [_stored_credit_note(r) for r in rows]

    async def quarantine(self, rows: Sequence[QuarantinedRecord]) -> set[str]:
        def insert(conn: sqlite3.Connection) -> set[str]:
            new: set[str] = set()
            for q in sorted(rows, key=lambda q: q.record.id):
                record = q.record
                if conn.execute(
                    "SELECT 1 FROM records WHERE record_id = ?", (record.id,)
                ).fetchone():
                    continue
                cursor = conn.execute(
                    "INSERT INTO quarantine (record_id, account_id, host_id, record, reason,"
                    " received_us) VALUES (?,?,?,?,?,?) ON CONFLICT (record_id) DO NOTHING",
                    (record.id, q.account_id, record.host_id, record_to_json(record), q.reason,
                     q.received_us),
                )
                if cursor.rowcount == 1:
                    new.add(record.id)
            return new

        return await self._call(insert)

    async def mark_released(self, record_ids: Sequence[str], at_us: int, by: str) -> None:
        await self._call(
            lambda c: c.executemany(
                "UPDATE quarantine SET released_us = ?, released_by = ?"
                " WHERE record_id = ? AND released_us = 0",
                [(at_us, by, record_id) for record_id in record_ids],
            )
        )


# --- end billing --------------------------------------------------------------------------


class SqliteLedger(_SqliteBillingStore):
    """The ledger in one SQLite file (one shard)."""

    concurrency = 1  # one writer at a time: BEGIN IMMEDIATE takes the file's lock

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.name = f"sqlite:{self.path}"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-sqlite")
        self._lock = asyncio.Lock()
        self._conn: sqlite3.Connection | None = None
        # Reads outside units of work: their own read-only connection and thread.
        self._read_executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="ledger-sqlite-read"
        )
        self._reader: sqlite3.Connection | None = None

    @classmethod
    async def open(cls, path: Path) -> SqliteLedger:
        store = cls(path)
        await store._run(store._connect)
        await store._read(store._connect_reader)
        return store

    def _connect(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=10000")
        conn.executescript(SCHEMA + OUTBOX_SCHEMA + _append_only_triggers())
        conn.executescript(FLEET_SCHEMA)
        conn.executescript(API_SCHEMA)
        conn.executescript(BILLING_SCHEMA)  # billing (collector.billing)
        conn.executescript(SEQ_SCHEMA)  # sequences (collector.sequences)
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

    @timed_transaction
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

    # --- reads: a read-only connection of their own ---------------------------------------
    def _connect_reader(self) -> None:
        """Open the read connection (after :meth:`_connect` made the file and schema).
        In autocommit mode each statement is its own read transaction on a snapshot of
        the last commit."""
        uri = f"{self.path.resolve().as_uri()}?mode=ro"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=10000")
        # typeshed allows int-valued aggregates only; this one sums decimal text.
        conn.create_aggregate("meterd_dsum", 1, _DecimalSum)  # type: ignore[arg-type]
        self._reader = conn

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._read_executor, fn, *args)
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"{self.name}: {exc}") from exc

    async def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Rows of one statement, as last committed (never a unit of work in progress)."""

        def fetch() -> list[tuple[Any, ...]]:
            reader = self._reader
            if reader is None:
                raise StoreUnavailable(f"{self.name} is closed")
            return reader.execute(sql, params).fetchall()

        return await self._read(fetch)

    # --- end reads ------------------------------------------------------------------------

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

    async def usage_sum_mismatches(self) -> list[str]:
        return []  # no usage sums here: the usage reads sum the records, by their index

    # --- running counters and sequences (verify, collector.sequences) -------------------
    async def counters(self) -> dict[CounterKey, Counter]:
        rows = await self._query(
            "SELECT account_id, price_id, period_start_us, quantity, amount FROM counters"
        )
        return {CounterKey(a, p, s): Counter(Decimal(q), Decimal(m)) for a, p, s, q, m in rows}

    async def record_sums(self) -> list[tuple[str, str, int, Decimal]]:
        sums: dict[tuple[str, str, int], Decimal] = {}
        for account, metric, start_us, quantity in await self._query(
            "SELECT account_id, metric, start_us, quantity FROM records"
        ):
            key = (account, metric, start_us)
            sums[key] = CONTEXT.add(sums.get(key, Decimal(0)), Decimal(quantity))
        return [(*key, total) for key, total in sums.items()]

    async def seq_tracks(self, host_id: str | None = None) -> list[SeqTrack]:
        rows = await self._query(
            "SELECT host_id, epoch, start_seq, seen, first_us, updated_us FROM seq_tracks"
            " WHERE ? IS NULL OR host_id = ? ORDER BY host_id, epoch",
            (host_id, host_id),
        )
        return [SeqTrack(h, e, s, parse_seq_ranges(seen), f, u) for h, e, s, seen, f, u in rows]

    async def seq_holes(self, host_id: str | None = None) -> list[SeqHole]:
        rows = await self._query(
            _SEQ_HOLES + " WHERE ? IS NULL OR host_id = ? ORDER BY host_id, epoch, lo",
            (host_id, host_id),
        )
        return [SeqHole(*r) for r in rows]

    # --- end running counters and sequences ---------------------------------------------

    # --- fleet health and readiness -------------------------------------------------------

    async def fleet_agents(self) -> list[AgentFacts]:
        rows = await self._query(
            f"SELECT {FLEET_AGENT_COLUMNS} FROM fleet_agents ORDER BY host_id"
        )
        return [AgentFacts(*row) for row in rows]

    async def ping(self) -> None:
        await self._query("SELECT 1")

    # --- end fleet health and readiness ---------------------------------------------------

    # --- REST API: queries, tokens and audit log ------------------------------------------
    async def usage_series(self, query: UsageQuery) -> list[UsageBucket]:
        where = ["start_us >= ?", "start_us < ?"]
        params: list[Any] = [query.from_us, query.to_us]
        for column, value in (
            ("account_id", query.account_id),
            ("host_id", query.host_id),
            ("metric", query.metric),
        ):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        having = ""
        if query.after is not None:
            having = "HAVING (b, account_id, host_id, metric, unit) > (?, ?, ?, ?, ?)"
            params.extend(query.after)
        params.append(query.limit)
        sql = (
            "SELECT b, account_id, host_id, metric, unit, meterd_dsum(quantity), count(*)"
            f" FROM (SELECT {_bucket_sql(query.bucket)} AS b, account_id, host_id, metric,"
            f" unit, quantity FROM records WHERE {' AND '.join(where)})"
            f" GROUP BY b, account_id, host_id, metric, unit {having}"
            " ORDER BY b, account_id, host_id, metric, unit LIMIT ?"
        )
        rows = await self._query(sql, params)  # meterd_dsum: the read connection's
        return [UsageBucket(r[0], r[1], r[2], r[3], r[4], Decimal(r[5]), r[6]) for r in rows]

    async def journal_page(
        self, account_id: str, *, from_us: int, to_us: int, after_seq: int, limit: int
    ) -> list[ChainLink]:
        rows = await self._query(
            "SELECT entry_id, chain_seq, kind, memo, created_us, records_digest, prev_hash, hash"
            " FROM journal WHERE account_id = ? AND chain_seq > ? AND created_us >= ?"
            " AND created_us < ? ORDER BY chain_seq LIMIT ?",
            (account_id, after_seq, from_us, to_us, limit),
        )
        links = []
        for entry_id, seq, kind, memo, created_us, digest, prev_hash, hash_ in rows:
            postings = await self.postings_of(entry_id)
            entry = restore_entry(entry_id, account_id, kind, memo, created_us, postings, digest)
            links.append(ChainLink(entry, seq, prev_hash, hash_))
        return links

    async def find_token(self, token_hash: str) -> ApiToken | None:
        rows = await self._query(
            f"SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE token_hash = ?", (token_hash,)
        )
        return ApiToken.from_row(rows[0]) if rows else None

    async def tokens(self) -> list[ApiToken]:
        rows = await self._query(
            f"SELECT {TOKEN_COLUMNS} FROM api_tokens ORDER BY created_us, token_id"
        )
        return [ApiToken.from_row(r) for r in rows]

    async def audit_rows(
        self, *, from_us: int, to_us: int, after_seq: int, limit: int | None
    ) -> list[AuditRow]:
        rows = await self._query(
            f"SELECT {AUDIT_COLUMNS} FROM audit_log WHERE seq > ? AND at_us >= ?"
            " AND at_us < ? ORDER BY seq LIMIT ?",
            (after_seq, from_us, to_us, -1 if limit is None else limit),
        )
        return [AuditRow(*r) for r in rows]

    # --- end REST API ----------------------------------------------------------------------

    # --- reports (collector.api.reports) ------------------------------------------------
    async def revenue(self, from_us: int, to_us: int) -> list[RevenueRow]:
        sql = (
            f"SELECT {_bucket_sql('month', 'j.created_us')} AS m, p.ledger_account,"
            " p.currency, meterd_dsum(p.amount)"
            " FROM postings AS p JOIN journal AS j ON j.entry_id = p.entry_id"
            " WHERE substr(p.ledger_account, 1, ?) = ? AND j.created_us >= ?"
            " AND j.created_us < ? GROUP BY m, p.ledger_account, p.currency"
        )
        params = (len(REVENUE_PREFIX), REVENUE_PREFIX, from_us, to_us)
        return [
            RevenueRow(m, account[len(REVENUE_PREFIX):], currency, -Decimal(total))
            for m, account, currency, total in await self._query(sql, params)
        ]

    # --- end reports ----------------------------------------------------------------------

    async def close(self) -> None:
        if self._reader is not None:  # first: the writer's close then cleans up the WAL
            reader, self._reader = self._reader, None
            await asyncio.get_running_loop().run_in_executor(self._read_executor, reader.close)
        self._read_executor.shutdown(wait=True)
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.get_running_loop().run_in_executor(self._executor, conn.close)
        self._executor.shutdown(wait=True)


class _SqliteTx(_SqliteBillingTx):
    def __init__(self, store: SqliteLedger) -> None:
        self._store = store

    async def insert_records(
        self,
        account_id: str,
        entry_id: str,
        records: Sequence[UsageRecord],
        received_us: int,
        optimistic: bool = False,
    ) -> set[str]:
        """Each record unless stored, optimistic or not: SQLite has no faster way that
        would fail on a duplicate."""

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

    # --- sequences (collector.sequences) ------------------------------------------------
    async def account_seqs(self, marks: SeqMarks) -> None:
        if marks.ranges:
            marks.new_epoch = await self._account_seqs(marks)

    async def _account_seqs(self, marks: SeqMarks) -> bool:

        def account() -> bool:
            conn = self._store.conn
            row = conn.execute(
                "SELECT start_seq, seen FROM seq_tracks WHERE host_id = ? AND epoch = ?",
                (marks.host_id, marks.epoch),
            ).fetchone()
            if row is None:
                start, seen = marks.start, merge_seq_ranges(marks.ranges)
            else:
                start = row[0] if row[0] is not None else marks.start
                seen = merge_seq_ranges(parse_seq_ranges(row[1]), marks.ranges)
            conn.execute(
                "INSERT INTO seq_tracks VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE"
                " SET start_seq = excluded.start_seq, seen = excluded.seen,"
                " updated_us = excluded.updated_us",
                (marks.host_id, marks.epoch, start, json.dumps(seen), marks.at_us, marks.at_us),
            )
            return row is None

        return await self._store._run(account)

    async def claim_seq_check(self) -> bool:
        return True  # BEGIN IMMEDIATE already holds the file's write lock

    async def current_seq_holes(self) -> list[tuple[str, str, int, int]]:
        def holes() -> list[tuple[str, str, int, int]]:
            out: list[tuple[str, str, int, int]] = []
            for host, epoch, start, seen in self._store.conn.execute(
                "SELECT host_id, epoch, start_seq, seen FROM seq_tracks ORDER BY host_id, epoch"
            ):
                out += [(host, epoch, lo, hi) for lo, hi in
                        seq_holes_of(parse_seq_ranges(seen), start)]
            return out

        return await self._store._run(holes)

    async def stored_seq_holes(self) -> list[SeqHole]:
        def stored() -> list[SeqHole]:
            rows = self._store.conn.execute(_SEQ_HOLES + " ORDER BY host_id, epoch, lo")
            return [SeqHole(*r) for r in rows]

        return await self._store._run(stored)

    async def replace_seq_holes(self, holes: Sequence[SeqHole]) -> None:
        def replace() -> None:
            conn = self._store.conn
            conn.execute("DELETE FROM seq_holes")
            conn.executemany(
                "INSERT INTO seq_holes VALUES (?, ?, ?, ?, ?, ?)",
                [(h.host_id, h.epoch, h.lo, h.hi, h.since_us, h.detected_us) for h in holes],
            )

        await self._store._run(replace)

    # --- end sequences ------------------------------------------------------------------

    # --- REST API: tokens and audit log (control shard) ------------------------------------
    async def insert_token(self, token: ApiToken, token_hash: str) -> None:
        await self._store._run(
            self._store.conn.execute,
            "INSERT INTO api_tokens VALUES (?,?,?,?,?,?,?,?,?)",
            (
                token.token_id, token.name, token.role, ",".join(token.scopes), token_hash,
                token.created_us, token.created_by, token.revoked_us, token.revoked_by,
            ),
        )

    async def get_token(self, token_id: str) -> ApiToken | None:
        def fetch() -> ApiToken | None:
            row = self._store.conn.execute(
                f"SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE token_id = ?", (token_id,)
            ).fetchone()
            return ApiToken.from_row(row) if row else None

        return await self._store._run(fetch)

    async def revoke_token(self, token_id: str, at_us: int, by: str) -> None:
        await self._store._run(
            self._store.conn.execute,
            "UPDATE api_tokens SET revoked_us = ?, revoked_by = ? WHERE token_id = ?",
            (at_us, by, token_id),
        )

    async def audit_head(self) -> tuple[int, str]:
        def fetch() -> tuple[int, str]:
            row = self._store.conn.execute(
                "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            return (row[0], row[1]) if row else (0, GENESIS_HASH)

        return await self._store._run(fetch)

    async def insert_audit(self, row: AuditRow) -> None:
        await self._store._run(
            self._store.conn.execute,
            "INSERT INTO audit_log VALUES (?,?,?,?,?,?,?,?,?)",
            (row.seq, row.at_us, row.actor, row.action, row.target, row.before, row.after,
             row.prev_hash, row.hash),
        )

    async def stage_audit(self, row: StagedAudit) -> None:
        await self._store._run(
            self._store.conn.execute,
            "INSERT INTO audit_staged VALUES (?,?,?,?,?,?,?)",
            (row.staged_id, row.at_us, row.actor, row.action, row.target, row.before,
             row.after),
        )

    async def staged_audits(self) -> list[StagedAudit]:
        def fetch() -> list[StagedAudit]:
            rows = self._store.conn.execute(
                f"SELECT {STAGED_AUDIT_COLUMNS} FROM audit_staged ORDER BY at_us, staged_id"
            ).fetchall()
            return [StagedAudit(*r) for r in rows]

        return await self._store._run(fetch)

    async def drop_staged_audits(self, staged_ids: Sequence[str]) -> None:
        await self._store._run(
            self._store.conn.executemany,
            "DELETE FROM audit_staged WHERE staged_id = ?", [(i,) for i in staged_ids],
        )

    async def relayed_audits(self, staged_ids: Sequence[str]) -> set[str]:
        def fetch() -> set[str]:
            conn = self._store.conn
            return {
                i for i in staged_ids
                if conn.execute(
                    "SELECT 1 FROM audit_relayed WHERE staged_id = ?", (i,)
                ).fetchone()
            }

        return await self._store._run(fetch)

    async def mark_audit_relayed(self, staged_id: str, seq: int) -> None:
        await self._store._run(
            self._store.conn.execute, "INSERT INTO audit_relayed VALUES (?,?)", (staged_id, seq)
        )

    # --- end REST API ----------------------------------------------------------------------

    # --- outbox (collector.ledger.outbox) ----------------------------------------------------

    async def emit(self, event_type: str, account_id: str, data: Mapping[str, Any]) -> str:
        text = encode_data(event_type, account_id, data)
        event_id = new_id()
        created_us = time.time_ns() // 1000

        def insert() -> None:
            conn = self._store.conn
            (seq,) = conn.execute(
                "UPDATE outbox_head SET last_seq = last_seq + 1 RETURNING last_seq"
            ).fetchone()
            conn.execute(
                "INSERT INTO outbox VALUES (?,?,?,?,?,?)",
                (seq, event_id, event_type, account_id, text, created_us),
            )

        await self._store._run(insert)
        return event_id

    async def balance(self, account_id: str, ledger_account: str, currency: str) -> Decimal:
        def read() -> Decimal:
            row = self._store.conn.execute(
                "SELECT amount FROM balances"
                " WHERE account_id = ? AND ledger_account = ? AND currency = ?",
                (account_id, ledger_account, currency),
            ).fetchone()
            return Decimal(row[0]) if row else Decimal(0)

        return await self._store._run(read)

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(connection)`` on the ledger thread inside this unit of work: for
        modules that keep their own tables here (webhook subscriptions and deliveries)."""
        return await self._store._run(fn, self._store.conn)

    # --- end outbox ---------------------------------------------------------------------------

    # --- fleet health (control shard) -------------------------------------------------------

    async def upsert_fleet_agents(self, facts: Sequence[AgentFacts]) -> None:
        def upsert() -> None:
            self._store.conn.executemany(
                _UPSERT_FLEET_AGENT,
                [
                    (f.host_id, f.first_seen_us, f.last_seen_us, f.version, f.backlog_records,
                     f.clock_skew_us, f.cert_serial, f.cert_expiry_us, f.dead_letters,
                     f.records_accepted, f.records_rejected, f.last_seq)
                    for f in sorted(facts, key=lambda f: f.host_id)
                ],
            )

        await self._store._run(upsert)

    async def claim_agent_silence(self, host_id: str, silent_before_us: int) -> bool:
        def claim() -> bool:
            cur = self._store.conn.execute(
                "UPDATE fleet_agents SET silent_notified_us = last_seen_us WHERE host_id = ?"
                " AND last_seen_us < ? AND silent_notified_us < last_seen_us",
                (host_id, silent_before_us),
            )
            return cur.rowcount == 1

        return await self._store._run(claim)

    # --- end fleet health -----------------------------------------------------------------


# --- fleet health: the control shard's table of agents ------------------------------------

FLEET_SCHEMA = """
CREATE TABLE IF NOT EXISTS fleet_agents (
    host_id            TEXT PRIMARY KEY,
    first_seen_us      INTEGER NOT NULL,
    last_seen_us       INTEGER NOT NULL,
    version            TEXT NOT NULL,
    backlog_records    INTEGER NOT NULL,
    clock_skew_us      INTEGER NOT NULL,
    cert_serial        TEXT NOT NULL,
    cert_expiry_us     INTEGER NOT NULL,
    dead_letters       INTEGER,
    records_accepted   INTEGER NOT NULL,
    records_rejected   INTEGER NOT NULL,
    last_seq           INTEGER NOT NULL,
    silent_notified_us INTEGER NOT NULL
) WITHOUT ROWID;
"""

# The merge rule of :class:`collector.ledger.store.AgentFacts`: the later sighting's facts.
_LATER = "CASE WHEN excluded.last_seen_us >= last_seen_us THEN excluded.{0} ELSE {0} END"
_UPSERT_FLEET_AGENT = (
    f"INSERT INTO fleet_agents ({FLEET_AGENT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,0)"
    " ON CONFLICT (host_id) DO UPDATE SET"
    " first_seen_us = min(first_seen_us, excluded.first_seen_us),"
    " last_seen_us = max(last_seen_us, excluded.last_seen_us),"
    + ",".join(
        f" {c} = {_LATER.format(c)}"
        for c in ("version", "backlog_records", "clock_skew_us", "cert_serial",
                  "cert_expiry_us", "dead_letters")
    )
    + ", records_accepted = records_accepted + excluded.records_accepted,"
    " records_rejected = records_rejected + excluded.records_rejected,"
    " last_seq = max(last_seq, excluded.last_seq)"
)

# --- end fleet health ---------------------------------------------------------------------


# --- outbox: events written with the change that causes them (collector.ledger.outbox) ----

OUTBOX_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq        INTEGER PRIMARY KEY,
    event_id   TEXT NOT NULL UNIQUE,
    event_type TEXT NOT NULL,
    account_id TEXT NOT NULL,
    data       TEXT NOT NULL,
    created_us INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox_head (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    source   TEXT NOT NULL,
    last_seq INTEGER NOT NULL
);
INSERT OR IGNORE INTO outbox_head VALUES (1, lower(hex(randomblob(16))), 0);
CREATE TRIGGER IF NOT EXISTS outbox_no_update BEFORE UPDATE ON outbox
BEGIN SELECT RAISE(ABORT, 'meterd: outbox events never change'); END;
"""

# --- end outbox ---------------------------------------------------------------------------


# --- sequences: each host epoch's seqs accounted for (JSON ranges), and the holes -------

SEQ_SCHEMA = """
CREATE TABLE IF NOT EXISTS seq_tracks (
    host_id    TEXT NOT NULL,
    epoch      TEXT NOT NULL,
    start_seq  INTEGER,
    seen       TEXT NOT NULL,
    first_us   INTEGER NOT NULL,
    updated_us INTEGER NOT NULL,
    PRIMARY KEY (host_id, epoch)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS seq_holes (
    host_id     TEXT NOT NULL,
    epoch       TEXT NOT NULL,
    lo          INTEGER NOT NULL,
    hi          INTEGER NOT NULL,
    since_us    INTEGER NOT NULL,
    detected_us INTEGER,
    PRIMARY KEY (host_id, epoch, lo)
) WITHOUT ROWID;
"""
_SEQ_HOLES = "SELECT host_id, epoch, lo, hi, since_us, detected_us FROM seq_holes"

# --- end sequences ------------------------------------------------------------------------
