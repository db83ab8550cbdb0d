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
from common.errors import IntegrityError
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


class InsertConflict(Exception):
    """An optimistic :meth:`LedgerTx.insert_records` met a record id that is stored
    already, or that another transaction stored meanwhile: the transaction is lost.
    Nothing of it is kept; run it again with ``optimistic=False``."""


class LedgerTx(Protocol):
    async def insert_records(
        self,
        account_id: str,
        entry_id: str,
        records: Sequence[UsageRecord],
        received_us: int,
        optimistic: bool = False,
    ) -> set[str]:
        """Insert records not seen before; return the ids that were new (the rest are
        duplicates). Concurrent inserts of the same id: exactly one wins.

        ``optimistic``: the caller expects every record to be new (every batch but a
        resend), and a store may take a faster way that fails the whole transaction with
        :class:`InsertConflict` when one is not, then or at its next statement (so that
        the records of several account batches go in together: PostgreSQL sends them as
        one ``COPY`` with the next statement)."""

    async def hold(self, records: Sequence[UsageRecord], received_us: int) -> set[str]:
        """Keep records of an unassigned host until it is assigned; return the new ids."""

    async def release(self, record_ids: Sequence[str]) -> None:
        """Remove held records once they have been posted."""

    async def load_counters(self, keys: Sequence[CounterKey]) -> dict[CounterKey, Counter]:
        """Current counters, locked until the transaction ends; missing ones are zero."""

    async def save_counters(self, values: Mapping[CounterKey, Counter]) -> None: ...

    async def append_entry(self, entry: JournalEntry) -> ChainLink:
        """Chain the entry after its account's head, store it and update balances."""

    # --- sequences (collector.sequences) ------------------------------------------------
    async def account_seqs(self, marks: SeqMarks) -> None:
        """Add ``marks.ranges`` to the seqs accounted for of the host's epoch, in this
        transaction, and set ``marks.new_epoch`` once they are written: True when that
        created the epoch's track. A store may write them with the next journal entry of
        the transaction (PostgreSQL: no statement of their own), and writes them before
        it commits at the latest; so the caller asks after the transaction."""

    async def claim_seq_check(self) -> bool:
        """Take this shard's gap-check lock until the transaction ends; False when
        another collector holds it."""

    async def current_seq_holes(self) -> list[tuple[str, str, int, int]]:
        """Every (host, epoch, lo, hi) hole now open: [lo, hi) not accounted for between
        the epoch's start (or lowest seq) and its highest seq."""

    async def stored_seq_holes(self) -> list[SeqHole]:
        """The holes stored by the last gap check, ordered by host, epoch, lo."""

    async def replace_seq_holes(self, holes: Sequence[SeqHole]) -> None: ...

    # --- end sequences ------------------------------------------------------------------

    # --- REST API: tokens and audit log (control shard) -------------------------------
    async def insert_token(self, token: ApiToken, token_hash: str) -> None:
        """Store a new API token; only the hash of its secret is kept."""

    async def get_token(self, token_id: str) -> ApiToken | None: ...

    async def revoke_token(self, token_id: str, at_us: int, by: str) -> None:
        """Mark the token revoked (refused by the database once it is revoked)."""

    async def audit_head(self) -> tuple[int, str]:
        """The audit log's last (sequence, hash), locked until the transaction ends;
        (0, genesis hash) when it is empty."""

    async def insert_audit(self, row: AuditRow) -> None: ...

    # --- audit rows of changes on an account's shard (collector.audit) ------------------
    async def stage_audit(self, row: StagedAudit) -> None:
        """Keep ``row`` on this shard, in this transaction, for the control shard's log."""

    async def staged_audits(self) -> list[StagedAudit]:
        """The rows staged on this shard and not yet dropped, oldest first."""

    async def drop_staged_audits(self, staged_ids: Sequence[str]) -> None: ...

    async def relayed_audits(self, staged_ids: Sequence[str]) -> set[str]:
        """Which of these staged rows this (the control) shard's log already holds."""

    async def mark_audit_relayed(self, staged_id: str, seq: int) -> None:
        """Note that the log's row ``seq`` is staged row ``staged_id``; a second note of
        the same staged row fails (its unique key)."""

    # --- end REST API ------------------------------------------------------------------

    # --- fleet health (control shard) -------------------------------------------------
    async def upsert_fleet_agents(self, facts: Sequence[AgentFacts]) -> None:
        """Merge what a collector saw of agents into the fleet table (see :class:`AgentFacts`
        for the merge rule); a row per host, created on first sight."""

    async def claim_agent_silence(self, host_id: str, silent_before_us: int) -> bool:
        """Mark the agent's current silence announced (``silent_notified_us`` becomes its
        ``last_seen_us``) when it was last seen before ``silent_before_us`` and that
        silence is not marked yet; True only for the one call that marked it (of any
        collector)."""

    # --- end fleet health ---------------------------------------------------------------

    # --- outbox (collector.ledger.outbox; delivered by collector.webhooks) -------------
    async def emit(self, event_type: str, account_id: str, data: Mapping[str, Any]) -> str:
        """Write one outbox event in this transaction (it commits or rolls back with the
        change that caused it) and return its id (UUIDv7). ``account_id`` is "" for an
        event that belongs to no account: emit those on the control shard. Raises
        :class:`ValidationError` for an unknown type or data that is not JSON (a float)."""

    async def balance(self, account_id: str, ledger_account: str, currency: str) -> Decimal:
        """The balance as this transaction sees it (its own postings included); 0 if none."""

    # --- end outbox ---------------------------------------------------------------------

    # --- billing (collector.billing): period postings, invoices, credit notes, quarantine --
    async def lock_account(self, account_id: str) -> None:
        """Lock the account's chain head (created if missing) until the transaction ends:
        what a finalization reads cannot change under it, and usage waits for it."""

    async def finalized_periods(self, account_id: str, from_us: int) -> list[int]:
        """Starts of the account's finalized invoice periods at or after ``from_us``."""

    async def insert_period_postings(self, rows: Sequence[PeriodPosting]) -> None:
        """Insert period postings. A store may write them later in the transaction
        (PostgreSQL: with the next journal entry, in the entry's statement), but always
        before the transaction reads period postings or commits."""

    async def period_counters(self, account_id: str, period_start_us: int) -> dict[str, Counter]:
        """The account's running counters of one period, by price id."""

    async def period_postings(self, account_id: str, period_start_us: int) -> list[PeriodPosting]:
        """The period postings whose amounts the invoice of that period carries."""

    async def record_quantities(
        self, account_id: str, metrics: Sequence[str], from_us: int, to_us: int
    ) -> list[tuple[str, int, Decimal]]:
        """(metric, window start, quantity) of the account's records of ``metrics``
        whose window starts in [from_us, to_us), in window order: one per record, or
        one per (metric, window start) with the exact sum of its records' (a store may
        answer from sums). Callers sum them per sample bucket either way."""

    async def first_usage_us(self, account_id: str) -> int | None:
        """The earliest window start of the account's records (None: no records)."""

    async def invoices_of(self, account_id: str, from_us: int, to_us: int) -> list[StoredInvoice]:
        """The account's invoices (drafts too) of periods starting in [from_us, to_us)."""

    async def save_draft(self, invoice: StoredInvoice) -> bool:
        """Store or replace the draft of its period; False (and nothing written) when
        that period's invoice is finalized."""

    async def save_finalized(self, invoice: StoredInvoice) -> None:
        """Store a finalized invoice (turning its period's draft into it)."""

    async def next_number(self, kind: str, series: str) -> tuple[str, int]:
        """The next number of this shard's series of ``kind`` (``series`` names it the
        first time), locked until the transaction ends: gapless, since it commits or
        rolls back with the document that uses it."""

    async def insert_credit_note(self, note: StoredCreditNote) -> None: ...

    async def credit_notes_of(self, invoice_id: str) -> list[StoredCreditNote]: ...

    async def quarantine(self, rows: Sequence[QuarantinedRecord]) -> set[str]:
        """Keep records beyond the maximum lateness; the ids that were new (a record
        already posted or already quarantined is not)."""

    async def mark_released(self, record_ids: Sequence[str], at_us: int, by: str) -> None: ...

    # --- end billing ----------------------------------------------------------------------


class LedgerStore(Protocol):
    name: str
    # How many transactions of the store can do work at once (PostgreSQL: its pool's
    # connections; SQLite: one, its file's write lock).
    concurrency: int

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

    async def usage_sum_mismatches(self) -> list[str]:
        """Where a store keeps its records' quantities summed for its usage reads: each
        sum that differs from its records' (:func:`describe_sum_mismatch`)."""

    # --- running counters and sequences (verify, collector.sequences) -------------------
    async def counters(self) -> dict[CounterKey, Counter]:
        """Every running counter."""

    async def record_sums(self) -> list[tuple[str, str, int, Decimal]]:
        """(account, metric, window start, total quantity) of the stored records."""

    async def seq_tracks(self, host_id: str | None = None) -> list[SeqTrack]:
        """Each host epoch's seqs accounted for, by host and epoch."""

    async def seq_holes(self, host_id: str | None = None) -> list[SeqHole]:
        """The holes the last gap check stored, by host, epoch and seq."""

    # --- end running counters and sequences ---------------------------------------------

    # --- REST API: queries and the control shard's tokens and audit log ----------------
    async def usage_series(self, query: UsageQuery) -> list[UsageBucket]:
        """Usage summed per time bucket, account, host, metric and unit, in key order,
        after ``query.after`` and at most ``query.limit`` rows."""

    async def journal_page(
        self, account_id: str, *, from_us: int, to_us: int, after_seq: int, limit: int
    ) -> list[ChainLink]:
        """The account's entries created in [from_us, to_us), chain order, after
        ``after_seq``, with their postings."""

    async def find_token(self, token_hash: str) -> ApiToken | None: ...

    async def tokens(self) -> list[ApiToken]: ...

    async def audit_rows(
        self, *, from_us: int, to_us: int, after_seq: int, limit: int | None
    ) -> list[AuditRow]:
        """Audit rows recorded in [from_us, to_us), in sequence order after ``after_seq``."""

    # --- end REST API ------------------------------------------------------------------

    # --- reports (collector.api.reports) ------------------------------------------------
    async def revenue(self, from_us: int, to_us: int) -> list[RevenueRow]:
        """Revenue of the entries posted in [from_us, to_us) per UTC calendar month,
        product and currency (see :class:`RevenueRow`), in no particular order."""

    # --- end reports ----------------------------------------------------------------------

    # --- fleet health and readiness -----------------------------------------------------
    async def fleet_agents(self) -> list[AgentFacts]:
        """Every agent's row of the fleet table (on the control shard), by host id."""

    async def ping(self) -> None:
        """Answer one trivial query, or raise: the store is reachable and working."""

    # --- end fleet health and readiness -------------------------------------------------

    # --- billing (collector.billing) ------------------------------------------------------
    async def invoices(self, query: InvoiceQuery) -> list[StoredInvoice]:
        """Invoices in (period start, id) order, after ``query.after``."""

    async def invoice(self, ref: str) -> StoredInvoice | None:
        """The invoice with this id or number."""

    async def credit_notes(
        self, *, account_id: str | None = None, ref: str | None = None
    ) -> list[StoredCreditNote]:
        """Credit notes (of an account; or the one with this id or number), by number."""

    async def quarantined(
        self, host_id: str | None = None, *, released: bool = False
    ) -> list[QuarantinedRecord]:
        """Quarantined records not yet released (or, with ``released``, all of them)."""

    async def period_posting_totals(
        self,
    ) -> tuple[dict[str, Decimal], dict[tuple[str, int], Decimal]]:
        """Period posting amounts summed by entry id, and by (account, period start)."""

    async def number_series(self) -> dict[str, str]:
        """This shard's number series by kind (invoice, credit_note)."""

    # --- end billing ----------------------------------------------------------------------

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


def series_held(series: str, kind: str, holder: str) -> IntegrityError:
    """The error for a new number series whose name another kind of number holds."""
    return IntegrityError(
        f"number series {series!r} for {kind} numbers is already held by {holder} numbers:"
        " numbers would repeat"
    )


def describe_sum_mismatch(
    entry_id: str, account_id: str, metric: str, start_us: int, host_id: str, unit: str,
    records_total: Decimal | None, records: int | None, sums_total: Decimal | None,
    sums: int | None,
) -> str:
    """A usage sum that is not what its records sum to (either side may be missing)."""

    def told(total: Decimal | None, count: int | None) -> str:
        return "nothing" if total is None else f"{canonical_text(total)} over {count} records"

    return (
        f"entry {entry_id} (account {account_id}, host {host_id}, {metric} in {unit},"
        f" window start {start_us}): usage sums hold {told(sums_total, sums)} but its"
        f" records sum to {told(records_total, records)}"
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


# --- REST API: query and control-shard types ----------------------------------------------

BUCKETS = {"minute": 60_000_000, "hour": 3_600_000_000, "day": 86_400_000_000, "month": 0}
"""Usage bucket widths in microseconds; ``month`` is the calendar month in UTC."""

# (bucket start, account, host, metric, unit): the order of usage series rows.
UsageKey = tuple[int, str, str, str, str]


@dataclass(frozen=True, slots=True)
class UsageQuery:
    """Usage of records whose window starts in [from_us, to_us), optionally of one
    account, host or metric, summed per bucket (a key of :data:`BUCKETS`)."""

    bucket: str
    from_us: int
    to_us: int
    account_id: str | None = None
    host_id: str | None = None
    metric: str | None = None
    after: UsageKey | None = None
    limit: int = 100


@dataclass(frozen=True, slots=True)
class UsageBucket:
    start_us: int
    account_id: str
    host_id: str
    metric: str
    unit: str
    quantity: Decimal
    records: int

    @property
    def key(self) -> UsageKey:
        return (self.start_us, self.account_id, self.host_id, self.metric, self.unit)


@dataclass(frozen=True, slots=True)
class ApiToken:
    """A REST API bearer token as stored: never its secret, only who made it and what
    it may do. ``role`` is empty for a token that holds scopes only."""

    token_id: str
    name: str
    role: str
    scopes: tuple[str, ...]
    created_us: int
    created_by: str
    revoked_us: int | None = None
    revoked_by: str = ""

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> ApiToken:
        """A token from the columns :data:`TOKEN_COLUMNS` names, in that order."""
        scopes = tuple(s for s in row[3].split(",") if s)
        return cls(row[0], row[1], row[2], scopes, row[4], row[5], row[6], row[7])


# The columns every store selects for tokens and audit rows, in this order.
TOKEN_COLUMNS = (
    "token_id, name, role, scopes, created_us, created_by, revoked_us, revoked_by"  # noqa: S105
)
AUDIT_COLUMNS = "seq, at_us, actor, action, target, before_json, after_json, prev_hash, hash"


@dataclass(frozen=True, slots=True)
class AuditRow:
    """One audit log entry; ``before`` and ``after`` are canonical JSON text."""

    seq: int
    at_us: int
    actor: str
    action: str
    target: str
    before: str
    after: str
    prev_hash: str
    hash: str


@dataclass(frozen=True, slots=True)
class StagedAudit:
    """An audit row written with a change on an account's shard, in the change's own
    transaction, until it is appended to the control shard's log (collector.audit);
    ``before`` and ``after`` are canonical JSON text."""

    staged_id: str
    at_us: int
    actor: str
    action: str
    target: str
    before: str
    after: str


STAGED_AUDIT_COLUMNS = "staged_id, at_us, actor, action, target, before_json, after_json"
# Both stores' tables for them (every shard has both; only the control shard's
# audit_relayed is written).
AUDIT_STAGING_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_staged (
    staged_id   TEXT PRIMARY KEY,
    at_us       BIGINT NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    target      TEXT NOT NULL,
    before_json TEXT NOT NULL,
    after_json  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_relayed (
    staged_id TEXT PRIMARY KEY,
    seq       BIGINT NOT NULL
);
"""


# --- end REST API -------------------------------------------------------------------------


# --- reports: revenue per month (collector.api.reports) -----------------------------------

REVENUE_PREFIX = "revenue:"


@dataclass(frozen=True, slots=True)
class RevenueRow:
    """What one shard recognised as revenue in one UTC calendar month (``month_us``, its
    first instant) for one product and currency: the credits to ``revenue:<product>``
    of the entries posted in that month, as a positive amount (a debit, such as a
    correction, lowers it)."""

    month_us: int
    product: str
    currency: str
    amount: Decimal


# --- end reports ----------------------------------------------------------------------------


# --- fleet health: what the control shard keeps of each agent ----------------------------


@dataclass(frozen=True, slots=True)
class AgentFacts:
    """One agent as the collectors saw it (a row of the control shard's fleet table).

    Merge rule when a collector writes a row (two collectors may serve one agent):
    ``first_seen_us`` is the earliest, ``last_seen_us`` and ``last_seq`` the latest;
    version, backlog, skew, certificate and dead letters come from the later sighting;
    ``records_accepted`` and ``records_rejected`` are totals in a row and increments
    in an upsert, added up; ``silent_notified_us`` (the ``last_seen_us`` of the last
    silence whose agent.silent event was emitted, 0 for none) is only set by a silence
    claim, so the current silence is announced when it equals ``last_seen_us``.
    """

    host_id: str
    first_seen_us: int
    last_seen_us: int
    version: str = ""
    backlog_records: int = 0
    clock_skew_us: int = 0
    cert_serial: str = ""  # hex, as ``openssl x509 -serial`` prints it
    cert_expiry_us: int = 0  # 0: unknown
    dead_letters: int | None = None  # as the agent last reported; None: not reported
    records_accepted: int = 0
    records_rejected: int = 0
    last_seq: int = 0
    silent_notified_us: int = 0


# The fleet table's columns, in the order of :class:`AgentFacts`' fields.
FLEET_AGENT_COLUMNS = (
    "host_id, first_seen_us, last_seen_us, version, backlog_records, clock_skew_us,"
    " cert_serial, cert_expiry_us, dead_letters, records_accepted, records_rejected,"
    " last_seq, silent_notified_us"
)

# --- end fleet health ---------------------------------------------------------------------


# --- billing (collector.billing): stored invoices, credit notes, quarantine ---------------


@dataclass(frozen=True, slots=True)
class PeriodPosting:
    """What one usage entry posted for one price of one period (``origin_start_us``),
    and the period whose invoice carries it (``period_start_us``: the same period, or
    for late usage the next open one). ``amount`` 0 marks a late record of a price
    rated at close (``max``, ``last_during_period``, ``p95``): measure its period again."""

    entry_id: str
    account_id: str
    price_id: str
    currency: str
    period_start_us: int
    origin_start_us: int
    amount: Decimal


INVOICE_STATUSES = ("draft", "finalized")


@dataclass(frozen=True, slots=True)
class StoredInvoice:
    """An invoice row; ``document`` is its canonical JSON text. A draft has no number
    and no journal entries; a finalized invoice never changes (the database refuses)."""

    invoice_id: str
    account_id: str
    period_start_us: int
    period_end_us: int
    status: str
    number: str | None
    currency: str
    total: Decimal
    document: str
    digest: str
    entry_id: str = ""
    rounding_entry_id: str = ""
    created_us: int = 0
    finalized_us: int = 0
    quote_request: str = ""  # the ``meterd tariff quote`` request it was priced from (JSON)


@dataclass(frozen=True, slots=True)
class StoredCreditNote:
    credit_note_id: str
    number: str
    invoice_id: str
    account_id: str
    currency: str
    total: Decimal
    document: str
    digest: str
    entry_id: str
    created_us: int


@dataclass(frozen=True, slots=True)
class QuarantinedRecord:
    """A record kept aside with its reason until an operator releases it; ``account_id``
    is "" when its host had no assignment at the record's time."""

    record: UsageRecord
    account_id: str
    reason: str
    received_us: int
    released_us: int = 0
    released_by: str = ""


@dataclass(frozen=True, slots=True)
class InvoiceQuery:
    """Invoices of periods starting in [from_us, to_us), in (period start, invoice id)
    order after ``after``."""

    account_id: str | None = None
    status: str | None = None
    from_us: int | None = None
    to_us: int | None = None
    after: tuple[int, str] | None = None
    limit: int | None = None


def invoice_query_filter(query: InvoiceQuery) -> tuple[list[str], list[Any]]:
    """WHERE conditions (``?`` placeholders) and parameters of an invoice query."""
    conditions: list[str] = []
    params: list[Any] = []
    for condition, value in (
        ("account_id = ?", query.account_id),
        ("status = ?", query.status),
        ("period_start_us >= ?", query.from_us),
        ("period_start_us < ?", query.to_us),
    ):
        if value is not None:
            conditions.append(condition)
            params.append(value)
    if query.after is not None:
        conditions.append("(period_start_us > ? OR (period_start_us = ? AND invoice_id > ?))")
        params += [query.after[0], query.after[0], query.after[1]]
    return conditions, params


INVOICE_COLUMNS = (
    "invoice_id, account_id, period_start_us, period_end_us, status, number, currency, total,"
    " document, digest, entry_id, rounding_entry_id, created_us, finalized_us, quote_request"
)
CREDIT_NOTE_COLUMNS = (
    "credit_note_id, number, invoice_id, account_id, currency, total, document, digest,"
    " entry_id, created_us"
)

# --- end billing --------------------------------------------------------------------------


# --- sequences: what ingest accounts for and the gap check keeps (collector.sequences) -----


@dataclass(slots=True)
class SeqMarks:
    """Seqs of one host's epoch that one ingest call accounts for: merged half-open
    ranges ``[lo, hi)``. ``new_epoch`` is set once they are written, when that created
    the epoch's track."""

    host_id: str
    epoch: str
    start: int | None
    ranges: list[tuple[int, int]]
    at_us: int
    new_epoch: bool = False


@dataclass(frozen=True, slots=True)
class SeqTrack:
    """A host epoch's seqs accounted for, as merged half-open ranges."""

    host_id: str
    epoch: str
    start: int | None
    seen: tuple[tuple[int, int], ...]
    first_us: int
    updated_us: int


@dataclass(frozen=True, slots=True)
class SeqHole:
    """Seqs ``[lo, hi)`` of a host epoch not accounted for, open since ``since_us``;
    ``detected_us`` once it was reported as a gap."""

    host_id: str
    epoch: str
    lo: int
    hi: int
    since_us: int
    detected_us: int | None


def parse_seq_ranges(text: str) -> tuple[tuple[int, int], ...]:
    """Ranges stored as JSON text ``[[lo, hi], ...]`` (the SQLite store)."""
    return tuple((int(lo), int(hi)) for lo, hi in json.loads(text))


def merge_seq_ranges(*parts: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The union of half-open ranges: ascending, disjoint, none touching the next."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(r for part in parts for r in part if r[0] < r[1]):
        if out and lo <= out[-1][1]:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def seq_holes_of(seen: Sequence[tuple[int, int]], start: int | None) -> list[tuple[int, int]]:
    """What merged ranges ``seen`` miss between ``start`` (None: their lowest seq) and
    their highest seq."""
    if not seen:
        return []
    lo = seen[0][0] if start is None else start
    out: list[tuple[int, int]] = []
    for a, b in seen:
        if a > lo:
            out.append((lo, a))
        lo = max(lo, b)
    return out


# --- end sequences ---------------------------------------------------------------------
