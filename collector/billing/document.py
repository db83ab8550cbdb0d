"""Invoices and credit notes as documents: JSON, printable HTML and CSV. Pure.

The JSON document is what is stored and served; amounts are decimal strings with the
currency's minor-unit digits, quantities exact decimal strings, instants RFC 3339 with
the account's local offset. Its digest (SHA-256 of the canonical JSON text: sorted
keys, no spaces) is written into the memo of the invoice's journal entry, so the
ledger's hash chain covers the document: a document changed after finalization no
longer matches its entry, and ``meterd ledger verify`` says so.

HTML escapes every value taken from the document. CSV has one row per document
(``invoices.csv``) or per line (``lines.csv``); credit notes appear in both with
negative amounts, so the columns add up to what customers owe.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from collector.billing.compose import ComposedInvoice, InvoiceLine
from collector.billing.periods import Period
from collector.billing.settings import AccountBilling
from collector.rating.proration import Window
from collector.rating.quote import QuoteRequest, TaxLine, fraction_text, money_text
from common.money import CONTEXT, canonical_text, to_decimal
from common.records import from_us

Document = dict[str, Any]

# An invoice document also carries ``quote_request_sha256``: the digest of the quote
# request (:func:`quote_request_document`, canonical JSON) it was priced from, which is
# stored beside it, so the chain covers the pricing input too.


@dataclass(frozen=True, slots=True)
class Issuer:
    """Who issues the invoices (printed at the top of each)."""

    name: str = ""
    address: tuple[str, ...] = ()
    tax_id: str = ""


def canonical_json(document: Mapping[str, Any]) -> str:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def digest(document: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(document).encode()).hexdigest()


def instant_text(at_us: int, period: Period) -> str:
    return from_us(at_us).astimezone(period.start.tzinfo).isoformat()


def _window(window: Window) -> dict[str, str]:
    return {"start": window.start.isoformat(), "end": window.end.isoformat()}


def period_document(period: Period, time_zone: str) -> dict[str, str]:
    return {"start": period.start.isoformat(), "end": period.end.isoformat(),
            "time_zone": time_zone}


def _line(line: InvoiceLine, currency: str, time_zone: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"kind": line.kind}
    for key, value in (
        ("plan", line.plan or line.source),
        ("price", line.price),
        ("product", line.product),
        ("aggregate", line.aggregate),
    ):
        if value is not None:
            entry[key] = value
    if line.quantity is not None:
        entry["quantity"] = canonical_text(line.quantity)
    if line.unit is not None:
        entry["unit"] = line.unit
    if line.intervals is not None:
        entry["intervals"] = fraction_text(line.intervals)
    if line.active is not None:
        entry["active"] = _window(line.active)
    if line.minimum is not None:
        entry["minimum"] = money_text(line.minimum, currency)
    if line.origin is not None:
        entry["origin_period"] = period_document(line.origin, time_zone)
    if line.priced_by != "quote":
        entry["priced_by"] = line.priced_by
    entry["amount"] = money_text(line.amount, currency)
    return entry


def _taxes(taxes: Iterable[TaxLine], currency: str) -> list[dict[str, Any]]:
    return [
        {
            "tax_rate": tax.tax_rate,
            "percentage": canonical_text(tax.percentage),
            "inclusive": tax.inclusive,
            "amount": money_text(tax.amount, currency),
        }
        for tax in taxes
    ]


def account_document(billing: AccountBilling) -> dict[str, Any]:
    return {
        "id": billing.account_id,
        "name": billing.name,
        "address": list(billing.address),
        "tax_id": billing.tax_id,
        "tax_jurisdiction": billing.tax_jurisdiction,
    }


def issuer_document(issuer: Issuer) -> dict[str, Any]:
    return {"name": issuer.name, "address": list(issuer.address), "tax_id": issuer.tax_id}


def invoice_document(
    invoice: ComposedInvoice,
    *,
    billing: AccountBilling,
    issuer: Issuer,
    invoice_id: str,
    number: str | None,
    status: str,
    issued_us: int,
) -> Document:
    """The invoice as a JSON-ready document (see the module docstring)."""
    currency = invoice.currency
    zone = billing.cycle.time_zone
    adjustments = invoice.adjustments
    posted_at_finalize = CONTEXT.subtract(
        CONTEXT.subtract(invoice.total, invoice.posted), invoice.rounding
    )
    return {
        "type": "invoice",
        "invoice_id": invoice_id,
        "number": number,
        "status": status,
        "issued_at": instant_text(issued_us, invoice.period),
        "account": account_document(billing),
        "issuer": issuer_document(issuer),
        "currency": currency,
        "period": period_document(invoice.period, zone),
        "lines": [_line(line, currency, zone) for line in invoice.lines],
        "subtotal": money_text(invoice.subtotal, currency),
        "discounts": [
            {"coupon": d.coupon, "amount": money_text(d.amount, currency)}
            for d in invoice.discounts
        ],
        "taxes": _taxes(invoice.taxes, currency),
        "quote_total": money_text(invoice.quote_total, currency),
        "adjustments": {
            "lines": [_line(line, currency, zone) for line in adjustments.lines],
            "subtotal": money_text(adjustments.subtotal, currency),
            "taxes": _taxes(adjustments.taxes, currency),
            "total": money_text(adjustments.total, currency),
        },
        "total": money_text(invoice.total, currency),
        "quote_request_sha256": digest(quote_request_document(invoice.request)),
        "ledger": {
            "posted_with_usage": money_text(invoice.posted, currency),
            "rounding": money_text(invoice.rounding, currency),
            "posted_at_finalize": money_text(posted_at_finalize, currency),
        },
    }


def credit_note_document(
    *,
    invoice: Mapping[str, Any],
    credit_note_id: str,
    number: str,
    reason: str,
    net: Decimal,
    taxes: Sequence[TaxLine],
    total: Decimal,
    issued: str,
) -> Document:
    """A credit note for ``invoice`` (a finalized invoice document)."""
    currency = invoice["currency"]
    description = f"Credit for invoice {invoice['number']}: {reason}"
    return {
        "type": "credit_note",
        "credit_note_id": credit_note_id,
        "number": number,
        "status": "issued",
        "issued_at": issued,
        "invoice": {
            "id": invoice["invoice_id"],
            "number": invoice["number"],
            "period": invoice["period"],
        },
        "account": invoice["account"],
        "issuer": invoice["issuer"],
        "currency": currency,
        "reason": reason,
        "lines": [{"kind": "credit", "product": description, "amount": money_text(net, currency)}],
        "subtotal": money_text(net, currency),
        "discounts": [],
        "taxes": _taxes(taxes, currency),
        "total": money_text(total, currency),
    }


def credit_note_arithmetic(document: Mapping[str, Any]) -> list[str]:
    """Where a stored credit note does not add up (empty when it does)."""
    lines = _total(line["amount"] for line in document["lines"])
    exclusive = _total(t["amount"] for t in document["taxes"] if not t["inclusive"])
    problems = []
    if lines != _amount(document["subtotal"]):
        problems.append("lines do not add up to the subtotal")
    if CONTEXT.add(lines, exclusive) != _amount(document["total"]):
        problems.append("subtotal + exclusive taxes is not the total")
    return problems


def quote_request_document(request: QuoteRequest) -> Document:
    """The quote request an invoice was priced from, in the format of
    ``meterd tariff quote --input`` (docs/tariffs.md)."""
    items: list[dict[str, Any]] = []
    for item in request.items:
        entry: dict[str, Any] = {"price": item.price}
        if item.quantity is not None:
            entry["quantity"] = canonical_text(item.quantity)
        if item.samples is not None:
            entry["samples"] = [canonical_text(s) for s in item.samples]
        if item.active is not None:
            entry["active"] = _window(item.active)
        items.append(entry)
    document: Document = {"period": _window(request.period), "items": items}
    for key, values in (
        ("plans", request.plans),
        ("coupons", request.coupons),
        ("tax_rates", request.tax_rates),
    ):
        if values:
            document[key] = list(values)
    if request.currency is not None:
        document["currency"] = request.currency
    return document


# -- arithmetic of a stored document -----------------------------------------------------


def _amount(value: Any) -> Decimal:
    return to_decimal(value, "document amount")


def _total(values: Iterable[Any]) -> Decimal:
    total = Decimal(0)
    for value in values:
        total = CONTEXT.add(total, _amount(value))
    return total


def invoice_arithmetic(document: Mapping[str, Any]) -> list[str]:
    """Where a stored invoice document does not add up (empty when it does)."""
    problems: list[str] = []
    lines_total = _total(line["amount"] for line in document["lines"])
    if lines_total != _amount(document["subtotal"]):
        problems.append(f"lines add up to {lines_total}, subtotal says {document['subtotal']}")
    discounted = CONTEXT.subtract(
        _amount(document["subtotal"]), _total(d["amount"] for d in document["discounts"])
    )
    exclusive = _total(t["amount"] for t in document["taxes"] if not t["inclusive"])
    if CONTEXT.add(discounted, exclusive) != _amount(document["quote_total"]):
        problems.append("subtotal - discounts + exclusive taxes is not the priced total")
    adjustments = document["adjustments"]
    adj_lines = _total(line["amount"] for line in adjustments["lines"])
    if adj_lines != _amount(adjustments["subtotal"]):
        problems.append("adjustment lines do not add up to their subtotal")
    adj_exclusive = _total(t["amount"] for t in adjustments["taxes"] if not t["inclusive"])
    if CONTEXT.add(adj_lines, adj_exclusive) != _amount(adjustments["total"]):
        problems.append("adjustments subtotal + exclusive taxes is not their total")
    expected = CONTEXT.add(_amount(document["quote_total"]), _amount(adjustments["total"]))
    if expected != _amount(document["total"]):
        problems.append(f"priced total + adjustments is {expected}, total says {document['total']}")
    ledger = document["ledger"]
    parts = _total((ledger["posted_with_usage"], ledger["rounding"], ledger["posted_at_finalize"]))
    if parts != _amount(document["total"]):
        problems.append("the ledger parts do not add up to the total")
    return problems


# -- HTML --------------------------------------------------------------------------------

_STYLE = """
body { font: 11pt/1.4 system-ui, sans-serif; color: #111; max-width: 48rem; margin: 2rem auto; }
h1 { font-size: 1.6rem; margin: 0 0 .2rem; } .muted { color: #555; }
header, .parties { display: flex; justify-content: space-between; gap: 2rem; }
table { width: 100%; border-collapse: collapse; margin: 1.2rem 0; }
th, td { text-align: left; padding: .3rem .4rem; border-bottom: 1px solid #ddd;
         vertical-align: top; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.total td { font-weight: bold; border-top: 2px solid #111; }
.draft { color: #a00; font-weight: bold; }
@media print { body { margin: 0; max-width: none; } @page { margin: 18mm; } }
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _party(title: str, party: Mapping[str, Any]) -> str:
    rows = [f"<strong>{_e(party.get('name') or party.get('id', ''))}</strong>"]
    rows += [_e(line) for line in party.get("address", [])]
    if party.get("tax_id"):
        rows.append(f"Tax id {_e(party['tax_id'])}")
    return f"<div><div class=muted>{_e(title)}</div>{'<br>'.join(rows)}</div>"


def _describe(line: Mapping[str, Any]) -> str:
    if line["kind"] == "minimum":
        return f"Minimum commitment of plan {line.get('plan', '')} ({line.get('minimum', '')})"
    text = line.get("product") or line.get("price") or ""
    details = []
    if line.get("plan"):
        details.append(f"plan {line['plan']}")
    if line.get("quantity") is not None:
        details.append(f"{line['quantity']} {line.get('unit', '')}".strip())
    if line.get("intervals") not in (None, "1"):
        details.append(f"× {line['intervals']}")
    if line.get("active"):
        details.append(f"{line['active']['start']} to {line['active']['end']}")
    if line.get("origin_period"):
        origin = line["origin_period"]
        details.append(f"usage of {origin['start']} to {origin['end']}")
    return f"{text} ({'; '.join(details)})" if details else text


def _rows(lines: Sequence[Mapping[str, Any]], currency: str) -> str:
    return "".join(
        f"<tr><td>{_e(_describe(line))}</td><td class=num>{_e(line['amount'])} "
        f"{_e(currency.upper())}</td></tr>"
        for line in lines
    )


def _sum_rows(document: Mapping[str, Any], currency: str) -> str:
    unit = _e(currency.upper())
    rows = [f"<tr><td>Subtotal</td><td class=num>{_e(document['subtotal'])} {unit}</td></tr>"]
    rows += [
        f"<tr><td>Discount {_e(d['coupon'])}</td><td class=num>-{_e(d['amount'])} {unit}</td></tr>"
        for d in document["discounts"]
    ]
    for tax in document["taxes"]:
        label = "included" if tax["inclusive"] else "plus"
        rows.append(
            f"<tr><td>Tax {_e(tax['tax_rate'])} {_e(tax['percentage'])} % ({label})</td>"
            f"<td class=num>{_e(tax['amount'])} {unit}</td></tr>"
        )
    return "".join(rows)


def render_html(document: Mapping[str, Any]) -> str:
    """A printable HTML page of an invoice or credit note document."""
    currency = document["currency"]
    unit = _e(currency.upper())
    is_invoice = document["type"] == "invoice"
    title = "Invoice" if is_invoice else "Credit note"
    number = document.get("number")
    heading = f"{title} {_e(number)}" if number else f"{title} <span class=draft>DRAFT</span>"
    parts = [
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(title)} "
        f"{_e(number or 'draft')}</title><style>{_STYLE}</style></head><body>",
        f"<header><div><h1>{heading}</h1>",
        f"<div class=muted>Issued {_e(document['issued_at'])}</div>",
    ]
    if is_invoice:
        period = document["period"]
        parts.append(
            f"<div class=muted>Period {_e(period['start'])} to {_e(period['end'])} "
            f"({_e(period['time_zone'])})</div>"
        )
    else:
        invoice = document["invoice"]
        parts.append(f"<div class=muted>Corrects invoice {_e(invoice['number'])}</div>")
        parts.append(f"<div>Reason: {_e(document['reason'])}</div>")
    parts.append("</div></header>")
    parts.append(
        f"<div class=parties>{_party('From', document['issuer'])}"
        f"{_party('Bill to', document['account'])}</div>"
    )
    parts.append("<table><thead><tr><th>Description</th><th class=num>Amount</th></tr></thead>")
    parts.append(f"<tbody>{_rows(document['lines'], currency)}{_sum_rows(document, currency)}")
    if is_invoice and document["adjustments"]["lines"]:
        adjustments = document["adjustments"]
        parts.append("<tr><th colspan=2>Adjustments for earlier periods</th></tr>")
        parts.append(_rows(adjustments["lines"], currency))
        parts.append(_sum_rows({**adjustments, "discounts": []}, currency))
    parts.append(
        f"<tr class=total><td>Total</td><td class=num>{_e(document['total'])} {unit}</td></tr>"
        "</tbody></table></body></html>"
    )
    return "".join(parts)


# -- CSV ---------------------------------------------------------------------------------

INVOICE_COLUMNS = (
    "type", "number", "id", "status", "account", "account_name", "tax_id", "tax_jurisdiction",
    "period_start", "period_end", "time_zone", "issued_at", "corrects", "currency",
    "subtotal", "discounts", "taxes", "adjustments", "total",
)
LINE_COLUMNS = (
    "type", "number", "account", "currency", "line", "section", "kind", "plan", "price",
    "product", "quantity", "unit", "intervals", "origin_period_start", "origin_period_end",
    "amount",
)


def _negate(text: str) -> str:
    value = -Decimal(text)
    return format(abs(value) if value.is_zero() else value, "f")


def _csv(columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns), lineterminator="\r\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: row.get(key, "") for key in columns})
    return out.getvalue()


def invoices_csv(documents: Iterable[Mapping[str, Any]]) -> str:
    """One row per invoice or credit note (credit notes negative)."""
    rows = []
    for doc in documents:
        account = doc["account"]
        row: dict[str, Any] = {
            "type": doc["type"], "number": doc.get("number") or "", "status": doc["status"],
            "account": account["id"], "account_name": account.get("name", ""),
            "tax_id": account.get("tax_id", ""),
            "tax_jurisdiction": account.get("tax_jurisdiction", ""),
            "issued_at": doc["issued_at"], "currency": doc["currency"],
        }
        discounts = _total(d["amount"] for d in doc["discounts"])
        taxes = _total(t["amount"] for t in doc["taxes"] if not t["inclusive"])
        if doc["type"] == "invoice":
            adjustments = doc["adjustments"]
            taxes = CONTEXT.add(
                taxes, _total(t["amount"] for t in adjustments["taxes"] if not t["inclusive"])
            )
            row.update(
                id=doc["invoice_id"], period_start=doc["period"]["start"],
                period_end=doc["period"]["end"], time_zone=doc["period"]["time_zone"],
                subtotal=doc["subtotal"], discounts=money_text(discounts, doc["currency"]),
                taxes=money_text(taxes, doc["currency"]),
                adjustments=adjustments["subtotal"], total=doc["total"],
            )
        else:
            row.update(
                id=doc["credit_note_id"], corrects=doc["invoice"]["number"],
                subtotal=_negate(doc["subtotal"]), discounts=money_text(discounts, doc["currency"]),
                taxes=_negate(money_text(taxes, doc["currency"])),
                adjustments=money_text(Decimal(0), doc["currency"]), total=_negate(doc["total"]),
            )
        rows.append(row)
    return _csv(INVOICE_COLUMNS, rows)


def lines_csv(documents: Iterable[Mapping[str, Any]]) -> str:
    """One row per line of each invoice (and its adjustments) or credit note."""
    rows = []
    for doc in documents:
        sections = [("lines", doc["lines"])]
        if doc["type"] == "invoice":
            sections.append(("adjustments", doc["adjustments"]["lines"]))
        number = 0
        for section, lines in sections:
            for line in lines:
                number += 1
                origin = line.get("origin_period") or {}
                amount = line["amount"] if doc["type"] == "invoice" else _negate(line["amount"])
                rows.append(
                    {
                        "type": doc["type"], "number": doc.get("number") or "",
                        "account": doc["account"]["id"], "currency": doc["currency"],
                        "line": number, "section": section, "kind": line["kind"],
                        "plan": line.get("plan", ""), "price": line.get("price", ""),
                        "product": line.get("product", ""), "quantity": line.get("quantity", ""),
                        "unit": line.get("unit", ""), "intervals": line.get("intervals", ""),
                        "origin_period_start": origin.get("start", ""),
                        "origin_period_end": origin.get("end", ""), "amount": amount,
                    }
                )
    return _csv(LINE_COLUMNS, rows)
