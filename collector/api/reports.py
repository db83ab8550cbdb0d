"""Reports the dashboard reads: revenue per product per month, an account's late
adjustments. What each holds is in :data:`REVENUE` and :data:`ADJUSTMENTS`, which are
also their OpenAPI descriptions.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any

import msgspec
from aiohttp import web

from collector.api.accounts import ACCOUNT
from collector.api.billing_routes import InvoiceStatus
from collector.api.keys import BILLING, CONFIG, SERVICE
from collector.api.pagination import Instant, TimePageQuery, decode_cursor, encode_cursor
from collector.api.problems import ApiProblem, ProblemType
from collector.api.registry import Role, Routes, query_of, respond
from collector.api.schemas import DecimalText, dec
from collector.billing.service import BillingError, Invoice
from collector.ledger.store import RevenueRow
from common.money import CONTEXT
from common.records import from_us, to_us

routes = Routes(tag="reports")

REVENUE = """Revenue is what the ledger recognised: the credits to each account's
`revenue:<product>` ledger accounts (`revenue:minimum:<plan>` for a minimum commitment),
per UTC calendar month of the time the entry was posted, product and currency, as a
positive amount. Usage is recognised when it is posted, plan fees and minimums when the
invoice is finalized; discounts, taxes and credit notes are posted to ledger accounts of
their own and do not lower it. Each shard sums its own entries in the database and the
parts are added up. `from`/`to` filter on the time entries were posted, so a range that
starts or ends inside a month reports part of that month. The report is not paged: it
holds one row per month, product and currency."""

ADJUSTMENTS = """The lines an invoice carries for usage of an earlier period: usage that
arrived after its period was finalized (`late_usage`) and prices rated at close measured
again (`remeasured`), before tax. Those of finalized invoices are as issued; those of the
next invoice to be finalized, where late usage lands, as it stands now (`invoice_id` is
null while that period has no stored draft). `from`/`to` filter on the start of the
period of the invoice that carries the line; in that order, then as the invoice lists
them."""

MIN_US = -(2**62)
MAX_US = 2**62


class RevenueQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    from_: Instant | None = msgspec.field(default=None, name="from")
    to: Instant | None = None


class RevenueItem(msgspec.Struct):
    """Revenue of one UTC calendar month (``YYYY-MM``), product and currency."""

    month: str
    product: str
    currency: str
    amount: DecimalText


class RevenueReport(msgspec.Struct):
    items: list[RevenueItem]


class AdjustmentOut(msgspec.Struct):
    """An adjustment line and the invoice that carries it. ``origin_start``/``origin_end``
    is the period the usage belongs to; ``quantity`` is given for ``remeasured`` lines."""

    invoice_id: str | None
    number: str | None
    status: InvoiceStatus
    period_start: datetime
    period_end: datetime
    kind: str
    price: str | None
    product: str | None
    origin_start: datetime | None
    origin_end: datetime | None
    quantity: DecimalText | None
    unit: str | None
    currency: str
    amount: DecimalText


class AdjustmentPage(msgspec.Struct):
    items: list[AdjustmentOut]
    next_cursor: str | None


def merge_revenue(parts: list[list[RevenueRow]]) -> list[RevenueRow]:
    """The shards' rows added up per month, product and currency, in that order."""
    totals: dict[tuple[int, str, str], Decimal] = {}
    for part in parts:
        for row in part:
            key = (row.month_us, row.product, row.currency)
            totals[key] = CONTEXT.add(totals.get(key, Decimal(0)), row.amount)
    return [RevenueRow(m, p, c, amount) for (m, p, c), amount in sorted(totals.items())]


@routes.get(
    "/v1/reports/revenue",
    Role.VIEWER,
    summary="Revenue per product per month, across accounts",
    description=REVENUE,
    query=RevenueQuery,
    response=RevenueReport,
)
async def revenue_report(request: web.Request) -> web.StreamResponse:
    q = query_of(request, RevenueQuery)
    start = MIN_US if q.from_ is None else max(MIN_US, to_us(q.from_))
    end = MAX_US if q.to is None else min(MAX_US, to_us(q.to))
    if end < start:
        raise ApiProblem(ProblemType.INVALID_REQUEST, "`to` is earlier than `from`")
    stores = request.app[SERVICE]().ledger.stores
    parts = await asyncio.gather(*(s.revenue(start, end) for s in stores))
    return respond(
        RevenueReport(
            [
                RevenueItem(from_us(r.month_us).strftime("%Y-%m"), r.product, r.currency,
                            dec(r.amount))
                for r in merge_revenue(list(parts))
            ]
        )
    )


def _instant(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def adjustment_out(invoice: Invoice, line: Mapping[str, Any]) -> AdjustmentOut:
    s = invoice.stored
    origin = line.get("origin_period") or {}
    quantity = line.get("quantity")
    return AdjustmentOut(
        invoice_id=s.invoice_id or None,
        number=s.number,
        status=s.status,  # type: ignore[arg-type]
        period_start=from_us(s.period_start_us),
        period_end=from_us(s.period_end_us),
        kind=str(line["kind"]),
        price=line.get("price"),
        product=line.get("product"),
        origin_start=_instant(origin.get("start")),
        origin_end=_instant(origin.get("end")),
        quantity=None if quantity is None else str(quantity),
        unit=line.get("unit"),
        currency=s.currency,
        amount=str(line["amount"]),
    )


def _position(cursor: str | None) -> tuple[int, int] | None:
    after = decode_cursor("adjustments", cursor)
    if after is None:
        return None
    if (isinstance(after, list) and len(after) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in after)):
        return (after[0], after[1])
    raise ApiProblem(ProblemType.INVALID_CURSOR, "the cursor is not one this API made")


@routes.get(
    "/v1/accounts/{account}/adjustments",
    Role.VIEWER,
    summary="An account's late adjustments: usage of earlier periods billed later",
    description=ADJUSTMENTS,
    path_params=ACCOUNT,
    query=TimePageQuery,
    response=AdjustmentPage,
    errors=(422,),
)
async def account_adjustments(request: web.Request) -> web.StreamResponse:
    q = query_of(request, TimePageQuery)
    account_id = request.match_info["account"]
    if account_id not in request.app[CONFIG]().raw.accounts:
        raise ApiProblem(ProblemType.ACCOUNT_NOT_FOUND, f"account {account_id!r}")
    start, end = q.time_range()
    after = _position(q.cursor)
    try:
        lines = await request.app[BILLING]().adjustments(account_id, start, end)
    except BillingError as exc:
        kind = ProblemType.NOT_FOUND if exc.kind == "not-found" else ProblemType.UNPROCESSABLE
        raise ApiProblem(kind, str(exc)) from None
    # Key: (period start, the line's place among that invoice's adjustment lines).
    keyed: list[tuple[tuple[int, int], Invoice, Mapping[str, Any]]] = []
    seen: dict[int, int] = {}
    for invoice, line in lines:
        period = invoice.stored.period_start_us
        seen[period] = seen.get(period, -1) + 1
        keyed.append(((period, seen[period]), invoice, line))
    rest = [k for k in keyed if after is None or k[0] > after]
    page = rest[: q.limit]
    return respond(
        AdjustmentPage(
            items=[adjustment_out(invoice, line) for _, invoice, line in page],
            next_cursor=(encode_cursor("adjustments", list(page[-1][0]))
                         if len(rest) > q.limit else None),
        )
    )
