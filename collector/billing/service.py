"""The billing service: invoices, credit notes and quarantined records over the ledger.

The REST API and ``meterd billing`` call this; it reads and writes the account shards
of a :class:`~collector.ledger.service.ShardedLedger` and records every change in the
audit log (:mod:`collector.audit`) once it has committed.

A month, for a billing team:

- **close** stores a *draft* for every period whose end is at least the grace window
  (``[billing] grace_hours``, 48 by default) in the past and that is not finalized,
  from the account's first period with usage or a plan on. A draft is recomputed by
  every close until it is finalized; a preview computes one for any period, stores
  nothing.
- **finalize** computes the invoice again from the ledger under the account's lock,
  gives it the next number of its shard's series, posts the rounding and invoice
  entries (:mod:`collector.billing.reconcile`) and emits ``invoice.finalized`` (and
  ``invoice.adjusted`` per earlier period it adjusts), all in one transaction.
  Finalizing a finalized period returns the same invoice: one invoice per account and
  period. Periods are finalized in order: the one after the account's latest finalized
  invoice (or its first period with usage or a plan) comes next.
- **credit** issues a credit note against a finalized invoice.
- **quarantine**: records beyond the maximum lateness, kept with their reason; an
  operator releases them and they are posted once, as late usage if their period is
  finalized.

**Invoice numbers** are ``<prefix>-<shard>-<n>``: one gapless series per shard,
``<shard>`` being the shard's position in ``[[ledger.shards]]`` (0 for the embedded
ledger) when its first invoice is numbered. The series name is then kept in the shard
itself, so moving shards in the configuration never renames it; two shards holding
the same series name are refused. The number is taken in the finalizing transaction
and commits or rolls back with the invoice, so a failed finalization leaves no gap.
Credit notes have their own series per shard.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from collector.audit import AuditLog
from collector.billing.compose import (
    ComposedInvoice,
    CompositionError,
    InvoiceInputs,
    LateUsage,
    RecordQuantity,
    Remeasure,
    UsageCounter,
    compose,
)
from collector.billing.document import (
    Document,
    Issuer,
    canonical_json,
    credit_note_document,
    digest,
    instant_text,
    invoice_document,
    invoices_csv,
    lines_csv,
    quote_request_document,
    render_html,
)
from collector.billing.periods import HOUR_US, Period, period_from_text, zone
from collector.billing.reconcile import (
    credit_amounts,
    credit_note_entry,
    credit_note_memo,
    creditable,
    invoice_entries,
)
from collector.billing.settings import AccountBilling, check_settings, metered_prices
from collector.config import LoadedCollectorConfig
from collector.ledger.outbox import INVOICE_ADJUSTED, INVOICE_CREDITED, INVOICE_FINALIZED
from collector.ledger.service import LedgerService, Outcome
from collector.ledger.store import (
    InvoiceQuery,
    LedgerStore,
    LedgerTx,
    QuarantinedRecord,
    StoredCreditNote,
    StoredInvoice,
)
from collector.rating.document import TariffError
from collector.rating.model import Tariff
from common import logs
from common.errors import IntegrityError, StoreUnavailable, ValidationError
from common.ids import new_id
from common.money import CONTEXT, canonical_text
from common.records import from_us, to_us

log = logs.get("collector.billing")

MAX_PERIODS_PER_CLOSE = 1000


class BillingError(ValidationError):
    """A billing request that cannot be carried out; nothing was changed. ``kind`` is
    ``invalid``, ``not-found`` or ``conflict`` (for problem documents)."""

    kind = "invalid"


class NotFound(BillingError):
    kind = "not-found"


class Conflict(BillingError):
    kind = "conflict"


@dataclass(frozen=True)
class BillingPolicy:
    grace_us: int = 48 * HOUR_US
    invoice_prefix: str = "INV"
    credit_note_prefix: str = "CN"
    issuer: Issuer = field(default_factory=Issuer)


@dataclass(frozen=True)
class Invoice:
    """A stored (or previewed) invoice with its document."""

    stored: StoredInvoice
    document: Document

    @property
    def invoice_id(self) -> str:
        return self.stored.invoice_id

    @property
    def number(self) -> str | None:
        return self.stored.number

    @property
    def status(self) -> str:
        return self.stored.status

    @property
    def account_id(self) -> str:
        return self.stored.account_id

    @property
    def total(self) -> Decimal:
        return self.stored.total

    def html(self) -> str:
        return render_html(self.document)


@dataclass(frozen=True)
class CreditNote:
    stored: StoredCreditNote
    document: Document

    @property
    def number(self) -> str:
        return self.stored.number

    def html(self) -> str:
        return render_html(self.document)


@dataclass(frozen=True)
class Finalized:
    """The outcome of a finalization: ``created`` is False when the period was already
    finalized (the same invoice comes back); ``draft_total`` is the reviewed draft's
    total when there was a draft."""

    invoice: Invoice
    created: bool
    draft_total: Decimal | None = None


@dataclass(frozen=True)
class Released:
    record_ids: tuple[str, ...]
    accepted: int
    duplicate: int
    held: int


def _released(record_ids: Sequence[str], outcomes: Mapping[str, Outcome]) -> Released:
    """What posting ``record_ids`` out of quarantine came to, by outcome."""
    counts = {o: sum(1 for i in record_ids if outcomes.get(i) is o) for o in Outcome}
    return Released(
        tuple(record_ids), counts[Outcome.ACCEPTED], counts[Outcome.DUPLICATE],
        counts[Outcome.HELD],
    )


def _invoice(stored: StoredInvoice) -> Invoice:
    return Invoice(stored, json.loads(stored.document))


def _credit_note(stored: StoredCreditNote) -> CreditNote:
    return CreditNote(stored, json.loads(stored.document))


def _instant_us(text: str) -> int:
    return to_us(datetime.fromisoformat(text))


class BillingService:
    """Invoices, credit notes and quarantine over the ledger (see the module docstring)."""

    def __init__(
        self,
        ledger: LedgerService,
        tariff: Tariff,
        accounts: Mapping[str, AccountBilling],
        policy: BillingPolicy | None = None,
        *,
        source: str = "<configuration>",
        audit: AuditLog | None = None,
    ) -> None:
        problems = [e for acc in accounts.values() for e in check_settings(tariff, acc, source)]
        if problems:
            raise TariffError(problems)
        self.ledger = ledger
        self.tariff = tariff
        self.accounts = dict(accounts)
        self.policy = policy or BillingPolicy()
        self.audit = audit or AuditLog.for_ledger(ledger.ledger)
        self._series_checked = False

    # -- accounts and periods ------------------------------------------------------------

    def account(self, account_id: str) -> AccountBilling:
        billing = self.accounts.get(account_id)
        if billing is None:
            raise NotFound(f"no account {account_id!r} in the configuration")
        return billing

    def period(self, account_id: str, at_us: int) -> Period:
        """The account's billing period that holds ``at_us``."""
        return self.account(account_id).cycle.period_of(at_us)

    def period_at(self, account_id: str, text: str) -> Period:
        """The account's period holding an RFC 3339 instant or a date (local midnight)."""
        return period_from_text(self.account(account_id).cycle, text)

    def _store(self, account_id: str) -> tuple[LedgerStore, int]:
        ledger = self.ledger.ledger
        index = ledger.shard_map.shard_of(account_id)
        return ledger.stores[index], index

    # -- composing -----------------------------------------------------------------------

    async def _first_activity(self, tx: LedgerTx, billing: AccountBilling) -> int | None:
        """The earliest record or dated plan or add-on start of the account."""
        starts = [s.since_us for s in (*billing.plans, *billing.addons) if s.since_us > 0]
        first_usage = await tx.first_usage_us(billing.account_id)
        if first_usage is not None:
            starts.append(first_usage)
        return min(starts) if starts else None

    async def _inputs(self, tx: LedgerTx, billing: AccountBilling, period: Period) -> InvoiceInputs:
        account_id, cycle = billing.account_id, billing.cycle
        counters = await tx.period_counters(account_id, period.start_us)
        own: dict[str, Decimal] = defaultdict(Decimal)
        late: list[LateUsage] = []
        marks: set[tuple[int, str]] = set()
        for row in await tx.period_postings(account_id, period.start_us):
            if row.origin_start_us == period.start_us:
                own[row.price_id] = CONTEXT.add(own[row.price_id], row.amount)
            elif row.amount:
                late.append(LateUsage(cycle.period_of(row.origin_start_us), row.price_id,
                                      row.amount))
            else:
                marks.add((row.origin_start_us, row.price_id))
        usage = tuple(
            UsageCounter(price_id, counter.quantity, own.get(price_id, Decimal(0)))
            for price_id, counter in sorted(counters.items())
        )
        rated_at_close = [
            p for p in metered_prices(self.tariff, billing, period.start)
            if p.aggregate_usage != "sum" and p.metric
        ]
        metrics = sorted({p.metric for p in rated_at_close if p.metric})
        records = await tx.record_quantities(account_id, metrics, period.start_us, period.end_us)
        remeasured: list[Remeasure] = []
        if marks:
            earlier = await tx.invoices_of(account_id, min(o for o, _ in marks), period.start_us)
            for origin_start, price_id in sorted(marks):
                versions = self.tariff.versions.get(price_id)
                if not versions or versions[0].metric is None:
                    continue
                origin = cycle.period_of(origin_start)
                found = await tx.record_quantities(
                    account_id, [versions[0].metric], origin.start_us, origin.end_us
                )
                remeasured.append(
                    Remeasure(
                        origin, price_id, tuple(RecordQuantity(*r) for r in found),
                        _billed(earlier, origin, price_id),
                    )
                )
        return InvoiceInputs(
            period=period,
            counters=usage,
            records=tuple(RecordQuantity(*r) for r in records),
            late=tuple(late),
            remeasured=tuple(remeasured),
        )

    def _compose(self, billing: AccountBilling, inputs: InvoiceInputs) -> ComposedInvoice:
        try:
            return compose(self.tariff, billing, inputs)
        except CompositionError as exc:
            raise BillingError(
                f"account {billing.account_id}, period {inputs.period.label}: {exc}"
            ) from None

    def _document(
        self,
        billing: AccountBilling,
        composed: ComposedInvoice,
        *,
        invoice_id: str,
        number: str | None,
        status: str,
        issued_us: int,
    ) -> Document:
        return invoice_document(
            composed, billing=billing, issuer=self.policy.issuer, invoice_id=invoice_id,
            number=number, status=status, issued_us=issued_us,
        )

    async def _existing(
        self, tx: LedgerTx, account_id: str, period: Period
    ) -> StoredInvoice | None:
        found = await tx.invoices_of(account_id, period.start_us, period.start_us + 1)
        return found[0] if found else None

    # -- preview and close ---------------------------------------------------------------

    async def preview(self, account_id: str, at_us: int) -> Invoice:
        """The invoice of the period holding ``at_us`` as it stands now (the finalized
        one if that period is finalized). Nothing is stored."""
        billing = self.account(account_id)
        period = billing.cycle.period_of(at_us)
        store, _ = self._store(account_id)
        async with store.transaction() as tx:
            existing = await self._existing(tx, account_id, period)
            if existing is not None and existing.status == "finalized":
                return _invoice(existing)
            composed = self._compose(billing, await self._inputs(tx, billing, period))
        invoice_id = existing.invoice_id if existing else ""
        return self._unstored(billing, composed, invoice_id, at_us)

    def _unstored(
        self,
        billing: AccountBilling,
        composed: ComposedInvoice,
        invoice_id: str,
        now_us: int,
        created_us: int | None = None,
    ) -> Invoice:
        document = self._document(
            billing, composed, invoice_id=invoice_id, number=None, status="draft",
            issued_us=now_us,
        )
        stored = StoredInvoice(
            invoice_id, billing.account_id, composed.period.start_us, composed.period.end_us,
            "draft", None, billing.currency, composed.total, canonical_json(document),
            digest(document), created_us=now_us if created_us is None else created_us,
            quote_request=canonical_json(quote_request_document(composed.request)),
        )
        return Invoice(stored, document)

    async def quote_request(self, account_id: str, at_us: int) -> Document:
        """The ``meterd tariff quote`` request the period's invoice is priced from, as
        it stands now: running the quote on it reproduces the invoice's priced part."""
        billing = self.account(account_id)
        period = billing.cycle.period_of(at_us)
        store, _ = self._store(account_id)
        async with store.transaction() as tx:
            composed = self._compose(billing, await self._inputs(tx, billing, period))
        return quote_request_document(composed.request)

    async def _closable(self, tx: LedgerTx, billing: AccountBilling, now_us: int) -> list[Period]:
        cycle = billing.cycle
        finalized = await tx.finalized_periods(billing.account_id, -(2**62))
        last_closable = cycle.period_of(now_us - self.policy.grace_us)
        last_closable = cycle.before(last_closable)
        if finalized:
            period = cycle.after(cycle.period_of(max(finalized)))
        else:
            first = await self._first_activity(tx, billing)
            if first is not None:
                period = cycle.period_of(first)
            elif any(s.since_us == 0 for s in (*billing.plans, *billing.addons)):
                period = last_closable
            else:
                return []
        periods: list[Period] = []
        while period.end_us + self.policy.grace_us <= now_us:
            periods.append(period)
            if len(periods) >= MAX_PERIODS_PER_CLOSE:
                break
            period = cycle.after(period)
        return periods

    async def close(
        self, now_us: int, *, actor: str, account_ids: Sequence[str] | None = None
    ) -> list[Invoice]:
        """Store (or refresh) the draft of every period that can be closed; the drafts."""
        drafts: list[Invoice] = []
        for account_id in sorted(account_ids if account_ids is not None else self.accounts):
            billing = self.account(account_id)
            store, _ = self._store(account_id)
            async with store.transaction() as tx:
                periods = await self._closable(tx, billing, now_us)
            for period in periods:
                async with store.transaction() as tx:
                    existing = await self._existing(tx, account_id, period)
                    if existing is not None and existing.status == "finalized":
                        continue
                    composed = self._compose(billing, await self._inputs(tx, billing, period))
                    invoice_id = existing.invoice_id if existing else new_id()
                    draft = self._unstored(
                        billing, composed, invoice_id, now_us,
                        existing.created_us if existing else None,
                    )
                    if await tx.save_draft(draft.stored):
                        drafts.append(draft)
                        # Its audit row commits with the draft (collector.audit).
                        await self.audit.stage(
                            store, tx, actor, "invoice.close", f"invoice/{invoice_id}",
                            _summary(_invoice(existing)) if existing else None,
                            _summary(draft),
                        )
            if periods:
                await self._relay_audit(store)
        return drafts

    # -- finalize ------------------------------------------------------------------------

    async def _check_order(self, tx: LedgerTx, billing: AccountBilling, period: Period) -> None:
        cycle = billing.cycle
        finalized = await tx.finalized_periods(billing.account_id, -(2**62))
        before = [start for start in finalized if start < period.start_us]
        if finalized and not before:
            raise Conflict(
                f"account {billing.account_id}: {period.label} lies before its first "
                "finalized invoice; its usage is billed as late usage of the next invoice"
            )
        if before:
            expected = cycle.after(cycle.period_of(max(before)))
            if expected.start_us != period.start_us:
                raise Conflict(
                    f"account {billing.account_id}: periods are finalized in order; "
                    f"finalize {expected.label} first"
                )
            return
        first = await self._first_activity(tx, billing)
        if first is not None and first < period.start_us:
            expected = cycle.period_of(first)
            raise Conflict(
                f"account {billing.account_id} has usage or plans from {expected.label}: "
                "finalize that period first (periods are finalized in order)"
            )

    async def _check_series(self) -> None:
        if self._series_checked:
            return
        owners: dict[str, str] = {}
        for store in self.ledger.ledger.stores:
            for series in (await store.number_series()).values():
                if series in owners:
                    raise IntegrityError(
                        f"number series {series!r} is held by shards {owners[series]} and "
                        f"{store.name}: numbers would repeat"
                    )
                owners[series] = store.name
        self._series_checked = True

    async def finalize(
        self, account_id: str, at_us: int, now_us: int, *, actor: str
    ) -> Finalized:
        """Finalize the invoice of the account's period that holds ``at_us``."""
        billing = self.account(account_id)
        period = billing.cycle.period_of(at_us)
        opens_us = period.end_us + self.policy.grace_us
        if opens_us > now_us:
            raise Conflict(
                f"account {account_id}: {period.label} can be finalized from "
                f"{instant_text(opens_us, period)} (its end plus the grace window of "
                f"{self.policy.grace_us // HOUR_US} h for late records)"
            )
        await self._check_series()
        store, shard = self._store(account_id)
        async with store.transaction() as tx:
            await tx.lock_account(account_id)
            existing = await self._existing(tx, account_id, period)
            if existing is not None and existing.status == "finalized":
                return Finalized(_invoice(existing), created=False)
            await self._check_order(tx, billing, period)
            composed = self._compose(billing, await self._inputs(tx, billing, period))
            series, n = await tx.next_number(
                "invoice", f"{self.policy.invoice_prefix}-{shard}"
            )
            number = f"{series}-{n:06d}"
            invoice_id = existing.invoice_id if existing else new_id()
            document = self._document(
                billing, composed, invoice_id=invoice_id, number=number, status="finalized",
                issued_us=now_us,
            )
            document_digest = digest(document)
            rounding, entry = invoice_entries(
                composed, number=number, document_digest=document_digest, entry_id=new_id(),
                rounding_entry_id=new_id(), created_us=now_us,
            )
            if rounding is not None:
                await self.ledger.append_entry(tx, rounding)
            await self.ledger.append_entry(tx, entry)
            stored = StoredInvoice(
                invoice_id, account_id, period.start_us, period.end_us, "finalized", number,
                billing.currency, composed.total, canonical_json(document), document_digest,
                entry.id, rounding.id if rounding is not None else "",
                existing.created_us if existing else now_us, now_us,
                canonical_json(quote_request_document(composed.request)),
            )
            await tx.save_finalized(stored)
            await tx.emit(INVOICE_FINALIZED, account_id, _event(document))
            await self._emit_adjusted(tx, billing, composed, document)
            invoice = Invoice(stored, document)
            await self.audit.stage(
                store, tx, actor, "invoice.finalize", f"invoice/{number}",
                _summary(_invoice(existing)) if existing else None, _summary(invoice),
            )
        await self._relay_audit(store)
        return Finalized(invoice, created=True,
                         draft_total=existing.total if existing else None)

    async def _emit_adjusted(
        self, tx: LedgerTx, billing: AccountBilling, composed: ComposedInvoice, document: Document
    ) -> None:
        origins: dict[Period, Decimal] = defaultdict(Decimal)
        for line in composed.adjustments.lines:
            if line.origin is not None:
                origins[line.origin] = CONTEXT.add(origins[line.origin], line.amount)
        for origin, amount in sorted(origins.items()):
            adjusted = await self._existing(tx, billing.account_id, origin)
            await tx.emit(
                INVOICE_ADJUSTED,
                billing.account_id,
                {
                    "account": billing.account_id,
                    "invoice_id": adjusted.invoice_id if adjusted else None,
                    "number": adjusted.number if adjusted else None,
                    "period": {"start": origin.start.isoformat(), "end": origin.end.isoformat()},
                    "adjusted_by": {"invoice_id": document["invoice_id"],
                                    "number": document["number"]},
                    "currency": billing.currency,
                    "amount": canonical_text(amount),
                },
            )

    async def finalize_drafts(
        self, now_us: int, *, actor: str, account_ids: Sequence[str] | None = None
    ) -> list[Finalized]:
        """Finalize every stored draft whose period may be finalized, oldest first."""
        done: list[Finalized] = []
        for account_id in sorted(account_ids if account_ids is not None else self.accounts):
            store, _ = self._store(account_id)
            drafts = await store.invoices(InvoiceQuery(account_id=account_id, status="draft"))
            for draft in drafts:
                if draft.period_end_us + self.policy.grace_us > now_us:
                    continue
                done.append(await self.finalize(account_id, draft.period_start_us, now_us,
                                                actor=actor))
        return done

    # -- reading -------------------------------------------------------------------------

    async def invoices(self, query: InvoiceQuery) -> list[Invoice]:
        """Invoices of every shard (or the account's), in (period start, id) order."""
        if query.account_id is not None:
            stores = [self._store(query.account_id)[0]]
        else:
            stores = list(self.ledger.ledger.stores)
        found: list[StoredInvoice] = []
        for store in stores:
            found += await store.invoices(query)
        found.sort(key=lambda s: (s.period_start_us, s.invoice_id))
        if query.limit is not None:
            found = found[: query.limit]
        return [_invoice(s) for s in found]

    async def invoice(self, ref: str) -> Invoice:
        """The invoice with this id or number."""
        for store in self.ledger.ledger.stores:
            stored = await store.invoice(ref)
            if stored is not None:
                return _invoice(stored)
        raise NotFound(f"no invoice {ref!r}")

    async def adjustments(
        self, account_id: str, from_us: int, to_us: int
    ) -> list[tuple[Invoice, Mapping[str, Any]]]:
        """The adjustment lines (late usage, periods measured again) of the account's
        invoices whose period starts in [from_us, to_us), each with its invoice, by
        period: the finalized invoices' as issued, and those the next invoice to be
        finalized carries so far (late usage always lands there), as a preview of it
        computes them now. Nothing is stored."""
        billing = self.account(account_id)
        found = await self.invoices(InvoiceQuery(account_id=account_id, status="finalized",
                                                 from_us=from_us, to_us=to_us))
        store, _ = self._store(account_id)
        async with store.transaction() as tx:
            finalized = await tx.finalized_periods(account_id, -(2**62))
        if finalized:
            cycle = billing.cycle
            upcoming = cycle.after(cycle.period_of(max(finalized)))
            if from_us <= upcoming.start_us < to_us:
                preview = await self.preview(account_id, upcoming.start_us)
                if preview.stored.period_start_us not in {i.stored.period_start_us
                                                          for i in found}:
                    found.append(preview)
        found.sort(key=lambda i: i.stored.period_start_us)
        return [(i, line) for i in found for line in i.document["adjustments"]["lines"]]

    async def credit_notes(
        self, *, account_id: str | None = None, ref: str | None = None
    ) -> list[CreditNote]:
        found: list[StoredCreditNote] = []
        for store in self.ledger.ledger.stores:
            found += await store.credit_notes(account_id=account_id, ref=ref)
        found.sort(key=lambda n: (n.created_us, n.number))
        return [_credit_note(n) for n in found]

    async def credit_note(self, ref: str) -> CreditNote:
        found = await self.credit_notes(ref=ref)
        if not found:
            raise NotFound(f"no credit note {ref!r}")
        return found[0]

    async def export_csv(
        self, what: str, from_us: int, to_us: int, *, account_id: str | None = None
    ) -> str:
        """Finalized invoices and credit notes issued in [from_us, to_us) as CSV:
        ``what`` is ``invoices`` (one row each) or ``lines`` (one row per line)."""
        if what not in ("invoices", "lines"):
            raise BillingError(f"expected invoices or lines, got {what!r}")
        invoices = await self.invoices(InvoiceQuery(account_id=account_id, status="finalized"))
        documents: list[tuple[int, str, Document]] = [
            (i.stored.finalized_us, i.number or "", i.document)
            for i in invoices
            if from_us <= i.stored.finalized_us < to_us
        ]
        documents += [
            (n.stored.created_us, n.number, n.document)
            for n in await self.credit_notes(account_id=account_id)
            if from_us <= n.stored.created_us < to_us
        ]
        documents.sort(key=lambda d: (d[0], d[1]))
        ordered = [d for _, _, d in documents]
        return invoices_csv(ordered) if what == "invoices" else lines_csv(ordered)

    # -- credit notes --------------------------------------------------------------------

    async def credit(
        self, ref: str, *, reason: str, amount: Decimal | None, now_us: int, actor: str
    ) -> CreditNote:
        """Issue a credit note against a finalized invoice: the rest of it, or
        ``amount`` (before exclusive tax) taxed at the invoice's rates."""
        if not reason.strip():
            raise BillingError("a credit note needs a reason")
        invoice = await self.invoice(ref)
        if invoice.status != "finalized":
            raise Conflict(
                f"invoice {ref} is a draft: it changes until it is finalized, so there is "
                "nothing to credit yet"
            )
        await self._check_series()
        account_id = invoice.account_id
        store, shard = self._store(account_id)
        zone_name = invoice.document["period"]["time_zone"]
        async with store.transaction() as tx:
            await tx.lock_account(account_id)
            notes = await tx.credit_notes_of(invoice.invoice_id)
            left = creditable(invoice.document, [json.loads(n.document) for n in notes])
            try:
                amounts = credit_amounts(left, amount)
            except ValidationError as exc:
                raise Conflict(f"invoice {invoice.number}: {exc}") from None
            series, n = await tx.next_number(
                "credit_note", f"{self.policy.credit_note_prefix}-{shard}"
            )
            number = f"{series}-{n:06d}"
            note_id = new_id()
            document = credit_note_document(
                invoice=invoice.document, credit_note_id=note_id, number=number,
                reason=reason.strip(), net=amounts.net, taxes=amounts.taxes,
                total=amounts.total,
                issued=from_us(now_us).astimezone(zone(zone_name)).isoformat(),
            )
            note_digest = digest(document)
            entry = credit_note_entry(
                amounts, account_id=account_id, currency=invoice.stored.currency,
                memo=credit_note_memo(number, invoice.number or "", note_digest),
                entry_id=new_id(), created_us=now_us,
            )
            await self.ledger.append_entry(tx, entry)
            stored = StoredCreditNote(
                note_id, number, invoice.invoice_id, account_id, invoice.stored.currency,
                amounts.total, canonical_json(document), note_digest, entry.id, now_us,
            )
            await tx.insert_credit_note(stored)
            await tx.emit(
                INVOICE_CREDITED,
                account_id,
                {
                    "account": account_id,
                    "credit_note_id": note_id,
                    "credit_note_number": number,
                    "invoice_id": invoice.invoice_id,
                    "number": invoice.number,
                    "currency": invoice.stored.currency,
                    "total": document["total"],
                    "reason": document["reason"],
                },
            )
            await self.audit.stage(
                store, tx, actor, "invoice.credit", f"invoice/{invoice.number}",
                {"left_to_credit": canonical_text(left.total)},
                {"credit_note": number, "total": document["total"],
                 "reason": document["reason"]},
            )
        await self._relay_audit(store)
        return CreditNote(stored, document)

    async def _relay_audit(self, store: LedgerStore) -> None:
        """Move the audit rows staged on ``store`` to the log (collector.audit). The
        change they record has committed, and they with it: if the control shard is
        out of reach now, they wait on ``store`` for the next relay."""
        try:
            await self.audit.relay(store)
        except StoreUnavailable as exc:
            log.warning("audit_relay_deferred", shard=store.name, error=str(exc))

    # -- quarantine ----------------------------------------------------------------------

    async def quarantined(
        self, host_id: str | None = None, *, released: bool = False,
        account_id: str | None = None,
    ) -> list[QuarantinedRecord]:
        """Quarantined records (of a host, of an account), by record id. A record whose
        host had an account at its time is kept on that account's shard, so an account's
        records are read from its shard alone."""
        if account_id is not None:
            stores = [self._store(account_id)[0]]
        else:
            stores = list(self.ledger.ledger.stores)
        found: list[QuarantinedRecord] = []
        for store in stores:
            found += [
                q for q in await store.quarantined(host_id, released=released)
                if account_id is None or q.account_id == account_id
            ]
        return sorted(found, key=lambda q: q.record.id)

    async def release(
        self,
        record_ids: Sequence[str] | None,
        now_us: int,
        *,
        actor: str,
        host_id: str | None = None,
    ) -> Released:
        """Post quarantined records (all of them, or of a host, when ``record_ids`` is
        None) and mark them released. Each is billed once: its id decides, so a second
        release, or one interrupted half way and repeated, posts nothing twice."""
        waiting: dict[str, tuple[LedgerStore, QuarantinedRecord]] = {}
        for store in self.ledger.ledger.stores:
            for q in await store.quarantined(host_id):
                waiting[q.record.id] = (store, q)
        if record_ids is not None:
            unknown = sorted(set(record_ids) - set(waiting))
            if unknown:
                raise NotFound(
                    f"not in quarantine (or already released): {', '.join(unknown[:5])}"
                    + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
                )
            chosen = [waiting[i] for i in sorted(set(record_ids))]
        else:
            chosen = [waiting[i] for i in sorted(waiting)]
        if not chosen:
            return Released((), 0, 0, 0)
        outcomes = await self.ledger.post([q.record for _, q in chosen], now_us)
        by_store: dict[int, tuple[LedgerStore, list[str]]] = {}
        for store, q in chosen:
            by_store.setdefault(id(store), (store, []))[1].append(q.record.id)
        for store, ids in by_store.values():
            # Marked released with its audit row, in one transaction (collector.audit).
            here = _released(ids, outcomes)
            async with store.transaction() as tx:
                await tx.mark_released(ids, now_us, actor)
                await self.audit.stage(
                    store, tx, actor, "quarantine.release", f"records/{len(ids)}", None,
                    {"records": list(here.record_ids), "accepted": here.accepted,
                     "duplicate": here.duplicate, "held": here.held},
                )
            await self._relay_audit(store)
        return _released([q.record.id for _, q in chosen], outcomes)


def _billed(invoices: Sequence[StoredInvoice], origin: Period, price_id: str) -> Decimal:
    """What finalized invoices have charged for a ``max``/``last``/``p95`` price of the
    origin period: its line there plus every measured-again adjustment since."""
    billed = Decimal(0)
    for stored in invoices:
        if stored.status != "finalized":
            continue
        document = json.loads(stored.document)
        if stored.period_start_us == origin.start_us:
            for line in document["lines"]:
                if line["kind"] == "usage" and line.get("price") == price_id:
                    billed = CONTEXT.add(billed, Decimal(line["amount"]))
        for line in document["adjustments"]["lines"]:
            period = line.get("origin_period")
            if (
                line["kind"] == "remeasured"
                and line.get("price") == price_id
                and period is not None
                and _instant_us(period["start"]) == origin.start_us
            ):
                billed = CONTEXT.add(billed, Decimal(line["amount"]))
    return billed


def _event(document: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "account": document["account"]["id"],
        "invoice_id": document["invoice_id"],
        "number": document["number"],
        "period": {"start": document["period"]["start"], "end": document["period"]["end"]},
        "currency": document["currency"],
        "total": document["total"],
    }


def _summary(invoice: Invoice) -> dict[str, Any]:
    document = invoice.document
    return {
        "invoice_id": invoice.invoice_id,
        "number": invoice.number,
        "status": invoice.status,
        "account": invoice.account_id,
        "period": document["period"]["start"],
        "total": document["total"],
        "digest": invoice.stored.digest,
    }


def billing_service(
    cfg: LoadedCollectorConfig, ledger: LedgerService, tariff: Tariff
) -> BillingService:
    """The billing service of a loaded collector configuration (``[billing]`` and the
    accounts' settings), checked against the tariff: a mistake names file and key."""
    raw = cfg.raw.billing
    issuer = Issuer(raw.issuer_name, tuple(raw.issuer_address), raw.issuer_tax_id)
    policy = BillingPolicy(
        raw.grace_hours * HOUR_US, raw.invoice_prefix, raw.credit_note_prefix, issuer
    )
    return BillingService(ledger, tariff, cfg.billing, policy, source=str(cfg.source))

