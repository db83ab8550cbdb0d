"""One invoice from a period's usage, the tariff and the account's settings. Pure.

The invoice is priced by :func:`collector.rating.quote.quote` itself: composing an
invoice means writing the quote request for the period (:attr:`ComposedInvoice.request`),
so every amount follows the rounding rules of ``meterd tariff quote`` and running that
command on the request reproduces the invoice's lines, subtotal, discounts, taxes and
total. The request holds:

- the period, ``start`` and ``end`` in the account's time zone;
- a licensed item per price of each plan and each add-on held in the period, with its
  ``active`` window when it was held for part of the period only (a one-time price
  only in the period its plan or add-on starts);
- a metered item per summed price with usage: the period's quantity from the running
  counter, in the price's billing unit (exact when it has a finite decimal form, 50
  significant digits otherwise);
- a metered item per price aggregated by ``max``, ``last_during_period`` or ``p95``,
  with samples: the period's records of its metric summed per 5-minute bucket of the
  UTC clock (``:00``, ``:05``, ...), converted to the billing unit (a rate unit divides
  by the bucket's 300 seconds), in time order; buckets without records are no samples;
- the plans with a minimum commitment held in the period, the coupons that apply to it
  and the tax rates of the account's jurisdiction.

One exception: a summed price with a version taking effect within the period. The
ledger priced its usage at the margin of each version as it arrived (usage already
posted keeps its price); a quote prices a period at one version. That line carries the
amount the ledger posted (``priced_by = "ledger"``) and the remaining steps (minimum,
discounts, taxes) follow the quote's rules on it.

Below the quote's total come the **adjustments**: usage of earlier, already finalized
periods that arrived after their invoice (each line names its period). Summed usage
carries what the ledger posted for it; a ``max``/``p95``/``last`` price is measured
again over all records of its period, and the line is the difference to what invoices
have charged for it so far. Adjustments are taxed on their own subtotal with the same
rates and rules; coupons do not apply to them. ``total`` is the quote's total plus the
adjustments' total.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from fractions import Fraction

from collector.billing.periods import Period
from collector.billing.settings import (
    AccountBilling,
    Subscription,
    coupons_for,
    metered_prices,
    tax_rates_for,
)
from collector.rating.document import TariffError
from collector.rating.engine import aggregate, billing_quantity, rated_amount, to_decimal_exact
from collector.rating.model import Price, RatingError, Tariff
from collector.rating.proration import Window
from collector.rating.quote import (
    Discount,
    Quote,
    QuoteItem,
    QuoteLine,
    QuoteRequest,
    TaxLine,
    _Problems,
    _taxes,
    quote,
    settle,
)
from common.errors import ValidationError
from common.money import CONTEXT
from common.records import from_us, to_us

SAMPLE_SECONDS = 300
SAMPLE_US = SAMPLE_SECONDS * 1_000_000

LINE_KINDS = ("plan", "addon", "usage", "minimum", "late_usage", "remeasured")


class CompositionError(ValidationError):
    """An invoice cannot be composed: the tariff and the settings or usage disagree."""


@dataclass(frozen=True, slots=True)
class UsageCounter:
    """A summed price's running counter for the period: its quantity in the metric's
    base units, and what usage posted for it to the ledger."""

    price_id: str
    quantity: Decimal
    posted: Decimal


@dataclass(frozen=True, slots=True)
class RecordQuantity:
    """A usage record reduced to what a ``max``/``last``/``p95`` price needs."""

    metric: str
    start_us: int
    quantity: Decimal


@dataclass(frozen=True, slots=True)
class LateUsage:
    """Summed usage of an earlier period, posted after that period's invoice."""

    origin: Period
    price_id: str
    amount: Decimal


@dataclass(frozen=True, slots=True)
class Remeasure:
    """A ``max``/``last``/``p95`` price of a finalized period that received records
    after its invoice: all of that period's records of its metric, and what invoices
    have charged for it so far."""

    origin: Period
    price_id: str
    records: tuple[RecordQuantity, ...]
    billed: Decimal


@dataclass(frozen=True, slots=True)
class InvoiceInputs:
    period: Period
    counters: tuple[UsageCounter, ...] = ()
    records: tuple[RecordQuantity, ...] = ()
    late: tuple[LateUsage, ...] = ()
    remeasured: tuple[Remeasure, ...] = ()


@dataclass(frozen=True, slots=True)
class InvoiceLine:
    """A line of an invoice: a quote line with where it came from."""

    kind: str
    amount: Decimal
    price: str | None = None
    product: str | None = None
    quantity: Decimal | None = None
    unit: str | None = None
    intervals: Fraction | None = None
    plan: str | None = None
    minimum: Decimal | None = None
    active: Window | None = None
    origin: Period | None = None
    aggregate: str | None = None
    source: str | None = None
    priced_by: str = "quote"

    @property
    def posted_with_usage(self) -> bool:
        """Whether usage already posted this line's amount (summed usage, late usage)."""
        return self.kind == "late_usage" or (self.kind == "usage" and self.aggregate == "sum")


@dataclass(frozen=True, slots=True)
class Adjustments:
    lines: tuple[InvoiceLine, ...] = ()
    subtotal: Decimal = Decimal(0)
    taxes: tuple[TaxLine, ...] = ()
    total: Decimal = Decimal(0)


@dataclass(frozen=True)
class ComposedInvoice:
    """An invoice's content, before it has a number."""

    account_id: str
    currency: str
    period: Period
    request: QuoteRequest
    lines: tuple[InvoiceLine, ...]
    subtotal: Decimal
    discounts: tuple[Discount, ...]
    taxes: tuple[TaxLine, ...]
    quote_total: Decimal
    adjustments: Adjustments
    total: Decimal
    posted: Decimal
    rounding: Decimal

    @property
    def empty(self) -> bool:
        return not self.lines and not self.adjustments.lines


def samples_for(price: Price, records: Iterable[RecordQuantity]) -> tuple[Decimal, ...]:
    """The price's samples from records of its metric: sums per 5-minute bucket, in
    the billing unit, in time order."""
    buckets: dict[int, Decimal] = defaultdict(Decimal)
    for record in records:
        if record.metric == price.metric:
            bucket = record.start_us // SAMPLE_US
            buckets[bucket] = CONTEXT.add(buckets[bucket], record.quantity)
    unit = price.billing_unit
    window = Decimal(SAMPLE_SECONDS) if unit is not None and unit.rate else None
    return tuple(
        to_decimal_exact(billing_quantity(price, buckets[b], window_seconds=window))
        for b in sorted(buckets)
    )


def version_changes_within(tariff: Tariff, price_id: str, period: Period) -> bool:
    """Whether a version of the price takes effect after the period's start and before
    its end (or none is in force at its start)."""
    versions = tariff.versions.get(price_id, ())
    for version in versions:
        start = version.effective_from
        if start is not None and period.start_us < to_us(start) < period.end_us:
            return True
    try:
        tariff.price(price_id, period.start)
    except RatingError:
        return True
    return False


def _any_version(tariff: Tariff, price_id: str, period: Period) -> Price:
    versions = tariff.versions.get(price_id)
    if not versions:
        raise CompositionError(
            f"usage was rated by price {price_id!r}, which the tariff no longer has; "
            "restore it to bill the period"
        )
    try:
        return tariff.price(price_id, period.start)
    except RatingError:
        return versions[0]


def _held_item(
    tariff: Tariff, sub: Subscription, price_id: str, period: Period, path: str
) -> QuoteItem | None:
    """The quote item for a licensed or one-time price held by ``sub``, or ``None``."""
    first = tariff.versions[price_id][0]
    if first.is_metered:
        return None
    if first.usage_type == "one_time":
        if not period.contains(sub.since_us) or sub.since_us == 0:
            return None
        return QuoteItem(price=price_id, path=path, quantity=sub.quantity)
    active = None
    if not sub.covers(period):
        start = max(sub.since_us, period.start_us)
        end = min(sub.until_us, period.end_us)
        active = Window(
            from_us(start).astimezone(period.start.tzinfo),
            from_us(end).astimezone(period.start.tzinfo),
        )
    return QuoteItem(price=price_id, path=path, quantity=sub.quantity, active=active)


@dataclass(frozen=True, slots=True)
class _Planned:
    """A request item with what the invoice line will say about its origin."""

    kind: str
    item: QuoteItem | None
    source: str | None = None
    ledger_line: QuoteLine | None = None
    aggregate: str | None = None


def _items(
    tariff: Tariff, billing: AccountBilling, inputs: InvoiceInputs
) -> tuple[list[_Planned], dict[str, Decimal]]:
    period = inputs.period
    planned: list[_Planned] = []
    for sub in billing.plans:
        if not sub.active_in(period):
            continue
        plan = tariff.plans[sub.plan or ""]
        for price_id in plan.prices:
            item = _held_item(tariff, sub, price_id, period, f"{sub.key} ({price_id})")
            if item is not None:
                planned.append(_Planned("plan", item, source=plan.id))
    for sub in billing.addons:
        if not sub.active_in(period):
            continue
        item = _held_item(tariff, sub, sub.price or "", period, f"{sub.key} ({sub.price})")
        if item is not None:
            planned.append(_Planned("addon", item))
    posted: dict[str, Decimal] = {}
    for counter in sorted(inputs.counters, key=lambda c: c.price_id):
        if not counter.quantity and not counter.posted:
            continue
        price = _any_version(tariff, counter.price_id, period)
        posted[price.id] = counter.posted
        quantity = to_decimal_exact(billing_quantity(price, counter.quantity))
        if version_changes_within(tariff, price.id, period):
            line = QuoteLine(
                amount=counter.posted, price=price.id, product=price.product,
                quantity=quantity, unit=price.unit,
            )
            planned.append(_Planned("usage", None, ledger_line=line, aggregate="sum"))
            continue
        item = QuoteItem(price=price.id, path=f"usage ({price.id})", quantity=quantity)
        planned.append(_Planned("usage", item, aggregate="sum"))
    for price in metered_prices(tariff, billing, period.start):
        if price.aggregate_usage == "sum" or price.id in posted:
            continue
        samples = samples_for(price, inputs.records)
        if samples:
            item = QuoteItem(price=price.id, path=f"usage ({price.id})", samples=samples)
            planned.append(_Planned("usage", item, aggregate=price.aggregate_usage))
    return planned, posted


def _plans_with_minimum(tariff: Tariff, billing: AccountBilling, period: Period) -> list[str]:
    found: list[str] = []
    for sub in billing.plans:
        plan = tariff.plans.get(sub.plan or "")
        active = plan is not None and plan.minimum_amount is not None and sub.active_in(period)
        if plan is not None and active and plan.id not in found:
            found.append(plan.id)
    return found


def _priced(tariff: Tariff, request: QuoteRequest, planned: Sequence[_Planned]) -> Quote:
    """Price the request; with ledger-priced lines, run the quote's own remaining steps
    (minimums, discounts, taxes) over the item lines and those."""
    if all(p.ledger_line is None for p in planned):
        return quote(tariff, request)
    priced = quote(tariff, replace(request, plans=(), coupons=(), tax_rates=()))
    item_lines = iter(priced.lines)
    lines = [p.ledger_line if p.ledger_line is not None else next(item_lines) for p in planned]
    return settle(_Problems(request.source), tariff, request, priced.currency, lines)


def _sum(amounts: Iterable[Decimal]) -> Decimal:
    total = Decimal(0)
    for amount in amounts:
        total = CONTEXT.add(total, amount)
    return total


def compose(tariff: Tariff, billing: AccountBilling, inputs: InvoiceInputs) -> ComposedInvoice:
    """The invoice of ``billing``'s account for ``inputs.period``; :class:`CompositionError`
    when the tariff cannot price it (each problem named)."""
    period = inputs.period
    planned, posted = _items(tariff, billing, inputs)
    request = QuoteRequest(
        period=period.window,
        items=tuple(p.item for p in planned if p.item is not None),
        coupons=coupons_for(tariff, billing, period),
        tax_rates=tax_rates_for(tariff, billing),
        plans=tuple(_plans_with_minimum(tariff, billing, period)),
        currency=billing.currency,
        source=f"invoice of account {billing.account_id} for {period.label}",
    )
    try:
        priced = _priced(tariff, request, planned)
        adjustments = _adjustments(tariff, request, billing.currency, inputs)
    except (TariffError, RatingError) as exc:
        raise CompositionError(str(exc)) from None
    lines: list[InvoiceLine] = []
    rounding = Decimal(0)
    for index, line in enumerate(priced.lines):
        if index < len(planned):
            origin = planned[index]
            invoice_line = InvoiceLine(
                kind=origin.kind, amount=line.amount, price=line.price, product=line.product,
                quantity=line.quantity, unit=line.unit, intervals=line.intervals,
                active=origin.item.active if origin.item else None, source=origin.source,
                aggregate=origin.aggregate,
                priced_by="ledger" if origin.ledger_line is not None else "quote",
            )
            if invoice_line.posted_with_usage and line.price in posted:
                rounding = CONTEXT.add(
                    rounding, CONTEXT.subtract(line.amount, posted[line.price])
                )
        else:
            invoice_line = InvoiceLine(
                kind="minimum", amount=line.amount, plan=line.plan, minimum=line.minimum
            )
        lines.append(invoice_line)
    posted_total = _sum(posted.values())
    posted_total = CONTEXT.add(posted_total, _sum(late.amount for late in inputs.late))
    return ComposedInvoice(
        account_id=billing.account_id,
        currency=billing.currency,
        period=period,
        request=request,
        lines=tuple(lines),
        subtotal=priced.subtotal,
        discounts=priced.discounts,
        taxes=priced.taxes,
        quote_total=priced.total,
        adjustments=adjustments,
        total=CONTEXT.add(priced.total, adjustments.total),
        posted=posted_total,
        rounding=rounding,
    )


def _adjustments(
    tariff: Tariff, request: QuoteRequest, currency: str, inputs: InvoiceInputs
) -> Adjustments:
    late: dict[tuple[Period, str], Decimal] = defaultdict(Decimal)
    for item in inputs.late:
        late[(item.origin, item.price_id)] = CONTEXT.add(late[(item.origin, item.price_id)],
                                                         item.amount)
    lines: list[InvoiceLine] = []
    for (origin, price_id), amount in sorted(late.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        price = _any_version(tariff, price_id, origin)
        lines.append(
            InvoiceLine(
                kind="late_usage", amount=amount, price=price.id, product=price.product,
                unit=price.unit, origin=origin, aggregate=price.aggregate_usage,
            )
        )
    for again in sorted(inputs.remeasured, key=lambda r: (r.origin, r.price_id)):
        price = _any_version(tariff, again.price_id, again.origin)
        quantity = aggregate(price, samples_for(price, again.records))
        amount = CONTEXT.subtract(rated_amount(price, quantity), again.billed)
        if amount:
            lines.append(
                InvoiceLine(
                    kind="remeasured", amount=amount, price=price.id, product=price.product,
                    quantity=quantity, unit=price.unit, origin=again.origin,
                    aggregate=price.aggregate_usage,
                )
            )
    if not lines:
        return Adjustments()
    subtotal = _sum(line.amount for line in lines)
    problems = _Problems(request.source)
    taxes = _taxes(problems, tariff, request, currency, subtotal)
    if problems.errors:
        raise TariffError(problems.errors)
    exclusive = _sum(tax.amount for tax in taxes if not tax.inclusive)
    return Adjustments(tuple(lines), subtotal, tuple(taxes), CONTEXT.add(subtotal, exclusive))
