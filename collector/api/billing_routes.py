"""Invoices, credit notes, CSV exports and quarantined records (:mod:`collector.billing`).

Reading is for every role; closing, finalizing and crediting need ``billing``;
releasing quarantined records needs ``operator``. Every change is in the audit log
(``invoice.finalize``, ``invoice.credit``, ``quarantine.release``), with the caller's
token as the actor.

An invoice is named by its id or its number (``INV-0-000001``). ``document`` is the
invoice as the customer sees it (lines, adjustments, taxes, totals); the same document
renders as a printable HTML page. ``from``/``to`` on invoices filter on the start of
their period, on credit notes on their issue time, on quarantined records on the time
they arrived.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import msgspec
from aiohttp import web

from collector.api.accounts import ACCOUNT
from collector.api.auth import caller
from collector.api.keys import BILLING, CLOCK, CONFIG
from collector.api.pagination import (
    Instant,
    TimePageQuery,
    decode_cursor,
    encode_cursor,
)
from collector.api.problems import ApiProblem, ProblemType
from collector.api.registry import Response, Role, Routes, body_of, query_of, respond
from collector.api.schemas import DecimalText, dec
from collector.api.usage import HostFilter
from collector.billing.service import (
    BillingError,
    BillingService,
    CreditNote,
    Invoice,
    NotFound,
)
from collector.ledger.store import InvoiceQuery, QuarantinedRecord
from common.money import to_decimal
from common.records import from_us, to_us

routes = Routes(tag="billing")

INVOICE = {"invoice": "the invoice's id or number"}
CREDIT_NOTE = {"credit_note": "the credit note's id or number"}

InvoiceStatus = Literal["draft", "finalized"]


class InvoiceOut(msgspec.Struct):
    """An invoice: a draft (recomputed until finalized; no number) or finalized (never
    changes). ``invoice_id`` is null for a preview of a period with no stored draft."""

    invoice_id: str | None
    number: str | None
    status: InvoiceStatus
    account: str
    period_start: datetime
    period_end: datetime
    currency: str
    total: DecimalText
    digest: str
    created: datetime | None
    finalized: datetime | None


class InvoiceDocument(InvoiceOut):
    """An invoice with its document (lines, adjustments, taxes, totals)."""

    document: dict[str, Any]


class InvoicePage(msgspec.Struct):
    items: list[InvoiceOut]
    next_cursor: str | None


class InvoiceQueryParams(TimePageQuery, kw_only=True, forbid_unknown_fields=True):
    account: Annotated[str, msgspec.Meta(min_length=1, max_length=200,
                                         description="only this account")] | None = None
    status: Annotated[InvoiceStatus, msgspec.Meta(description="only drafts or finalized")
                      ] | None = None


class AtQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    at: Annotated[Instant, msgspec.Meta(
        description="an instant in the period (default: now)")] | None = None


class Close(msgspec.Struct, forbid_unknown_fields=True):
    """Store or refresh the draft of every period that can be closed (ended at least
    the grace window ago, not finalized), of these accounts (none: all)."""

    accounts: list[Annotated[str, msgspec.Meta(min_length=1, max_length=200)]] | None = None


class Drafts(msgspec.Struct):
    items: list[InvoiceOut]


class Finalize(msgspec.Struct, forbid_unknown_fields=True):
    """Finalize the invoice of the account's period holding ``at``: it gets the next
    number of its series and is posted to the ledger. Finalizing a finalized period
    answers the same invoice (``created`` false)."""

    at: Instant


class FinalizedOut(msgspec.Struct):
    invoice: InvoiceDocument
    created: bool
    draft_total: DecimalText | None


class NewCreditNote(msgspec.Struct, forbid_unknown_fields=True):
    """A credit note against a finalized invoice: ``amount`` (before exclusive tax,
    taxed at the invoice's rates) or, without it, everything not yet credited."""

    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=500)]
    amount: DecimalText | None = None


class CreditNoteOut(msgspec.Struct):
    credit_note_id: str
    number: str
    invoice_id: str
    account: str
    currency: str
    total: DecimalText
    digest: str
    created: datetime
    document: dict[str, Any]


class CreditNotePage(msgspec.Struct):
    items: list[CreditNoteOut]
    next_cursor: str | None


class CreditNoteQuery(TimePageQuery, kw_only=True, forbid_unknown_fields=True):
    account: Annotated[str, msgspec.Meta(min_length=1, max_length=200,
                                         description="only this account")] | None = None


class ExportQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    from_: Instant | None = msgspec.field(default=None, name="from")
    to: Instant | None = None
    account: Annotated[str, msgspec.Meta(min_length=1, max_length=200,
                                         description="only this account")] | None = None


class Quarantined(msgspec.Struct):
    """A usage record kept aside with the reason, until an operator releases it."""

    record_id: str
    host: str
    account: str | None
    metric: str
    unit: str
    quantity: DecimalText
    start: datetime
    end: datetime
    labels: dict[str, str]
    reason: str
    received: datetime
    released: datetime | None
    released_by: str | None


class QuarantinePage(msgspec.Struct):
    items: list[Quarantined]
    next_cursor: str | None


class QuarantineQuery(TimePageQuery, kw_only=True, forbid_unknown_fields=True):
    host: HostFilter | None = None
    account: Annotated[str, msgspec.Meta(
        min_length=1, max_length=200,
        description="only records of this account (its host held by it at the record's"
        " time)")] | None = None
    released: Annotated[bool, msgspec.Meta(
        description="list released records instead of waiting ones")] = False


class Release(msgspec.Struct, forbid_unknown_fields=True):
    """Post quarantined records and mark them released: these ids, or every waiting
    record (of ``host``, when given). Each is billed once, however often released."""

    record_ids: list[Annotated[str, msgspec.Meta(min_length=1, max_length=100)]] | None = None
    host: HostFilter | None = None


class ReleasedOut(msgspec.Struct):
    records: list[str]
    accepted: int
    duplicate: int
    held: int


def _billing(request: web.Request) -> BillingService:
    return request.app[BILLING]()


def _problem(exc: BillingError) -> ApiProblem:
    kind = {"not-found": ProblemType.NOT_FOUND, "conflict": ProblemType.CONFLICT}.get(
        exc.kind, ProblemType.UNPROCESSABLE
    )
    return ApiProblem(kind, str(exc))


def _account(request: web.Request) -> str:
    account_id = request.match_info["account"]
    if account_id not in request.app[CONFIG]().raw.accounts:
        raise ApiProblem(ProblemType.ACCOUNT_NOT_FOUND, f"account {account_id!r}")
    return account_id


def _time(us: int) -> datetime | None:
    return from_us(us) if us else None


def invoice_out(invoice: Invoice) -> InvoiceOut:
    s = invoice.stored
    return InvoiceOut(
        invoice_id=s.invoice_id or None,
        number=s.number,
        status=s.status,  # type: ignore[arg-type]
        account=s.account_id,
        period_start=from_us(s.period_start_us),
        period_end=from_us(s.period_end_us),
        currency=s.currency,
        total=dec(s.total),
        digest=s.digest,
        created=_time(s.created_us),
        finalized=_time(s.finalized_us),
    )


def invoice_document(invoice: Invoice) -> InvoiceDocument:
    out = invoice_out(invoice)
    return InvoiceDocument(**msgspec.structs.asdict(out), document=invoice.document)


def credit_note_out(note: CreditNote) -> CreditNoteOut:
    s = note.stored
    return CreditNoteOut(
        credit_note_id=s.credit_note_id,
        number=s.number,
        invoice_id=s.invoice_id,
        account=s.account_id,
        currency=s.currency,
        total=dec(s.total),
        digest=s.digest,
        created=from_us(s.created_us),
        document=note.document,
    )


def quarantined_out(q: QuarantinedRecord) -> Quarantined:
    r = q.record
    return Quarantined(
        record_id=r.id,
        host=r.host_id,
        account=q.account_id or None,
        metric=r.metric,
        unit=r.unit,
        quantity=r.quantity_text,
        start=from_us(r.start_us),
        end=from_us(r.end_us),
        labels=dict(r.labels),
        reason=q.reason,
        received=from_us(q.received_us),
        released=_time(q.released_us),
        released_by=q.released_by or None,
    )


def _pair_cursor(kind: str, cursor: str | None) -> tuple[int, str] | None:
    after = decode_cursor(kind, cursor)
    if after is None:
        return None
    if (isinstance(after, list) and len(after) == 2 and isinstance(after[0], int)
            and not isinstance(after[0], bool) and isinstance(after[1], str)):
        return (after[0], after[1])
    raise ApiProblem(ProblemType.INVALID_CURSOR, "the cursor is not one this API made")


@routes.get(
    "/v1/invoices",
    Role.VIEWER,
    summary="Invoices, drafts and finalized, by period start",
    query=InvoiceQueryParams,
    response=InvoicePage,
)
async def list_invoices(request: web.Request) -> web.StreamResponse:
    q = query_of(request, InvoiceQueryParams)
    start, end = q.time_range()
    found = await _billing(request).invoices(
        InvoiceQuery(account_id=q.account, status=q.status, from_us=start, to_us=end,
                     after=_pair_cursor("invoices", q.cursor), limit=q.limit + 1)
    )
    page = found[: q.limit]
    last = page[-1].stored if page else None
    return respond(
        InvoicePage(
            items=[invoice_out(i) for i in page],
            next_cursor=(encode_cursor("invoices", [last.period_start_us, last.invoice_id])
                         if last and len(found) > q.limit else None),
        )
    )


@routes.get(
    "/v1/invoices/{invoice}",
    Role.VIEWER,
    summary="An invoice and its document",
    path_params=INVOICE,
    response=InvoiceDocument,
)
async def get_invoice(request: web.Request) -> web.StreamResponse:
    try:
        invoice = await _billing(request).invoice(request.match_info["invoice"])
    except BillingError as exc:
        raise _problem(exc) from None
    return respond(invoice_document(invoice))


@routes.get(
    "/v1/invoices/{invoice}/html",
    Role.VIEWER,
    summary="An invoice as a printable HTML page",
    path_params=INVOICE,
    response=str,
    media_type="text/html",
)
async def invoice_html(request: web.Request) -> web.StreamResponse:
    try:
        invoice = await _billing(request).invoice(request.match_info["invoice"])
    except BillingError as exc:
        raise _problem(exc) from None
    return web.Response(text=invoice.html(), content_type="text/html")


@routes.get(
    "/v1/accounts/{account}/invoice-preview",
    Role.VIEWER,
    summary="The invoice of a period as it stands now (nothing is stored)",
    description="The finalized invoice when the period is finalized.",
    path_params=ACCOUNT,
    query=AtQuery,
    response=InvoiceDocument,
    errors=(422,),
)
async def preview_invoice(request: web.Request) -> web.StreamResponse:
    q = query_of(request, AtQuery)
    account_id = _account(request)
    at_us = request.app[CLOCK]() if q.at is None else to_us(q.at)
    try:
        invoice = await _billing(request).preview(account_id, at_us)
    except BillingError as exc:
        raise _problem(exc) from None
    return respond(invoice_document(invoice))


@routes.post(
    "/v1/billing/close",
    Role.BILLING,
    summary="Close periods: store or refresh their drafts",
    description=Close.__doc__ or "",
    body=Close,
    response=Drafts,
    errors=(404, 422),
)
async def close_periods(request: web.Request) -> web.StreamResponse:
    body = await body_of(request, Close)
    try:
        drafts = await _billing(request).close(
            request.app[CLOCK](), actor=caller(request).actor, account_ids=body.accounts
        )
    except BillingError as exc:
        raise _problem(exc) from None
    return respond(Drafts([invoice_out(d) for d in drafts]))


@routes.post(
    "/v1/accounts/{account}/invoices/finalize",
    Role.BILLING,
    summary="Finalize the invoice of a period",
    description=Finalize.__doc__ or "",
    path_params=ACCOUNT,
    body=Finalize,
    response=FinalizedOut,
    status=201,
    response_description="Finalized now",
    extra_responses=(Response(200, "Already finalized: the same invoice", FinalizedOut),),
    errors=(409, 422),
)
async def finalize_invoice(request: web.Request) -> web.StreamResponse:
    body = await body_of(request, Finalize)
    account_id = _account(request)
    try:
        done = await _billing(request).finalize(
            account_id, to_us(body.at), request.app[CLOCK](), actor=caller(request).actor
        )
    except BillingError as exc:
        raise _problem(exc) from None
    out = FinalizedOut(
        invoice=invoice_document(done.invoice),
        created=done.created,
        draft_total=dec(done.draft_total) if done.draft_total is not None else None,
    )
    return respond(out, status=201 if done.created else 200)


@routes.post(
    "/v1/invoices/{invoice}/credit-notes",
    Role.BILLING,
    summary="Issue a credit note against a finalized invoice",
    description=NewCreditNote.__doc__ or "",
    path_params=INVOICE,
    body=NewCreditNote,
    response=CreditNoteOut,
    status=201,
    errors=(409, 422),
)
async def credit_invoice(request: web.Request) -> web.StreamResponse:
    body = await body_of(request, NewCreditNote)
    amount: Decimal | None = None
    if body.amount is not None:
        amount = to_decimal(body.amount, "amount")
    try:
        note = await _billing(request).credit(
            request.match_info["invoice"], reason=body.reason, amount=amount,
            now_us=request.app[CLOCK](), actor=caller(request).actor,
        )
    except BillingError as exc:
        raise _problem(exc) from None
    return respond(credit_note_out(note), status=201)


@routes.get(
    "/v1/credit-notes",
    Role.VIEWER,
    summary="Credit notes, by issue time",
    query=CreditNoteQuery,
    response=CreditNotePage,
)
async def list_credit_notes(request: web.Request) -> web.StreamResponse:
    q = query_of(request, CreditNoteQuery)
    start, end = q.time_range()
    after = _pair_cursor("credit-notes", q.cursor)
    notes = [
        n for n in await _billing(request).credit_notes(account_id=q.account)
        if start <= n.stored.created_us < end
        and (after is None or (n.stored.created_us, n.number) > after)
    ]
    page = notes[: q.limit]
    last = page[-1].stored if page else None
    return respond(
        CreditNotePage(
            items=[credit_note_out(n) for n in page],
            next_cursor=(encode_cursor("credit-notes", [last.created_us, last.number])
                         if last and len(notes) > q.limit else None),
        )
    )


@routes.get(
    "/v1/credit-notes/{credit_note}",
    Role.VIEWER,
    summary="A credit note and its document",
    path_params=CREDIT_NOTE,
    response=CreditNoteOut,
)
async def get_credit_note(request: web.Request) -> web.StreamResponse:
    try:
        note = await _billing(request).credit_note(request.match_info["credit_note"])
    except BillingError as exc:
        raise _problem(exc) from None
    return respond(credit_note_out(note))


async def _export(request: web.Request, what: str) -> web.StreamResponse:
    q = query_of(request, ExportQuery)
    start = -(2**62) if q.from_ is None else to_us(q.from_)
    end = 2**62 if q.to is None else to_us(q.to)
    if end < start:
        raise ApiProblem(ProblemType.INVALID_REQUEST, "`to` is earlier than `from`")
    try:
        text = await _billing(request).export_csv(what, start, end, account_id=q.account)
    except BillingError as exc:
        raise _problem(exc) from None
    return web.Response(
        text=text, content_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{what}.csv"'},
    )


@routes.get(
    "/v1/exports/invoices.csv",
    Role.BILLING,
    summary="Finalized invoices and credit notes as CSV, one row each",
    description="Issued in [from, to); credit notes as negative rows.",
    query=ExportQuery,
    response=str,
    media_type="text/csv",
)
async def export_invoices(request: web.Request) -> web.StreamResponse:
    return await _export(request, "invoices")


@routes.get(
    "/v1/exports/lines.csv",
    Role.BILLING,
    summary="Lines of finalized invoices and credit notes as CSV",
    description="Issued in [from, to); one row per line, adjustments included.",
    query=ExportQuery,
    response=str,
    media_type="text/csv",
)
async def export_lines(request: web.Request) -> web.StreamResponse:
    return await _export(request, "lines")


@routes.get(
    "/v1/quarantine",
    Role.VIEWER,
    summary="Quarantined usage records and why",
    description="Records beyond the maximum lateness, kept until released; by record id."
    " `from`/`to` filter on the time they arrived; `host` and `account` on whose they are.",
    query=QuarantineQuery,
    response=QuarantinePage,
)
async def list_quarantine(request: web.Request) -> web.StreamResponse:
    q = query_of(request, QuarantineQuery)
    start, end = q.time_range()
    after = decode_cursor("quarantine", q.cursor)
    if after is not None and not isinstance(after, str):
        raise ApiProblem(ProblemType.INVALID_CURSOR, "the cursor is not one this API made")
    found = [
        r for r in await _billing(request).quarantined(q.host, released=q.released,
                                                        account_id=q.account)
        if start <= r.received_us < end and (after is None or r.record.id > after)
    ]
    page = found[: q.limit]
    return respond(
        QuarantinePage(
            items=[quarantined_out(r) for r in page],
            next_cursor=(encode_cursor("quarantine", page[-1].record.id)
                         if len(found) > q.limit else None),
        )
    )


@routes.post(
    "/v1/quarantine/release",
    Role.OPERATOR,
    summary="Release quarantined records: post them, once",
    description=Release.__doc__ or "",
    body=Release,
    response=ReleasedOut,
    errors=(404, 422),
)
async def release_quarantine(request: web.Request) -> web.StreamResponse:
    body = await body_of(request, Release)
    try:
        released = await _billing(request).release(
            body.record_ids, request.app[CLOCK](), actor=caller(request).actor,
            host_id=body.host,
        )
    except NotFound as exc:
        raise ApiProblem(ProblemType.NOT_FOUND, str(exc)) from None
    except BillingError as exc:
        raise _problem(exc) from None
    return respond(ReleasedOut(list(released.record_ids), released.accepted,
                               released.duplicate, released.held))
