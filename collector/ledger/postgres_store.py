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
import itertools
import json
import operator
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import asyncpg

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
    InsertConflict,
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
    describe_sum_mismatch,
    describe_unlinked,
    invoice_query_filter,
    record_from_json,
    record_to_json,
    series_held,
)
from collector.ledger.timing import timed_transaction
from common.errors import IntegrityError, StoreUnavailable
from common.ids import new_id
from common.records import SeriesBatch, UsageRecord

SCHEMA = """
-- The records' text keys compare byte by byte (COLLATE "C"), as SQLite's and Python's
-- do, whatever the database's locale: every ingested record is a key insertion, and a
-- locale's comparison costs more (bench/records_table_bench.py). entry_id keeps the
-- database's collation: it is compared with journal.entry_id. Ledgers created before
-- keep their columns as they were.
CREATE TABLE IF NOT EXISTS records (
    record_id   TEXT COLLATE "C" PRIMARY KEY,
    account_id  TEXT COLLATE "C" NOT NULL,
    entry_id    TEXT NOT NULL,
    host_id     TEXT COLLATE "C" NOT NULL,
    metric      TEXT COLLATE "C" NOT NULL,
    unit        TEXT COLLATE "C" NOT NULL,
    quantity    NUMERIC NOT NULL,
    start_us    BIGINT NOT NULL,
    end_us      BIGINT NOT NULL,
    seq         BIGINT NOT NULL,
    labels      JSONB NOT NULL,
    received_us BIGINT NOT NULL
);
-- Usage sums: the records' quantities summed per (account, metric, window start, host,
-- unit) and journal entry, by a trigger on every statement that inserts records (a
-- COPY or an INSERT: the rows it inserted, not those ON CONFLICT skipped), so in the
-- same transaction whatever inserts them. Every per-account read of usage (totals, the
-- usage API, p95 and max billing, an account's first usage) reads them, so records
-- need no index by account: a benchmark batch of 1,000 records has about 60 sums, and
-- the index cost PostgreSQL more CPU per record than the sums do (docs/benchmarks.md).
-- `meterd ledger verify` checks them against the records. A ledger created before gets
-- them from its records when it is next opened (PostgresLedger.open).
CREATE TABLE IF NOT EXISTS usage_sums (
    account_id TEXT COLLATE "C" NOT NULL,
    metric     TEXT COLLATE "C" NOT NULL,
    start_us   BIGINT NOT NULL,
    host_id    TEXT COLLATE "C" NOT NULL,
    unit       TEXT COLLATE "C" NOT NULL,
    entry_id   TEXT NOT NULL,
    quantity   NUMERIC NOT NULL,
    records    BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_sums_account ON usage_sums (account_id, metric, start_us);
DROP INDEX IF EXISTS records_account;
CREATE OR REPLACE FUNCTION meterd_usage_sums() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO usage_sums SELECT account_id, metric, start_us, host_id, unit, entry_id,
        sum(quantity), count(*) FROM new_records
        GROUP BY account_id, metric, start_us, host_id, unit, entry_id;
    RETURN NULL;
END $$;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'records_usage_sums') THEN
        CREATE TRIGGER records_usage_sums AFTER INSERT ON records
            REFERENCING NEW TABLE AS new_records
            FOR EACH STATEMENT EXECUTE FUNCTION meterd_usage_sums();
    END IF;
END $$;
-- No index on entry_id: only `meterd ledger verify` joins records to their entries, over
-- the whole table (a hash join), and the index cost every ingested record about 1 us
-- of PostgreSQL's CPU (docs/benchmarks.md). Ledgers created with it lose it here.
DROP INDEX IF EXISTS records_entry;
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
    FOREACH t IN ARRAY ARRAY['records', 'journal', 'postings', 'usage_sums'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = t || '_append_only') THEN
            EXECUTE format('CREATE TRIGGER %I BEFORE UPDATE OR DELETE ON %I FOR EACH ROW'
                           ' EXECUTE FUNCTION meterd_append_only()', t || '_append_only', t);
            EXECUTE format('CREATE TRIGGER %I BEFORE TRUNCATE ON %I FOR EACH STATEMENT'
                           ' EXECUTE FUNCTION meterd_append_only()', t || '_no_truncate', t);
        END IF;
    END LOOP;
END $$;
"""

# --- REST API: the control shard's API tokens and audit log -------------------------------
# A token may be revoked once and never un-revoked or deleted; the audit log is
# append-only like the journal (the journal's trigger function refuses UPDATE, DELETE
# and TRUNCATE on it).
API_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_tokens (
    token_id   TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    role       TEXT NOT NULL,
    scopes     TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_us BIGINT NOT NULL,
    created_by TEXT NOT NULL,
    revoked_us BIGINT,
    revoked_by TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS audit_log (
    seq         BIGINT PRIMARY KEY,
    at_us       BIGINT NOT NULL,
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
CREATE OR REPLACE FUNCTION meterd_token_revoke_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.revoked_us IS NULL AND NEW.revoked_us IS NOT NULL
       AND (NEW.token_id, NEW.name, NEW.role, NEW.scopes, NEW.token_hash, NEW.created_us,
            NEW.created_by)
           IS NOT DISTINCT FROM (OLD.token_id, OLD.name, OLD.role, OLD.scopes,
                                 OLD.token_hash, OLD.created_us, OLD.created_by) THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'meterd: % on api_tokens is refused: a token can only be revoked, once',
        TG_OP USING ERRCODE = 'insufficient_privilege';
END $$;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'audit_log_append_only') THEN
        CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
            FOR EACH ROW EXECUTE FUNCTION meterd_append_only();
        CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
            FOR EACH STATEMENT EXECUTE FUNCTION meterd_append_only();
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'api_tokens_revoke_only') THEN
        CREATE TRIGGER api_tokens_revoke_only BEFORE UPDATE OR DELETE ON api_tokens
            FOR EACH ROW EXECUTE FUNCTION meterd_token_revoke_only();
        CREATE TRIGGER api_tokens_no_truncate BEFORE TRUNCATE ON api_tokens
            FOR EACH STATEMENT EXECUTE FUNCTION meterd_append_only();
    END IF;
END $$;
"""

_AUDIT_LOCK = 0x6D61756474  # advisory lock id ("maudt") serialising audit appends
def _bucket_sql(bucket: str, column: str = "start_us") -> str:
    """The start of the bucket (microseconds) a timestamp column falls in."""
    width = BUCKETS[bucket]
    if width:
        return f"({column} - {column} % {width})"
    return (
        "(extract(epoch FROM date_trunc('month', timestamp '1970-01-01'"
        f" + {column} * interval '1 microsecond')))::bigint * 1000000"
    )

# --- end REST API -------------------------------------------------------------------------


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

# A transaction's optimistic inserts go in with one COPY from this many records on;
# fewer, with the INSERT (for which the COPY's second round trip costs more than it saves).
COPY_MIN_RECORDS = 200
_RECORD_COLUMNS = (
    "record_id", "account_id", "entry_id", "host_id", "metric", "unit", "quantity",
    "start_us", "end_us", "seq", "labels", "received_us",
)
# Each column is one parameter, its values joined by newlines (none of them holds one:
# ids, hosts, metrics and units come from restricted alphabets, the labels are JSON with
# its control characters escaped, the rest are numbers) and split by the server: asyncpg
# encodes a text[] element by element, which cost the collector about 2.5 µs a record
# for the nine columns; a text each costs a tenth of that (docs/benchmarks.md). The ids
# inserted come back the same way.
_INSERT_RECORDS = (
    "WITH new AS (INSERT INTO records SELECT r.id, $1, $2, r.host, r.metric, r.unit,"
    " r.q::numeric, r.s::bigint, r.e::bigint, r.seq::bigint, r.labels::jsonb, $3"
    " FROM unnest(string_to_array($4, E'\\n'), string_to_array($5, E'\\n'),"
    " string_to_array($6, E'\\n'), string_to_array($7, E'\\n'), string_to_array($8, E'\\n'),"
    " string_to_array($9, E'\\n'), string_to_array($10, E'\\n'),"
    " string_to_array($11, E'\\n'), string_to_array($12, E'\\n'))"
    " AS r(id, host, metric, unit, q, s, e, seq, labels)"
    " ON CONFLICT (record_id) DO NOTHING RETURNING record_id)"
    " SELECT coalesce(string_agg(record_id, E'\\n'), '') FROM new"
)
_SUMS_OF_RECORDS = (
    "SELECT account_id, metric, start_us, host_id, unit, entry_id, sum(quantity), count(*)"
    " FROM records GROUP BY account_id, metric, start_us, host_id, unit, entry_id"
)
_BACKFILL_SUMS = "INSERT INTO usage_sums " + _SUMS_OF_RECORDS
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
# The same, for the counters of one account, and then its chain head locked and read
# for the entry that follows (one round trip less). UNION ALL runs its branches in
# order, so the locks are taken in the order of the two statements: counters, then
# the head. No head row yet (the account's first entry): none comes back.
_LOCK_COUNTERS_AND_HEAD = (
    "WITH c AS (" + _LOCK_COUNTERS + "),"
    " h AS (SELECT chain_seq, hash FROM chain_heads WHERE account_id = $4 FOR UPDATE)"
    " SELECT c.*, NULL::bigint, NULL::text FROM c"
    " UNION ALL SELECT NULL, NULL, NULL, NULL, NULL, h.chain_seq, h.hash FROM h"
)
_SAVE_COUNTERS = (
    "INSERT INTO counters SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[],"
    " $4::numeric[], $5::numeric[]) ON CONFLICT (account_id, price_id, period_start_us)"
    " DO UPDATE SET quantity = EXCLUDED.quantity, amount = EXCLUDED.amount"
)
_LOCK_HEAD = "SELECT chain_seq, hash FROM chain_heads WHERE account_id = $1 FOR UPDATE"
_NEW_HEAD = "INSERT INTO chain_heads VALUES ($1, 0, $2) ON CONFLICT (account_id) DO NOTHING"
def _seq_upsert(first: int) -> str:
    """The statement that adds the seqs of ingest calls to their host epochs' tracks,
    one row per (host, epoch), its parameters numbered from ``first`` (see
    :func:`_seq_args`), in (host, epoch) order so that concurrent transactions lock
    the tracks in one order. It returns each track's host, epoch and whether this
    created it."""
    hosts, epochs, starts, ats, marks, los, his = (f"${first + i}" for i in range(7))
    return (
        "INSERT INTO seq_tracks AS t SELECT m.host, m.epoch, m.start,"
        " (SELECT range_agg(int8range(r.lo, r.hi))"
        f" FROM unnest({marks}::int[], {los}::bigint[], {his}::bigint[]) AS r(i, lo, hi)"
        " WHERE r.i = m.i), m.at, m.at"
        f" FROM unnest({hosts}::text[], {epochs}::text[], {starts}::bigint[], {ats}::bigint[])"
        " WITH ORDINALITY AS m(host, epoch, start, at, i) ORDER BY m.host, m.epoch"
        " ON CONFLICT (host_id, epoch) DO UPDATE SET seen = t.seen + EXCLUDED.seen,"
        " start_seq = coalesce(t.start_seq, EXCLUDED.start_seq),"
        " updated_us = EXCLUDED.updated_us"
        " RETURNING t.host_id, t.epoch, t.xmax = 0 AS created"
    )


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
    " DO UPDATE SET quantity = EXCLUDED.quantity, amount = EXCLUDED.amount),"
    " period_rows AS (INSERT INTO period_postings (entry_id, account_id, price_id, currency,"
    " period_start_us, origin_start_us, amount) SELECT * FROM unnest($19::text[], $20::text[],"
    " $21::text[], $22::text[], $23::bigint[], $24::bigint[], $25::numeric[])),"
    # The seqs that ingest calls account for, when they staged them (_PgTx.account_seqs);
    # the statement returns the (host, epoch) of each track this created.
    f" seq_rows AS ({_seq_upsert(26)})"
    " UPDATE chain_heads SET chain_seq = $3, hash = $9 WHERE account_id = $2"
    " RETURNING (SELECT array_agg(ARRAY[s.host_id, s.epoch]) FROM seq_rows AS s"
    " WHERE s.created)"
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


_record_id = operator.attrgetter("id")


@functools.lru_cache(maxsize=4096)
def _labels_items_json(items: tuple[tuple[str, str], ...]) -> str:
    return _LABELS_JSON.encode(dict(items))


# Label sets by identity: records of one label set share one read-only mapping
# (common.records), so most lookups find it without hashing its items. Each entry
# holds its mapping, so no other object can take that identity while it is cached.
_LABELS_BY_ID: dict[int, tuple[Mapping[str, str], str, str]] = {}


def _labels_texts(labels: Mapping[str, str]) -> tuple[Mapping[str, str], str, str]:
    """(labels, their JSON, that JSON escaped for COPY's text format), once per set."""
    hit = _LABELS_BY_ID.get(id(labels))
    if hit is not None and hit[0] is labels:
        return hit
    text = _labels_items_json(tuple(sorted(labels.items())))
    if len(_LABELS_BY_ID) >= 4096:
        _LABELS_BY_ID.clear()
    hit = _LABELS_BY_ID[id(labels)] = (labels, text, _copy_escape(text))
    return hit


def _labels_json(labels: Mapping[str, str]) -> str:
    """The labels as JSON text; a fleet repeats a few label sets, each encoded once."""
    return _labels_texts(labels)[1]


def _copy_escape(text: str) -> str:
    """A field for COPY's text format: backslash, tab, newline and carriage return escaped."""
    return text.translate(_COPY_ESCAPES)


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_text(
    records: Sequence[UsageRecord], account_id: str, entry_id: str, received_us: int
) -> bytes:
    """The records as rows of COPY's text format (:func:`_copy_rows`), in their order."""
    return "".join(_copy_rows(records, account_id, entry_id, received_us)).encode()


def _copy_rows(
    records: Sequence[UsageRecord], account_id: str, entry_id: str, received_us: int
) -> list[str]:
    """The records as rows of COPY's text format (the columns of :data:`_RECORD_COLUMNS`).
    Text, not binary: PostgreSQL parses a decimal's text as fast as its binary form, and
    the quantity's canonical text is usually at hand, while asyncpg encodes a Decimal to
    binary at about a microsecond each. Only the account id and the labels' JSON can
    hold characters COPY escapes: record and entry ids are UUIDs, host ids, metrics and
    units come from restricted alphabets, and the rest are numbers."""
    head = f"\t{_copy_escape(account_id)}\t{entry_id}\t"
    tail = f"\t{received_us}\n"
    return [
        f"{r.id}{head}{r.host_id}\t{r.metric}\t{r.unit}\t{r.quantity_text}\t{r.start_us}"
        f"\t{r.end_us}\t{r.seq}\t{_labels_texts(r.labels)[2]}{tail}"
        for r in records
    ]


def _batch_copy_text(
    batch: SeriesBatch, account_id: str, entry_id: str, received_us: int
) -> bytes:
    """:func:`_copy_text` of a batch in column form, the same bytes, its rows sorted by
    record id (:func:`_batch_copy_rows`)."""
    return "".join(_batch_copy_rows(batch, account_id, entry_id, received_us)).encode()


def _batch_copy_rows(
    batch: SeriesBatch, account_id: str, entry_id: str, received_us: int
) -> list[str]:
    """:func:`_copy_rows` of a batch in column form: the fields that one series shares
    (host, metric, unit, labels) are put together once per series, and the rows sorted
    as text, which sorts them by record id (every row starts with its id, canonical
    UUID text, all of one length)."""
    head = f"\t{_copy_escape(account_id)}\t{entry_id}\t{batch.host_id}\t"
    heads = [
        f"{head}{metric}\t{unit}\t"
        for metric, unit in zip(batch.metrics, batch.units, strict=True)
    ]
    tail = f"\t{received_us}\n"
    tails = [f"\t{_labels_texts(labels)[2]}{tail}" for labels in batch.labels]
    rows = [
        f"{record_id}{heads[s]}{q}\t{start}\t{end}\t{seq}{tails[s]}"
        for record_id, s, q, start, end, seq in zip(
            batch.ids, batch.series, batch.quantity_texts, batch.starts_us, batch.ends_us,
            batch.seqs, strict=True,
        )
    ]
    rows.sort()
    return rows


@dataclass(frozen=True, slots=True)
class _Staged:
    """An account batch staged for the transaction's next insert (_PgTx._copy_staged)."""

    account_id: str
    entry_id: str
    records: Sequence[UsageRecord]
    received_us: int

    def copy_rows(self) -> list[str]:
        """Its rows of COPY's text format, sorted by record id."""
        if isinstance(self.records, SeriesBatch):
            return _batch_copy_rows(self.records, self.account_id, self.entry_id,
                                    self.received_us)
        ordered = sorted(self.records, key=_record_id)
        return _copy_rows(ordered, self.account_id, self.entry_id, self.received_us)


_SCHEMA_LOCK = 0x6D65746572  # advisory lock id ("meter") serialising schema creation


async def _nothing_to_reset(conn: asyncpg.Connection) -> None:
    """Pool release hook. The ledger leaves no session state on a connection (no SET,
    LISTEN, cursor or session advisory lock; its one advisory lock is transaction
    scoped) and asyncpg rolls back any open transaction before calling this, so the
    round trip of asyncpg's default reset query (RESET ALL, UNLISTEN *, ...) after
    every transaction is skipped."""


# --- billing (collector.billing): period postings, invoices, credit notes, quarantine -----
# Finalized invoices, credit notes and period postings refuse UPDATE, DELETE and TRUNCATE
# for every role, like the journal; a number series only counts up by one; a quarantined
# record is released (marked, once), never deleted.
BILLING_SCHEMA = """
CREATE TABLE IF NOT EXISTS period_postings (
    entry_id        TEXT NOT NULL,
    account_id      TEXT NOT NULL,
    price_id        TEXT NOT NULL,
    currency        TEXT NOT NULL,
    period_start_us BIGINT NOT NULL,
    origin_start_us BIGINT NOT NULL,
    amount          NUMERIC NOT NULL,
    PRIMARY KEY (entry_id, price_id, origin_start_us)
);
CREATE INDEX IF NOT EXISTS period_postings_period ON period_postings (account_id, period_start_us);
CREATE TABLE IF NOT EXISTS invoices (
    invoice_id        TEXT PRIMARY KEY,
    account_id        TEXT NOT NULL,
    period_start_us   BIGINT NOT NULL,
    period_end_us     BIGINT NOT NULL,
    status            TEXT NOT NULL CHECK (status IN ('draft', 'finalized')),
    number            TEXT UNIQUE,
    currency          TEXT NOT NULL,
    total             NUMERIC NOT NULL,
    document          TEXT NOT NULL,
    digest            TEXT NOT NULL,
    entry_id          TEXT NOT NULL,
    rounding_entry_id TEXT NOT NULL,
    created_us        BIGINT NOT NULL,
    finalized_us      BIGINT NOT NULL,
    quote_request     TEXT NOT NULL,
    CHECK ((status = 'draft') = (number IS NULL)),
    UNIQUE (account_id, period_start_us)
);
CREATE TABLE IF NOT EXISTS credit_notes (
    credit_note_id TEXT PRIMARY KEY,
    number         TEXT NOT NULL UNIQUE,
    invoice_id     TEXT NOT NULL,
    account_id     TEXT NOT NULL,
    currency       TEXT NOT NULL,
    total          NUMERIC NOT NULL,
    document       TEXT NOT NULL,
    digest         TEXT NOT NULL,
    entry_id       TEXT NOT NULL,
    created_us     BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS credit_notes_invoice ON credit_notes (invoice_id);
CREATE TABLE IF NOT EXISTS number_series (
    kind   TEXT PRIMARY KEY,
    series TEXT NOT NULL UNIQUE,
    last   BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine (
    record_id   TEXT PRIMARY KEY,
    account_id  TEXT NOT NULL,
    host_id     TEXT NOT NULL,
    record      TEXT NOT NULL,
    reason      TEXT NOT NULL,
    received_us BIGINT NOT NULL,
    released_us BIGINT NOT NULL DEFAULT 0,
    released_by TEXT NOT NULL DEFAULT ''
);
CREATE OR REPLACE FUNCTION meterd_invoice_finalized() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status = 'finalized' THEN
        RAISE EXCEPTION 'meterd: % of invoice % is refused: a finalized invoice never changes',
            TG_OP, OLD.number USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END $$;
CREATE OR REPLACE FUNCTION meterd_number_series() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.kind = OLD.kind AND NEW.series = OLD.series
       AND NEW.last = OLD.last + 1 THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'meterd: % on number_series is refused: a series only counts up by one',
        TG_OP USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE OR REPLACE FUNCTION meterd_quarantine_release() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.released_us = 0 AND NEW.released_us <> 0
       AND (NEW.record_id, NEW.account_id, NEW.host_id, NEW.record, NEW.reason, NEW.received_us)
           IS NOT DISTINCT FROM (OLD.record_id, OLD.account_id, OLD.host_id, OLD.record,
                                 OLD.reason, OLD.received_us) THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'meterd: % on quarantine is refused: a record is released once, never deleted',
        TG_OP USING ERRCODE = 'insufficient_privilege';
END $$;
DO $$
DECLARE t TEXT;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'invoices_finalized') THEN
        CREATE TRIGGER invoices_finalized BEFORE UPDATE OR DELETE ON invoices
            FOR EACH ROW EXECUTE FUNCTION meterd_invoice_finalized();
        CREATE TRIGGER invoices_no_truncate BEFORE TRUNCATE ON invoices
            FOR EACH STATEMENT EXECUTE FUNCTION meterd_append_only();
        CREATE TRIGGER number_series_count_up BEFORE UPDATE OR DELETE ON number_series
            FOR EACH ROW EXECUTE FUNCTION meterd_number_series();
        CREATE TRIGGER number_series_no_truncate BEFORE TRUNCATE ON number_series
            FOR EACH STATEMENT EXECUTE FUNCTION meterd_append_only();
        CREATE TRIGGER quarantine_release_only BEFORE UPDATE OR DELETE ON quarantine
            FOR EACH ROW EXECUTE FUNCTION meterd_quarantine_release();
        CREATE TRIGGER quarantine_no_truncate BEFORE TRUNCATE ON quarantine
            FOR EACH STATEMENT EXECUTE FUNCTION meterd_append_only();
        FOREACH t IN ARRAY ARRAY['period_postings', 'credit_notes'] LOOP
            EXECUTE format('CREATE TRIGGER %I BEFORE UPDATE OR DELETE ON %I FOR EACH ROW'
                           ' EXECUTE FUNCTION meterd_append_only()', t || '_append_only', t);
            EXECUTE format('CREATE TRIGGER %I BEFORE TRUNCATE ON %I FOR EACH STATEMENT'
                           ' EXECUTE FUNCTION meterd_append_only()', t || '_no_truncate', t);
        END LOOP;
    END IF;
END $$;
"""

_PERIOD_POSTING_COLUMNS = (
    "entry_id, account_id, price_id, currency, period_start_us, origin_start_us, amount"
)
_QUARANTINE_COLUMNS = "record, account_id, reason, received_us, released_us, released_by"
_UPSERT_INVOICE = (
    f"INSERT INTO invoices ({INVOICE_COLUMNS})"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
    " ON CONFLICT (account_id, period_start_us) DO UPDATE SET"
    " status = EXCLUDED.status, number = EXCLUDED.number, total = EXCLUDED.total,"
    " document = EXCLUDED.document, digest = EXCLUDED.digest, entry_id = EXCLUDED.entry_id,"
    " rounding_entry_id = EXCLUDED.rounding_entry_id, finalized_us = EXCLUDED.finalized_us,"
    " quote_request = EXCLUDED.quote_request"
    " WHERE invoices.status = 'draft'"
)
# A series is created at 0 and counted up in the same transaction. The insert names no
# conflict target so that it waits on either unique key: with ``ON CONFLICT (kind)``,
# two first numbers of one series at once could collide on ``series`` and fail.
_NEXT_NUMBER = "UPDATE number_series SET last = last + 1 WHERE kind = $1 RETURNING series, last"
_NEW_SERIES = "INSERT INTO number_series VALUES ($1, $2, 0) ON CONFLICT DO NOTHING"


def _pg_invoice(row: Sequence[Any]) -> StoredInvoice:
    return StoredInvoice(*row)


def _pg_credit_note(row: Sequence[Any]) -> StoredCreditNote:
    return StoredCreditNote(*row)


def _pg_period_posting(row: Sequence[Any]) -> PeriodPosting:
    return PeriodPosting(*row)


def _pg_quarantined(row: Sequence[Any]) -> QuarantinedRecord:
    return QuarantinedRecord(record_from_json(row[0]), row[1], row[2], row[3], row[4], row[5])


def _numbered(sql: str) -> str:
    """``?`` placeholders as ``$1, $2, ...``."""
    parts = sql.split("?")
    return "".join(f"{part}${i}" for i, part in enumerate(parts[:-1], start=1)) + parts[-1]


def _pg_invoice_values(invoice: StoredInvoice) -> tuple[Any, ...]:
    return (
        invoice.invoice_id, invoice.account_id, invoice.period_start_us, invoice.period_end_us,
        invoice.status, invoice.number, invoice.currency, invoice.total, invoice.document,
        invoice.digest, invoice.entry_id, invoice.rounding_entry_id, invoice.created_us,
        invoice.finalized_us, invoice.quote_request,
    )


class _PgBillingStore:
    """The billing reads of :class:`PostgresLedger` (see :class:`LedgerStore`)."""

    if TYPE_CHECKING:

        async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]: ...

    async def invoices(self, query: InvoiceQuery) -> list[StoredInvoice]:
        conditions, params = invoice_query_filter(query)
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        limit = f" LIMIT {int(query.limit)}" if query.limit is not None else ""
        rows = await self._fetch(
            _numbered(
                f"SELECT {INVOICE_COLUMNS} FROM invoices{where}"
                f" ORDER BY period_start_us, invoice_id{limit}"
            ),
            *params,
        )
        return [_pg_invoice(r) for r in rows]

    async def invoice(self, ref: str) -> StoredInvoice | None:
        rows = await self._fetch(
            f"SELECT {INVOICE_COLUMNS} FROM invoices WHERE invoice_id = $1 OR number = $1", ref
        )
        return _pg_invoice(rows[0]) if rows else None

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
        rows = await self._fetch(
            _numbered(
                f"SELECT {CREDIT_NOTE_COLUMNS} FROM credit_notes{where}"
                " ORDER BY created_us, number"
            ),
            *params,
        )
        return [_pg_credit_note(r) for r in rows]

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
        rows = await self._fetch(
            _numbered(f"SELECT {_QUARANTINE_COLUMNS} FROM quarantine{where} ORDER BY record_id"),
            *params,
        )
        return [_pg_quarantined(r) for r in rows]

    async def period_posting_totals(
        self,
    ) -> tuple[dict[str, Decimal], dict[tuple[str, int], Decimal]]:
        by_entry = {
            r[0]: r[1]
            for r in await self._fetch(
                "SELECT entry_id, sum(amount) FROM period_postings GROUP BY entry_id"
            )
        }
        by_period = {
            (r[0], r[1]): r[2]
            for r in await self._fetch(
                "SELECT account_id, period_start_us, sum(amount) FROM period_postings"
                " GROUP BY account_id, period_start_us"
            )
        }
        return by_entry, by_period

    async def number_series(self) -> dict[str, str]:
        return {r[0]: r[1] for r in await self._fetch("SELECT kind, series FROM number_series")}


def _period_columns(
    rows: Sequence[PeriodPosting],
) -> tuple[list[str], list[str], list[str], list[str], list[int], list[int], list[Decimal]]:
    return (
        [r.entry_id for r in rows],
        [r.account_id for r in rows],
        [r.price_id for r in rows],
        [r.currency for r in rows],
        [r.period_start_us for r in rows],
        [r.origin_start_us for r in rows],
        [r.amount for r in rows],
    )


class _PgBillingTx:
    """The billing statements of :class:`_PgTx` (see :class:`LedgerTx`)."""

    _conn: asyncpg.Connection
    _periods: list[PeriodPosting]  # inserted, not yet written: see insert_period_postings

    async def _copy_staged(self) -> None:
        """Send the records staged by optimistic inserts (:class:`_PgTx`): what reads
        records, or their sums, in the transaction sees them."""

    async def lock_account(self, account_id: str) -> None:
        conn = self._conn
        if await conn.fetchrow(_LOCK_HEAD, account_id) is None:
            await conn.execute(_NEW_HEAD, account_id, GENESIS_HASH)
            await conn.fetchrow(_LOCK_HEAD, account_id)

    async def finalized_periods(self, account_id: str, from_us: int) -> list[int]:
        rows = await self._conn.fetch(
            "SELECT period_start_us FROM invoices WHERE account_id = $1"
            " AND status = 'finalized' AND period_start_us >= $2 ORDER BY period_start_us",
            account_id,
            from_us,
        )
        return [r[0] for r in rows]

    async def insert_period_postings(self, rows: Sequence[PeriodPosting]) -> None:
        """Staged: written by the transaction's next journal entry (a usage entry's own
        statement), or before anything reads them, or before COMMIT."""
        self._periods.extend(rows)

    async def _write_periods(self) -> None:
        if self._periods:
            rows, self._periods = self._periods, []
            await self._conn.execute(
                f"INSERT INTO period_postings ({_PERIOD_POSTING_COLUMNS}) SELECT * FROM"
                " unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[],"
                " $6::bigint[], $7::numeric[])",
                *_period_columns(rows),
            )

    async def period_counters(self, account_id: str, period_start_us: int) -> dict[str, Counter]:
        rows = await self._conn.fetch(
            "SELECT price_id, quantity, amount FROM counters"
            " WHERE account_id = $1 AND period_start_us = $2",
            account_id,
            period_start_us,
        )
        return {r[0]: Counter(r[1], r[2]) for r in rows}

    async def period_postings(self, account_id: str, period_start_us: int) -> list[PeriodPosting]:
        await self._write_periods()
        rows = await self._conn.fetch(
            f"SELECT {_PERIOD_POSTING_COLUMNS} FROM period_postings"
            " WHERE account_id = $1 AND period_start_us = $2 ORDER BY entry_id, price_id",
            account_id,
            period_start_us,
        )
        return [_pg_period_posting(r) for r in rows]

    async def record_quantities(
        self, account_id: str, metrics: Sequence[str], from_us: int, to_us: int
    ) -> list[tuple[str, int, Decimal]]:
        if not metrics:
            return []
        await self._copy_staged()
        rows = await self._conn.fetch(
            "SELECT metric, start_us, sum(quantity) FROM usage_sums WHERE account_id = $1"
            " AND metric = ANY($2::text[]) AND start_us >= $3 AND start_us < $4"
            " GROUP BY metric, start_us ORDER BY start_us, metric",
            account_id,
            list(metrics),
            from_us,
            to_us,
        )
        return [(r[0], r[1], r[2]) for r in rows]

    async def first_usage_us(self, account_id: str) -> int | None:
        await self._copy_staged()
        value = await self._conn.fetchval(
            "SELECT min(start_us) FROM usage_sums WHERE account_id = $1", account_id
        )
        return None if value is None else int(value)

    async def invoices_of(self, account_id: str, from_us: int, to_us: int) -> list[StoredInvoice]:
        rows = await self._conn.fetch(
            f"SELECT {INVOICE_COLUMNS} FROM invoices WHERE account_id = $1"
            " AND period_start_us >= $2 AND period_start_us < $3 ORDER BY period_start_us",
            account_id,
            from_us,
            to_us,
        )
        return [_pg_invoice(r) for r in rows]

    async def save_draft(self, invoice: StoredInvoice) -> bool:
        status = await self._conn.execute(_UPSERT_INVOICE, *_pg_invoice_values(invoice))
        return bool(status.endswith(" 1"))

    async def save_finalized(self, invoice: StoredInvoice) -> None:
        status = await self._conn.execute(_UPSERT_INVOICE, *_pg_invoice_values(invoice))
        if not status.endswith(" 1"):
            raise IntegrityError(
                f"invoice of account {invoice.account_id} for period {invoice.period_start_us}"
                " is already finalized"
            )

    async def next_number(self, kind: str, series: str) -> tuple[str, int]:
        row = await self._conn.fetchrow(_NEXT_NUMBER, kind)
        if row is None:
            await self._conn.execute(_NEW_SERIES, kind, series)
            row = await self._conn.fetchrow(_NEXT_NUMBER, kind)
        if row is None:
            holder = await self._conn.fetchval(
                "SELECT kind FROM number_series WHERE series = $1", series
            )
            raise series_held(series, kind, str(holder))
        return str(row[0]), int(row[1])

    async def insert_credit_note(self, note: StoredCreditNote) -> None:
        await self._conn.execute(
            f"INSERT INTO credit_notes ({CREDIT_NOTE_COLUMNS})"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            note.credit_note_id, note.number, note.invoice_id, note.account_id, note.currency,
            note.total, note.document, note.digest, note.entry_id, note.created_us,
        )

    async def credit_notes_of(self, invoice_id: str) -> list[StoredCreditNote]:
        rows = await self._conn.fetch(
            f"SELECT {CREDIT_NOTE_COLUMNS} FROM credit_notes WHERE invoice_id = $1"
            " ORDER BY created_us, number",
            invoice_id,
        )
        return [_pg_credit_note(r) for r in rows]

    async def quarantine(self, rows: Sequence[QuarantinedRecord]) -> set[str]:
        await self._copy_staged()
        ordered = sorted(rows, key=lambda q: q.record.id)
        new = await self._conn.fetch(
            "INSERT INTO quarantine (record_id, account_id, host_id, record, reason, received_us)"
            " SELECT q.id, q.account, q.host, q.record, q.reason, q.received"
            " FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],"
            " $6::bigint[]) AS q(id, account, host, record, reason, received)"
            " WHERE NOT EXISTS (SELECT 1 FROM records WHERE record_id = q.id)"
            " ON CONFLICT (record_id) DO NOTHING RETURNING record_id",
            [q.record.id for q in ordered],
            [q.account_id for q in ordered],
            [q.record.host_id for q in ordered],
            [record_to_json(q.record) for q in ordered],
            [q.reason for q in ordered],
            [q.received_us for q in ordered],
        )
        return {r[0] for r in new}

    async def mark_released(self, record_ids: Sequence[str], at_us: int, by: str) -> None:
        await self._conn.execute(
            "UPDATE quarantine SET released_us = $1, released_by = $2"
            " WHERE record_id = ANY($3::text[]) AND released_us = 0",
            at_us,
            by,
            list(record_ids),
        )


# --- end billing --------------------------------------------------------------------------


class PostgresLedger(_PgBillingStore):
    """One shard: a connection pool to one PostgreSQL database."""

    def __init__(self, dsn: str, pool: asyncpg.Pool, name: str) -> None:
        self.dsn = dsn
        self.name = name
        self._pool = pool
        self.concurrency = pool.get_max_size()

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
                sums_missing = await conn.fetchval("SELECT to_regclass('usage_sums') IS NULL")
                await conn.execute(SCHEMA)
                if sums_missing:  # a new ledger, or one created before usage sums
                    await conn.execute(_BACKFILL_SUMS)
                await conn.execute(API_SCHEMA)
                await conn.execute(OUTBOX_SCHEMA)
                await conn.execute(FLEET_SCHEMA)
                await conn.execute(SEQ_SCHEMA)
                await conn.execute(BILLING_SCHEMA)  # billing (collector.billing)
        except UNAVAILABLE as exc:
            raise StoreUnavailable(f"PostgreSQL shard {name or dsn}: {exc}") from exc
        return cls(dsn, pool, name or _redact(dsn))

    @timed_transaction
    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_PgTx]:
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                tx = _PgTx(conn)
                yield tx
                await tx.flush()
                await tx.flush_outbox()
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
            "SELECT metric, unit, sum(quantity), sum(records)::bigint FROM usage_sums"
            " WHERE account_id = $1 GROUP BY metric, unit ORDER BY metric, unit",
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

    async def usage_sum_mismatches(self) -> list[str]:
        rows = await self._fetch(
            "SELECT entry_id, account_id, metric, start_us, host_id, unit, r.q, r.n, s.q, s.n"
            f" FROM ({_SUMS_OF_RECORDS}) AS r(account_id, metric, start_us, host_id, unit,"
            " entry_id, q, n) FULL JOIN (SELECT account_id, metric, start_us, host_id, unit,"
            " entry_id, sum(quantity), sum(records)::bigint FROM usage_sums GROUP BY account_id,"
            " metric, start_us, host_id, unit, entry_id) AS s(account_id, metric, start_us,"
            " host_id, unit, entry_id, q, n)"
            " USING (account_id, metric, start_us, host_id, unit, entry_id)"
            " WHERE r.q IS DISTINCT FROM s.q OR r.n IS DISTINCT FROM s.n"
            " ORDER BY entry_id, metric, start_us, host_id, unit"
        )
        return [describe_sum_mismatch(*r) for r in rows]

    # --- running counters and sequences (verify, collector.sequences) -------------------
    async def counters(self) -> dict[CounterKey, Counter]:
        rows = await self._fetch(
            "SELECT account_id, price_id, period_start_us, quantity, amount FROM counters"
        )
        return {CounterKey(r[0], r[1], r[2]): Counter(r[3], r[4]) for r in rows}

    async def record_sums(self) -> list[tuple[str, str, int, Decimal]]:
        rows = await self._fetch(
            "SELECT account_id, metric, start_us, sum(quantity) FROM records"
            " GROUP BY account_id, metric, start_us"
        )
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    async def seq_tracks(self, host_id: str | None = None) -> list[SeqTrack]:
        rows = await self._fetch(
            "SELECT host_id, epoch, start_seq, seen, first_us, updated_us FROM seq_tracks"
            " WHERE $1::text IS NULL OR host_id = $1 ORDER BY host_id, epoch",
            host_id,
        )
        return [
            SeqTrack(r[0], r[1], r[2], tuple((x.lower, x.upper) for x in r[3]), r[4], r[5])
            for r in rows
        ]

    async def seq_holes(self, host_id: str | None = None) -> list[SeqHole]:
        rows = await self._fetch(_SEQ_HOLES + " WHERE $1::text IS NULL OR host_id = $1"
                                 " ORDER BY host_id, epoch, lo", host_id)
        return [SeqHole(*r) for r in rows]

    # --- end running counters and sequences ---------------------------------------------

    # --- fleet health -------------------------------------------------------------------

    async def fleet_agents(self) -> list[AgentFacts]:
        rows = await self._fetch(
            f"SELECT {FLEET_AGENT_COLUMNS} FROM fleet_agents ORDER BY host_id"
        )
        return [AgentFacts(*row) for row in rows]

    # --- end fleet health ---------------------------------------------------------------

    # --- REST API: queries, tokens and audit log ------------------------------------------
    async def usage_series(self, query: UsageQuery) -> list[UsageBucket]:
        # Text compares in "C" collation: byte order, the order Python merges shards in.
        where = ["start_us >= $1", "start_us < $2"]
        params: list[Any] = [query.from_us, query.to_us]
        for column, value in (
            ("account_id", query.account_id),
            ("host_id", query.host_id),
            ("metric", query.metric),
        ):
            if value is not None:
                params.append(value)
                where.append(f"{column} = ${len(params)}")
        having = ""
        if query.after is not None:
            n = len(params)
            having = (
                'HAVING (b, account_id COLLATE "C", host_id COLLATE "C", metric COLLATE "C",'
                f' unit COLLATE "C") > (${n + 1}::bigint, ${n + 2}::text, ${n + 3}::text,'
                f" ${n + 4}::text, ${n + 5}::text)"
            )
            params.extend(query.after)
        params.append(query.limit)
        sql = (
            "SELECT b, account_id, host_id, metric, unit, sum(quantity), sum(records)::bigint"
            f" FROM (SELECT {_bucket_sql(query.bucket)} AS b, account_id, host_id, metric,"
            f" unit, quantity, records FROM usage_sums WHERE {' AND '.join(where)}) AS r"
            f" GROUP BY b, account_id, host_id, metric, unit {having}"
            ' ORDER BY b, account_id COLLATE "C", host_id COLLATE "C", metric COLLATE "C",'
            f' unit COLLATE "C" LIMIT ${len(params)}'
        )
        rows = await self._fetch(sql, *params)
        return [UsageBucket(r[0], r[1], r[2], r[3], r[4], r[5], r[6]) for r in rows]

    async def journal_page(
        self, account_id: str, *, from_us: int, to_us: int, after_seq: int, limit: int
    ) -> list[ChainLink]:
        entries = await self._fetch(
            "SELECT entry_id, chain_seq, kind, memo, created_us, records_digest, prev_hash, hash"
            " FROM journal WHERE account_id = $1 AND chain_seq > $2 AND created_us >= $3"
            " AND created_us < $4 ORDER BY chain_seq LIMIT $5",
            account_id, after_seq, from_us, to_us, limit,
        )
        postings: dict[str, list[Posting]] = {}
        for r in await self._fetch(
            "SELECT entry_id, ledger_account, currency, amount FROM postings"
            " WHERE entry_id = ANY($1::text[]) ORDER BY entry_id, idx",
            [e[0] for e in entries],
        ):
            postings.setdefault(r[0], []).append(Posting(r[1], r[2], r[3]))
        return [
            ChainLink(
                restore_entry(e[0], account_id, e[2], e[3], e[4], postings.get(e[0], []), e[5]),
                e[1], e[6], e[7],
            )
            for e in entries
        ]

    async def find_token(self, token_hash: str) -> ApiToken | None:
        rows = await self._fetch(
            f"SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE token_hash = $1", token_hash
        )
        return ApiToken.from_row(rows[0]) if rows else None

    async def tokens(self) -> list[ApiToken]:
        rows = await self._fetch(
            f"SELECT {TOKEN_COLUMNS} FROM api_tokens ORDER BY created_us, token_id"
        )
        return [ApiToken.from_row(r) for r in rows]

    async def audit_rows(
        self, *, from_us: int, to_us: int, after_seq: int, limit: int | None
    ) -> list[AuditRow]:
        rows = await self._fetch(
            f"SELECT {AUDIT_COLUMNS} FROM audit_log WHERE seq > $1 AND at_us >= $2"
            " AND at_us < $3 ORDER BY seq LIMIT $4",
            after_seq, from_us, to_us, limit,
        )
        return [AuditRow(*r) for r in rows]

    # --- end REST API ----------------------------------------------------------------------

    # --- reports (collector.api.reports) ------------------------------------------------
    async def revenue(self, from_us: int, to_us: int) -> list[RevenueRow]:
        rows = await self._fetch(
            f"SELECT {_bucket_sql('month', 'j.created_us')} AS m, p.ledger_account,"
            " p.currency, sum(p.amount)"
            " FROM postings AS p JOIN journal AS j ON j.entry_id = p.entry_id"
            " WHERE starts_with(p.ledger_account, $1) AND j.created_us >= $2"
            " AND j.created_us < $3 GROUP BY m, p.ledger_account, p.currency",
            REVENUE_PREFIX, from_us, to_us,
        )
        return [
            RevenueRow(r[0], r[1][len(REVENUE_PREFIX):], r[2], -r[3]) for r in rows
        ]

    # --- end reports ----------------------------------------------------------------------

    async def close(self) -> None:
        await self._pool.close()


class _PgTx(_PgBillingTx):
    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self._counters: list[tuple[CounterKey, Counter]] = []  # saved, not yet written
        self._events: list[tuple[str, str, str, str, int]] = []  # emitted, see flush_outbox
        self._periods = []
        # Chain heads locked and read by load_counters, each taken by the next entry.
        self._heads: dict[str, tuple[int, str]] = {}
        self._seqs: list[SeqMarks] = []  # staged by account_seqs, not yet written
        # Optimistic inserts not yet sent, in the order they were staged.
        self._copy: list[_Staged] = []

    async def flush(self) -> None:
        """Write the records, counters, period postings and seqs staged since the last
        write."""
        await self._copy_staged()
        if self._counters:
            ordered, self._counters = self._counters, []
            await self._conn.execute(_SAVE_COUNTERS, *_counter_columns(ordered))
        await self._write_periods()
        await self._write_seqs()

    async def insert_records(
        self,
        account_id: str,
        entry_id: str,
        records: Sequence[UsageRecord],
        received_us: int,
        optimistic: bool = False,
    ) -> set[str]:
        """Optimistic: staged, on the expectation that none is stored yet (every batch
        but a resend), and sent with the transaction's next statement together with the
        account batches staged before it (:meth:`_copy_staged`): one COPY when they hold
        :data:`COPY_MIN_RECORDS` records or more, so that the small calls of a group
        share one. If any id is already there (or another collector is inserting it right
        now and commits), the unique key fails the COPY and with it the transaction:
        :class:`InsertConflict`, and the caller runs the transaction again without
        ``optimistic``. No savepoint around the COPY: its two round trips and its
        subtransaction cost every batch more than running the rare resend's transaction
        twice (docs/benchmarks.md).

        Otherwise the records go in at once with ``ON CONFLICT DO NOTHING``, and the ids
        it inserted are the new ones: the unique key decides either way."""
        if not records:
            return set()
        if optimistic:
            self._copy.append(_Staged(account_id, entry_id, records, received_us))
            if isinstance(records, SeriesBatch):
                return set(records.ids)
            return set(map(_record_id, records))
        await self._copy_staged()
        return await self._insert(account_id, entry_id, records, received_us)

    async def _insert(
        self, account_id: str, entry_id: str, records: Sequence[UsageRecord], received_us: int
    ) -> set[str]:
        """``INSERT ... ON CONFLICT DO NOTHING`` of the records, by record id; the ids
        inserted."""
        ordered = sorted(records, key=_record_id)
        # One pass over the records, then one newline-joined text per column.
        columns = map("\n".join, zip(
            *[(r.id, r.host_id, r.metric, r.unit, r.quantity_text, str(r.start_us),
               str(r.end_us), str(r.seq), _labels_json(r.labels)) for r in ordered],
            strict=True,
        ))
        new: str = await self._conn.fetchval(
            _INSERT_RECORDS, account_id, entry_id, received_us, *columns
        )
        return set(new.split("\n")) if new else set()

    async def _copy_staged(self) -> None:
        """Send the staged account batches, in the order they were staged (the ingest
        path stages them in account order), each by record id: one COPY, or the INSERT
        of each when together they are fewer than :data:`COPY_MIN_RECORDS`. Inserting
        without staging (``optimistic=False``) takes the same order, so two transactions
        that insert some of the same ids take their index entries in one order whichever
        way each goes. A stored id fails them: :class:`InsertConflict`."""
        if not self._copy:
            return
        staged, self._copy = self._copy, []
        if sum(len(s.records) for s in staged) < COPY_MIN_RECORDS:
            for s in staged:
                new = await self._insert(s.account_id, s.entry_id, s.records, s.received_us)
                if len(new) != len(s.records):
                    raise InsertConflict(
                        f"{len(s.records) - len(new)} record(s) of account {s.account_id}"
                        " already stored"
                    )
            return
        text = "".join(itertools.chain.from_iterable(map(_Staged.copy_rows, staged))).encode()
        try:
            # A memoryview: asyncpg would take bytes for a file name.
            await self._conn.copy_to_table(
                "records", source=memoryview(text), columns=_RECORD_COLUMNS, format="text"
            )
        except asyncpg.exceptions.UniqueViolationError as exc:
            raise InsertConflict(exc.detail or str(exc)) from None

    async def hold(self, records: Sequence[UsageRecord], received_us: int) -> set[str]:
        await self._copy_staged()
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
        columns = (
            [k.account_id for k in ordered],
            [k.price_id for k in ordered],
            [k.period_start_us for k in ordered],
        )
        account_id = ordered[0].account_id
        if account_id != ordered[-1].account_id:  # several accounts (sorted: first, last)
            rows = await self._conn.fetch(_LOCK_COUNTERS, *columns)
            return {CounterKey(r[0], r[1], r[2]): Counter(r[3], r[4]) for r in rows}
        # One account, as a usage entry's: its chain head comes along for the entry.
        rows = await self._conn.fetch(_LOCK_COUNTERS_AND_HEAD, *columns, account_id)
        found: dict[CounterKey, Counter] = {}
        for r in rows:
            if r[0] is None:
                self._heads[account_id] = (r[5], r[6])
            else:
                found[CounterKey(r[0], r[1], r[2])] = Counter(r[3], r[4])
        return found

    async def save_counters(self, values: Mapping[CounterKey, Counter]) -> None:
        await self.flush()
        self._counters = sorted(values.items())

    async def append_entry(self, entry: JournalEntry) -> ChainLink:
        conn = self._conn
        head = self._heads.pop(entry.account_id, None)  # locked and read by load_counters
        if head is None:
            head = await conn.fetchrow(_LOCK_HEAD, entry.account_id)
        if head is None:  # the account's first entry: create its chain head, then lock it
            await conn.execute(_NEW_HEAD, entry.account_id, GENESIS_HASH)
            head = await conn.fetchrow(_LOCK_HEAD, entry.account_id)
            assert head is not None
        seq, prev = head[0] + 1, head[1]
        digest = entry_hash(entry, seq, prev)
        counters, self._counters = self._counters, []
        periods, self._periods = self._periods, []
        postings = entry.postings
        marks, self._seqs = self._seqs, []
        created = await conn.fetchval(
            _APPEND_ENTRY,
            entry.id, entry.account_id, seq, entry.kind, entry.memo, entry.created_us,
            entry.records_digest, prev, digest,
            list(range(len(postings))),
            [p.ledger_account for p in postings],
            [p.currency for p in postings],
            [p.amount for p in postings],
            *_counter_columns(counters),
            *_period_columns(periods),
            *_seq_args(marks),
        )
        _created(marks, {(host, epoch) for host, epoch in created or ()})
        return ChainLink(entry, seq, prev, digest)

    # --- sequences (collector.sequences) ------------------------------------------------
    async def account_seqs(self, marks: SeqMarks) -> None:
        """Staged: written by the transaction's next journal entry, in its statement (one
        round trip fewer for every ingest call), or by :meth:`flush` before the commit.
        The ingest path stages them just before its last entry, so the host's track is
        still the last lock it takes (see ``LedgerService._post_shard_once``)."""
        if marks.ranges:
            self._seqs.append(marks)

    async def _write_seqs(self) -> None:
        marks, self._seqs = self._seqs, []
        if marks:
            rows = await self._conn.fetch(_ACCOUNT_SEQS, *_seq_args(marks))
            _created(marks, {(r[0], r[1]) for r in rows if r[2]})

    async def claim_seq_check(self) -> bool:
        claimed: bool = await self._conn.fetchval(
            "SELECT pg_try_advisory_xact_lock($1)", _SEQ_CHECK_LOCK
        )
        return claimed

    async def current_seq_holes(self) -> list[tuple[str, str, int, int]]:
        rows = await self._conn.fetch(_CURRENT_SEQ_HOLES)
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    async def stored_seq_holes(self) -> list[SeqHole]:
        rows = await self._conn.fetch(_SEQ_HOLES + " ORDER BY host_id, epoch, lo")
        return [SeqHole(*r) for r in rows]

    async def replace_seq_holes(self, holes: Sequence[SeqHole]) -> None:
        await self._conn.execute("DELETE FROM seq_holes")
        if holes:
            await self._conn.execute(
                "INSERT INTO seq_holes SELECT * FROM unnest($1::text[], $2::text[],"
                " $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[])",
                [h.host_id for h in holes], [h.epoch for h in holes], [h.lo for h in holes],
                [h.hi for h in holes], [h.since_us for h in holes],
                [h.detected_us for h in holes],
            )

    # --- end sequences ------------------------------------------------------------------

    # --- REST API: tokens and audit log (control shard) ------------------------------------
    async def insert_token(self, token: ApiToken, token_hash: str) -> None:
        await self._conn.execute(
            "INSERT INTO api_tokens VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            token.token_id, token.name, token.role, ",".join(token.scopes), token_hash,
            token.created_us, token.created_by, token.revoked_us, token.revoked_by,
        )

    async def get_token(self, token_id: str) -> ApiToken | None:
        row = await self._conn.fetchrow(
            f"SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE token_id = $1 FOR UPDATE", token_id
        )
        return ApiToken.from_row(row) if row else None

    async def revoke_token(self, token_id: str, at_us: int, by: str) -> None:
        await self._conn.execute(
            "UPDATE api_tokens SET revoked_us = $1, revoked_by = $2 WHERE token_id = $3",
            at_us, by, token_id,
        )

    async def audit_head(self) -> tuple[int, str]:
        await self._conn.execute("SELECT pg_advisory_xact_lock($1)", _AUDIT_LOCK)
        row = await self._conn.fetchrow(
            "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1"
        )
        return (row[0], row[1]) if row else (0, GENESIS_HASH)

    async def insert_audit(self, row: AuditRow) -> None:
        await self._conn.execute(
            "INSERT INTO audit_log VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            row.seq, row.at_us, row.actor, row.action, row.target, row.before, row.after,
            row.prev_hash, row.hash,
        )

    async def stage_audit(self, row: StagedAudit) -> None:
        await self._conn.execute(
            "INSERT INTO audit_staged VALUES ($1, $2, $3, $4, $5, $6, $7)",
            row.staged_id, row.at_us, row.actor, row.action, row.target, row.before, row.after,
        )

    async def staged_audits(self) -> list[StagedAudit]:
        rows = await self._conn.fetch(
            f"SELECT {STAGED_AUDIT_COLUMNS} FROM audit_staged ORDER BY at_us, staged_id"
        )
        return [StagedAudit(*r) for r in rows]

    async def drop_staged_audits(self, staged_ids: Sequence[str]) -> None:
        await self._conn.execute(
            "DELETE FROM audit_staged WHERE staged_id = ANY($1::text[])", list(staged_ids)
        )

    async def relayed_audits(self, staged_ids: Sequence[str]) -> set[str]:
        rows = await self._conn.fetch(
            "SELECT staged_id FROM audit_relayed WHERE staged_id = ANY($1::text[])",
            list(staged_ids),
        )
        return {r[0] for r in rows}

    async def mark_audit_relayed(self, staged_id: str, seq: int) -> None:
        await self._conn.execute("INSERT INTO audit_relayed VALUES ($1, $2)", staged_id, seq)

    # --- end REST API ----------------------------------------------------------------------

    # --- outbox (collector.ledger.outbox) ------------------------------------------------

    async def emit(self, event_type: str, account_id: str, data: Mapping[str, Any]) -> str:
        """Checked now, written by :meth:`flush_outbox` just before COMMIT."""
        text = encode_data(event_type, account_id, data)
        event_id = new_id()
        self._events.append((event_id, event_type, account_id, text, time.time_ns() // 1000))
        return event_id

    async def flush_outbox(self) -> None:
        """Number and write the events emitted in this transaction. Taking the shard's
        outbox head row is the last lock a transaction takes (no lock cycle can form
        through it) and it is held to COMMIT, so sequence order is commit order."""
        if self._events:
            events, self._events = self._events, []
            await self._conn.execute(_WRITE_OUTBOX, *(list(c) for c in zip(*events, strict=True)))

    async def balance(self, account_id: str, ledger_account: str, currency: str) -> Decimal:
        amount = await self._conn.fetchval(
            "SELECT amount FROM balances"
            " WHERE account_id = $1 AND ledger_account = $2 AND currency = $3",
            account_id, ledger_account, currency,
        )
        return amount if amount is not None else Decimal(0)

    @property
    def connection(self) -> asyncpg.Connection:
        """The connection of this unit of work: for modules that keep their own tables
        here (webhook subscriptions and deliveries)."""
        return self._conn

    # --- end outbox ----------------------------------------------------------------------


    # --- fleet health (control shard) ---------------------------------------------------

    async def upsert_fleet_agents(self, facts: Sequence[AgentFacts]) -> None:
        ordered = sorted(facts, key=lambda f: f.host_id)  # fixed lock order
        if not ordered:
            return
        await self._conn.execute(
            _UPSERT_FLEET_AGENTS,
            [f.host_id for f in ordered],
            [f.first_seen_us for f in ordered],
            [f.last_seen_us for f in ordered],
            [f.version for f in ordered],
            [f.backlog_records for f in ordered],
            [f.clock_skew_us for f in ordered],
            [f.cert_serial for f in ordered],
            [f.cert_expiry_us for f in ordered],
            [f.dead_letters for f in ordered],
            [f.records_accepted for f in ordered],
            [f.records_rejected for f in ordered],
            [f.last_seq for f in ordered],
        )

    async def claim_agent_silence(self, host_id: str, silent_before_us: int) -> bool:
        claimed = await self._conn.fetchval(
            "UPDATE fleet_agents SET silent_notified_us = last_seen_us WHERE host_id = $1"
            " AND last_seen_us < $2 AND silent_notified_us < last_seen_us RETURNING true",
            host_id, silent_before_us,
        )
        return claimed is True

    # --- end fleet health ---------------------------------------------------------------


# --- sequences: each host epoch's seqs accounted for, and the holes last checked ---------

SEQ_SCHEMA = """
CREATE TABLE IF NOT EXISTS seq_tracks (
    host_id    TEXT NOT NULL,
    epoch      TEXT NOT NULL,
    start_seq  BIGINT,
    seen       int8multirange NOT NULL,
    first_us   BIGINT NOT NULL,
    updated_us BIGINT NOT NULL,
    PRIMARY KEY (host_id, epoch)
);
CREATE TABLE IF NOT EXISTS seq_holes (
    host_id     TEXT NOT NULL,
    epoch       TEXT NOT NULL,
    lo          BIGINT NOT NULL,
    hi          BIGINT NOT NULL,
    since_us    BIGINT NOT NULL,
    detected_us BIGINT,
    PRIMARY KEY (host_id, epoch, lo)
);
"""

_SEQ_CHECK_LOCK = 0x6D73657163  # advisory lock id ("mseqc"): one gap check per shard at a time
# The seqs a transaction staged and no journal entry wrote (_PgTx._write_seqs): each
# call's ranges united into its epoch's set (created on first sight), one statement.
_ACCOUNT_SEQS = _seq_upsert(1)


def _seq_args(marks: Sequence[SeqMarks]) -> tuple[list[Any], ...]:
    """:data:`_ACCOUNT_SEQS`'s parameters (and the entry statement's last seven): one
    row per (host, epoch), the ranges of calls of one epoch together, the first start
    given."""
    tracks: dict[tuple[str, str], list[SeqMarks]] = {}
    for m in marks:
        tracks.setdefault((m.host_id, m.epoch), []).append(m)
    columns: tuple[list[Any], ...] = ([], [], [], [], [], [], [])
    hosts, epochs, starts, ats, owners, los, his = columns
    for i, ((host, epoch), of) in enumerate(tracks.items(), 1):
        hosts.append(host)
        epochs.append(epoch)
        starts.append(next((m.start for m in of if m.start is not None), None))
        ats.append(max(m.at_us for m in of))
        for m in of:
            for lo, hi in m.ranges:
                owners.append(i)
                los.append(lo)
                his.append(hi)
    return columns


def _created(marks: Sequence[SeqMarks], created: set[tuple[str, str]]) -> None:
    """Tell the first call of each track that was created so (:attr:`SeqMarks.new_epoch`)."""
    for m in marks:
        key = (m.host_id, m.epoch)
        m.new_epoch = key in created
        created.discard(key)


_CURRENT_SEQ_HOLES = (
    "SELECT t.host_id, t.epoch, lower(h), upper(h) FROM (SELECT host_id, epoch, seen,"
    " int8range(coalesce(start_seq, lower(seen)),"
    " greatest(upper(seen), coalesce(start_seq, lower(seen)))) AS span"
    " FROM seq_tracks WHERE NOT isempty(seen)) AS t,"
    " unnest(int8multirange(t.span) - t.seen) AS h"
    " WHERE NOT t.seen @> t.span ORDER BY t.host_id, t.epoch, lower(h)"
)
_SEQ_HOLES = "SELECT host_id, epoch, lo, hi, since_us, detected_us FROM seq_holes"

# --- end sequences ------------------------------------------------------------------------


def _redact(dsn: str) -> str:
    """The DSN without its password, for logs and messages."""
    if "@" in dsn and "://" in dsn:
        scheme, rest = dsn.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}@{host}"
    return dsn


# --- fleet health: the control shard's table of agents ------------------------------------

FLEET_SCHEMA = """
CREATE TABLE IF NOT EXISTS fleet_agents (
    host_id            TEXT PRIMARY KEY,
    first_seen_us      BIGINT NOT NULL,
    last_seen_us       BIGINT NOT NULL,
    version            TEXT NOT NULL,
    backlog_records    BIGINT NOT NULL,
    clock_skew_us      BIGINT NOT NULL,
    cert_serial        TEXT NOT NULL,
    cert_expiry_us     BIGINT NOT NULL,
    dead_letters       BIGINT,
    records_accepted   BIGINT NOT NULL,
    records_rejected   BIGINT NOT NULL,
    last_seq           BIGINT NOT NULL,
    silent_notified_us BIGINT NOT NULL
);
"""

# The merge rule of :class:`collector.ledger.store.AgentFacts`: the later sighting's facts.
_LATER = (
    "CASE WHEN EXCLUDED.last_seen_us >= a.last_seen_us THEN EXCLUDED.{0} ELSE a.{0} END"
)
_UPSERT_FLEET_AGENTS = (
    f"INSERT INTO fleet_agents AS a ({FLEET_AGENT_COLUMNS})"
    " SELECT *, 0 FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[],"
    " $5::bigint[], $6::bigint[], $7::text[], $8::bigint[], $9::bigint[], $10::bigint[],"
    " $11::bigint[], $12::bigint[])"
    " ON CONFLICT (host_id) DO UPDATE SET"
    " first_seen_us = least(a.first_seen_us, EXCLUDED.first_seen_us),"
    " last_seen_us = greatest(a.last_seen_us, EXCLUDED.last_seen_us),"
    + ",".join(
        f" {c} = {_LATER.format(c)}"
        for c in ("version", "backlog_records", "clock_skew_us", "cert_serial",
                  "cert_expiry_us", "dead_letters")
    )
    + ", records_accepted = a.records_accepted + EXCLUDED.records_accepted,"
    " records_rejected = a.records_rejected + EXCLUDED.records_rejected,"
    " last_seq = greatest(a.last_seq, EXCLUDED.last_seq)"
)


# --- end fleet health ---------------------------------------------------------------------


# --- outbox: events written with the change that causes them (collector.ledger.outbox) ----

OUTBOX_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq        BIGINT PRIMARY KEY,
    event_id   TEXT NOT NULL UNIQUE,
    event_type TEXT NOT NULL,
    account_id TEXT NOT NULL,
    data       TEXT NOT NULL,
    created_us BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox_head (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    source   TEXT NOT NULL,
    last_seq BIGINT NOT NULL
);
INSERT INTO outbox_head VALUES (1, replace(gen_random_uuid()::text, '-', ''), 0)
    ON CONFLICT (id) DO NOTHING;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'outbox_no_update') THEN
        CREATE TRIGGER outbox_no_update BEFORE UPDATE ON outbox FOR EACH ROW
            EXECUTE FUNCTION meterd_append_only();
    END IF;
END $$;
"""

_WRITE_OUTBOX = (
    "WITH head AS (UPDATE outbox_head SET last_seq = last_seq + cardinality($1::text[])"
    " WHERE id = 1 RETURNING last_seq)"
    " INSERT INTO outbox SELECT head.last_seq - cardinality($1::text[]) + e.n,"
    " e.id, e.t, e.a, e.d, e.c FROM head, unnest($1::text[], $2::text[], $3::text[],"
    " $4::text[], $5::bigint[]) WITH ORDINALITY AS e(id, t, a, d, c, n)"
)

# --- end outbox ---------------------------------------------------------------------------
