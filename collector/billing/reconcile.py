"""The ledger side of invoices and credit notes. Pure.

**Reconciliation.** For every finalized invoice, the receivable postings that belong
to its account and period add up to its total, to the minor unit:

1. Usage of summed prices is posted as it arrives (``receivable`` / ``revenue:*``).
   Each increment is recorded against the period whose invoice carries it (the
   ``period_postings`` of :mod:`collector.billing.attribution`): the usage's own
   period or, for usage of a period already finalized, the next open one. ``U`` is
   their sum for the period.
2. At finalize, when the priced summed lines differ from what usage posted for them
   (a quantity without a finite decimal form that lands on a rounding boundary), a
   **rounding entry** posts the difference ``d``: ``receivable +d``, ``rounding -d``.
   Nothing is lost and nothing is hidden in another line.
3. The **invoice entry** posts ``receivable + (total - U - d)`` and, on the other side,
   revenue for every line usage did not post (plan fees, add-ons, ``max``/``p95``
   usage, minimum commitments, measured-again adjustments), discounts and taxes.

``U + d + (total - U - d) = total``: ``meterd ledger verify`` recomputes each part
from the journal and the period postings, and checks the document's own arithmetic
and that its digest is the one its journal entry was chained with.

Ledger accounts added here (per customer account): ``revenue:minimum:<plan>``,
``discount:<coupon>`` (debit), ``tax_payable:<rate>`` (credit), ``tax_included:<rate>``
(debit: the share of an inclusive tax that fees and usage had credited to revenue),
``rounding`` and ``credit_notes`` (debit).

**Credit notes** correct a finalized invoice, never change it: ``receivable -total``,
``credit_notes +net`` and the tax given back. A credit note credits the whole rest of
the invoice, or an amount (before exclusive tax; with inclusive rates, the amount
as charged, tax included), taxed at the invoice's rates; all credit notes of an
invoice together never exceed it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction
from typing import Any

from collector.billing.compose import ComposedInvoice
from collector.ledger.journal import RECEIVABLE, JournalEntry, Posting, revenue_account
from collector.rating.engine import to_decimal_exact
from collector.rating.quote import TaxLine
from common.errors import ValidationError
from common.money import CONTEXT, round_minor

ROUNDING = "rounding"
CREDIT_NOTES = "credit_notes"


def minimum_account(plan: str) -> str:
    return revenue_account(f"minimum:{plan}")


def discount_account(coupon: str) -> str:
    return f"discount:{coupon}"


def tax_account(rate: str) -> str:
    return f"tax_payable:{rate}"


def tax_included_account(rate: str) -> str:
    return f"tax_included:{rate}"


def invoice_memo(number: str, period_label: str, document_digest: str) -> str:
    return f"invoice {number} for {period_label}: document sha256 {document_digest}"


def rounding_memo(number: str) -> str:
    return f"rounding: invoice {number}, priced usage lines minus the usage posted for them"


def credit_note_memo(number: str, invoice_number: str, document_digest: str) -> str:
    return f"credit note {number} for invoice {invoice_number}: document sha256 {document_digest}"


def _postings(amounts: Mapping[str, Decimal], currency: str) -> tuple[Posting, ...]:
    return tuple(
        Posting(account, currency, amount) for account, amount in sorted(amounts.items()) if amount
    )


def _add(amounts: dict[str, Decimal], account: str, amount: Decimal) -> None:
    amounts[account] = CONTEXT.add(amounts[account], amount)


def _total(amounts: Iterable[Decimal]) -> Decimal:
    total = Decimal(0)
    for amount in amounts:
        total = CONTEXT.add(total, amount)
    return total


def _add_taxes(amounts: dict[str, Decimal], taxes: Iterable[TaxLine], sign: int) -> None:
    for tax in taxes:
        amount = tax.amount if sign > 0 else -tax.amount
        _add(amounts, tax_account(tax.tax_rate), -amount)
        if tax.inclusive:
            _add(amounts, tax_included_account(tax.tax_rate), amount)


def posted_at_finalize(invoice: ComposedInvoice) -> Decimal:
    """What the invoice entry posts to receivable: ``total - U - d``."""
    return CONTEXT.subtract(CONTEXT.subtract(invoice.total, invoice.posted), invoice.rounding)


def invoice_entries(
    invoice: ComposedInvoice,
    *,
    number: str,
    document_digest: str,
    entry_id: str,
    rounding_entry_id: str,
    created_us: int,
) -> tuple[JournalEntry | None, JournalEntry]:
    """The rounding entry (``None`` without a difference) and the invoice entry."""
    currency = invoice.currency
    rounding: JournalEntry | None = None
    if invoice.rounding:
        rounding = JournalEntry(
            id=rounding_entry_id,
            account_id=invoice.account_id,
            kind="rounding",
            memo=rounding_memo(number),
            created_us=created_us,
            postings=_postings(
                {RECEIVABLE: invoice.rounding, ROUNDING: -invoice.rounding}, currency
            ),
        )
    amounts: dict[str, Decimal] = defaultdict(Decimal)
    amounts[RECEIVABLE] = posted_at_finalize(invoice)
    for line in (*invoice.lines, *invoice.adjustments.lines):
        if line.posted_with_usage:
            continue
        if line.kind == "minimum":
            _add(amounts, minimum_account(line.plan or ""), -line.amount)
        else:
            _add(amounts, revenue_account(line.product or line.price or line.kind), -line.amount)
    for discount in invoice.discounts:
        _add(amounts, discount_account(discount.coupon), discount.amount)
    _add_taxes(amounts, (*invoice.taxes, *invoice.adjustments.taxes), sign=1)
    entry = JournalEntry(
        id=entry_id,
        account_id=invoice.account_id,
        kind="invoice",
        memo=invoice_memo(number, invoice.period.label, document_digest),
        created_us=created_us,
        postings=_postings(amounts, currency),
    )
    return rounding, entry


# -- credit notes ------------------------------------------------------------------------


class CreditError(ValidationError):
    """A credit note the invoice cannot take."""


@dataclass(frozen=True, slots=True)
class Creditable:
    """What is left of an invoice to credit: its net (discounted subtotal plus
    adjustments), each tax, and its total, less every credit note so far."""

    currency: str
    net: Decimal
    taxes: tuple[TaxLine, ...]
    total: Decimal


def _tax_lines(documents: Iterable[Mapping[str, Any]]) -> dict[str, TaxLine]:
    found: dict[str, TaxLine] = {}
    for doc in documents:
        rate = doc["tax_rate"]
        amount = Decimal(doc["amount"])
        if rate in found:
            amount = CONTEXT.add(found[rate].amount, amount)
        found[rate] = TaxLine(rate, Decimal(doc["percentage"]), bool(doc["inclusive"]), amount)
    return found


def creditable(invoice: Mapping[str, Any], credit_notes: Sequence[Mapping[str, Any]]) -> Creditable:
    """What is left to credit of a finalized ``invoice`` document after ``credit_notes``."""
    discounts = _total(Decimal(d["amount"]) for d in invoice["discounts"])
    adjustments = invoice["adjustments"]
    net = CONTEXT.add(
        CONTEXT.subtract(Decimal(invoice["subtotal"]), discounts), Decimal(adjustments["subtotal"])
    )
    taxes = _tax_lines([*invoice["taxes"], *adjustments["taxes"]])
    total = Decimal(invoice["total"])
    for note in credit_notes:
        net = CONTEXT.subtract(net, Decimal(note["subtotal"]))
        total = CONTEXT.subtract(total, Decimal(note["total"]))
        for rate, line in _tax_lines(note["taxes"]).items():
            if rate in taxes:
                old = taxes[rate]
                left = CONTEXT.subtract(old.amount, line.amount)
                taxes[rate] = TaxLine(rate, old.percentage, old.inclusive, left)
    return Creditable(invoice["currency"], net, tuple(taxes.values()), total)


@dataclass(frozen=True, slots=True)
class CreditAmounts:
    net: Decimal
    taxes: tuple[TaxLine, ...]
    total: Decimal


def credit_amounts(left: Creditable, amount: Decimal | None) -> CreditAmounts:
    """The credit note's amounts: everything left (``amount`` is ``None``), or
    ``amount`` taxed at the invoice's rates; :class:`CreditError` beyond what is left."""
    currency = left.currency
    if amount is None:
        if left.total <= 0 and left.net <= 0:
            raise CreditError("nothing is left to credit on this invoice")
        return CreditAmounts(left.net, left.taxes, left.total)
    if amount <= 0:
        raise CreditError("a credit note's amount must be more than zero")
    if round_minor(amount, currency) != amount:
        raise CreditError(f"the amount {amount} has more digits than {currency}'s minor unit")
    if amount > left.net:
        raise CreditError(f"{amount} is more than the {left.net} left to credit before tax")
    inclusive_sum = sum((Fraction(t.percentage) for t in left.taxes if t.inclusive), Fraction(0))
    taxes: list[TaxLine] = []
    for tax in left.taxes:
        if tax.inclusive:
            share = Fraction(amount) * Fraction(tax.percentage) / (100 + inclusive_sum)
        else:
            share = Fraction(amount) * Fraction(tax.percentage) / 100
        value = round_minor(to_decimal_exact(share), currency, ROUND_HALF_EVEN)
        taxes.append(TaxLine(tax.tax_rate, tax.percentage, tax.inclusive, min(value, tax.amount)))
    exclusive = _total(t.amount for t in taxes if not t.inclusive)
    total = CONTEXT.add(amount, exclusive)
    if total > left.total:
        raise CreditError(f"{total} with tax is more than the {left.total} left on the invoice")
    return CreditAmounts(amount, tuple(taxes), total)


def credit_note_entry(
    amounts: CreditAmounts,
    *,
    account_id: str,
    currency: str,
    memo: str,
    entry_id: str,
    created_us: int,
) -> JournalEntry:
    values: dict[str, Decimal] = defaultdict(Decimal)
    values[RECEIVABLE] = -amounts.total
    values[CREDIT_NOTES] = amounts.net
    _add_taxes(values, amounts.taxes, sign=-1)
    return JournalEntry(
        id=entry_id,
        account_id=account_id,
        kind="credit_note",
        memo=memo,
        created_us=created_us,
        postings=_postings(values, currency),
    )


def receivable_of(postings: Iterable[Posting], currency: str) -> Decimal:
    total = Decimal(0)
    for p in postings:
        if p.ledger_account == RECEIVABLE and p.currency == currency:
            total = CONTEXT.add(total, p.amount)
    return total
