"""Invoice composition and its ledger entries, from plain values (no store)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import pytest

from collector.billing.compose import InvoiceInputs, UsageCounter, compose
from collector.billing.periods import Cycle
from collector.billing.reconcile import (
    CreditError,
    credit_amounts,
    creditable,
    invoice_entries,
)
from collector.billing.settings import AccountBilling, CouponRedemption, coupons_for
from collector.ledger.journal import sums_by_currency
from collector.rating.tariff import parse_tariff_text
from tests.billing.scenario import at

# Hours beyond the first 1000 of a month cost 0.0036. 1000 h + 5000 s is
# 1001.3888... hours: exactly 0.005 EUR, which rounds half-even to 0.00, while the
# quantity written as a decimal (50 significant digits) prices at 0.00500...004: 0.01.
CPU = """
[[prices]]
id = "cpu"
product = "Compute"
currency = "eur"
metric = "cpu.seconds"
unit = "hour"
billing_scheme = "tiered"
tiers_mode = "graduated"
tiers = [{ up_to = 1000, unit_amount_decimal = "0" },
         { up_to = "inf", unit_amount_decimal = "0.0036" }]
recurring = { interval = "month", usage_type = "metered", aggregate_usage = "sum" }
"""

EGRESS_VERSIONS = """
[[prices]]
id = "egress"
product = "Traffic"
currency = "eur"
metric = "net.tx_bytes"
unit = "GB"
unit_amount_decimal = "0.01"
recurring = { interval = "month", usage_type = "metered", aggregate_usage = "sum" }

[[prices]]
id = "egress"
product = "Traffic"
currency = "eur"
metric = "net.tx_bytes"
unit = "GB"
unit_amount_decimal = "0.02"
effective_from = 2026-03-15T00:00:00Z
recurring = { interval = "month", usage_type = "metered", aggregate_usage = "sum" }

[[tax_rates]]
id = "vat"
percentage = "19"
jurisdiction = "DE"

[[coupons]]
id = "once"
percent_off = "10"
duration = "once"

[[coupons]]
id = "quarter"
percent_off = "5"
duration = "repeating"
duration_in_months = 3
"""

UTC_MONTHLY = Cycle()
MARCH = UTC_MONTHLY.period_of(at("2026-03-10T00:00:00+00:00"))


def test_a_rounding_difference_becomes_an_explicit_rounding_entry() -> None:
    tariff = parse_tariff_text(CPU, "cpu.toml")
    account = AccountBilling("acme", "eur")
    usage = UsageCounter("cpu", Decimal(3_605_000), posted=Decimal("0.00"))
    invoice = compose(tariff, account, InvoiceInputs(MARCH, counters=(usage,)))
    [line] = invoice.lines
    assert (line.amount, invoice.total, invoice.posted, invoice.rounding) == (
        Decimal("0.01"), Decimal("0.01"), Decimal("0.00"), Decimal("0.01")
    )
    rounding, entry = invoice_entries(
        invoice, number="INV-0-000001", document_digest="d", entry_id="e1",
        rounding_entry_id="e0", created_us=0,
    )
    assert rounding is not None
    assert {(p.ledger_account, p.amount) for p in rounding.postings} == {
        ("receivable", Decimal("0.01")), ("rounding", Decimal("-0.01"))
    }
    assert entry.postings == ()  # usage posted the rest: nothing left for the invoice entry


def test_a_price_version_within_the_period_keeps_what_the_ledger_posted() -> None:
    tariff = parse_tariff_text(EGRESS_VERSIONS, "egress.toml")
    account = AccountBilling("acme", "eur", tax_jurisdiction="DE")
    # 100 GB before the 15th at 0.01, 100 GB after at 0.02, as posted: 3.00
    usage = UsageCounter("egress", Decimal(200 * 10**9), posted=Decimal("3.00"))
    invoice = compose(tariff, account, InvoiceInputs(MARCH, counters=(usage,)))
    [line] = invoice.lines
    assert (line.amount, line.priced_by, invoice.rounding) == (Decimal("3.00"), "ledger", 0)
    assert [t.amount for t in invoice.taxes] == [Decimal("0.57")]
    assert invoice.total == Decimal("3.57")


@pytest.mark.parametrize(
    ("coupon", "months_applied"),
    [("once", ["2026-03"]), ("quarter", ["2026-03", "2026-04", "2026-05"])],
)
def test_coupon_durations(coupon: str, months_applied: list[str]) -> None:
    tariff = parse_tariff_text(EGRESS_VERSIONS, "egress.toml")
    account = AccountBilling(
        "acme", "eur", coupons=(CouponRedemption("c", coupon, at("2026-03-10T00:00:00Z")),)
    )
    applied = []
    period = UTC_MONTHLY.period_of(at("2026-01-15T00:00:00Z"))
    for _ in range(8):
        if coupons_for(tariff, account, period):
            applied.append(datetime.fromisoformat(period.start.isoformat()).strftime("%Y-%m"))
        period = UTC_MONTHLY.after(period)
    assert applied == months_applied


def invoice_document(total: str, subtotal: str, tax: str, inclusive: bool) -> dict[str, object]:
    return {
        "currency": "eur", "subtotal": subtotal, "discounts": [], "total": total,
        "taxes": [{"tax_rate": "vat", "percentage": "20", "inclusive": inclusive,
                   "amount": tax}],
        "adjustments": {"subtotal": "0.00", "taxes": [], "total": "0.00", "lines": []},
    }


def test_credit_amounts_are_taxed_at_the_invoice_rates_and_never_exceed_it() -> None:
    exclusive = creditable(invoice_document("120.00", "100.00", "20.00", False), [])
    part = credit_amounts(exclusive, Decimal("10.01"))
    assert (part.net, part.taxes[0].amount, part.total) == (
        Decimal("10.01"), Decimal("2.00"), Decimal("12.01")
    )
    with pytest.raises(CreditError, match="more than"):
        credit_amounts(exclusive, Decimal("100.01"))
    with pytest.raises(CreditError, match="minor unit"):
        credit_amounts(exclusive, Decimal("1.001"))
    inclusive = creditable(invoice_document("100.00", "100.00", "16.67", True), [])
    whole = credit_amounts(inclusive, None)
    assert (whole.net, whole.taxes[0].amount, whole.total) == (
        Decimal("100.00"), Decimal("16.67"), Decimal("100.00")
    )
    half = credit_amounts(inclusive, Decimal("50.00"))
    assert (half.taxes[0].amount, half.total) == (Decimal("8.33"), Decimal("50.00"))


def test_invoice_entries_balance_with_inclusive_taxes_discounts_and_minimums() -> None:
    tariff = parse_tariff_text(
        EGRESS_VERSIONS.replace('percentage = "19"', 'percentage = "19"\ninclusive = true')
        + '\n[[plans]]\nid = "commit"\nprices = ["egress"]\nminimum_amount_decimal = "50"\n',
        "t.toml",
    )
    from collector.billing.settings import Subscription

    account = AccountBilling(
        "acme", "eur", tax_jurisdiction="DE", plans=(Subscription("p", plan="commit"),),
        coupons=(CouponRedemption("c", "once", MARCH.start_us),),
    )
    april = UTC_MONTHLY.after(MARCH)
    usage = UsageCounter("egress", Decimal(300 * 10**9), posted=Decimal("6.00"))
    invoice = compose(tariff, account, InvoiceInputs(april, counters=(usage,)))
    assert [line.kind for line in invoice.lines] == ["usage", "minimum"]
    assert invoice.total == Decimal("50.00")  # inclusive tax: not added
    _, entry = invoice_entries(invoice, number="N", document_digest="d", entry_id="e",
                               rounding_entry_id="r", created_us=0)
    assert sums_by_currency(entry.postings) == {"eur": Decimal(0)}
    postings = {p.ledger_account: p.amount for p in entry.postings}
    assert postings["receivable"] == Decimal("44.00")  # 50.00 less the 6.00 usage posted
    assert postings["tax_payable:vat"] == -postings["tax_included:vat"] == Decimal("-7.98")
