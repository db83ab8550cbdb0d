"""Pricing one invoice from a tariff and a list of items, without any server.

Rounding, in this order and nowhere else:

1. Each line is computed at full precision and rounded once, to the currency's minor
   unit (half-even unless its price names another ``rounding``).
2. A plan's minimum commitment adds a line with the shortfall, if any.
3. The subtotal is the sum of the lines.
4. Coupons apply to the subtotal in the order given, each to what the previous ones
   left, each rounded half-even and never more than what is left.
5. Each exclusive tax is computed once on the discounted subtotal and rounded
   half-even. An inclusive tax is already inside the prices: its share of the
   discounted subtotal, ``amount * p / (100 + sum of inclusive p)``, is reported and
   not added.
6. total = subtotal - discounts + exclusive taxes.

A price or coupon in another currency than the quote's is an error, not a conversion.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction

from collector.rating.document import Reader, TariffError, join, load_document
from collector.rating.engine import (
    aggregate,
    licensed_amount,
    rated_amount,
    round_amount,
    to_decimal_exact,
)
from collector.rating.model import Price, RatingError, Tariff
from collector.rating.proration import Window, billed_intervals
from common.errors import ConfigError
from common.money import CONTEXT, canonical_text, round_minor

QUOTE_KEYS = ("period", "items", "coupons", "tax_rates", "plans", "currency")
ITEM_KEYS = ("price", "quantity", "samples", "active")
WINDOW_KEYS = ("start", "end")


@dataclass(frozen=True, slots=True)
class QuoteItem:
    """One item to price; ``path`` locates it in the request for error messages."""

    price: str
    path: str = ""
    quantity: Decimal | None = None
    samples: tuple[Decimal, ...] | None = None
    active: Window | None = None


@dataclass(frozen=True, slots=True)
class QuoteRequest:
    period: Window
    items: tuple[QuoteItem, ...]
    coupons: tuple[str, ...] = ()
    tax_rates: tuple[str, ...] = ()
    plans: tuple[str, ...] = ()
    currency: str | None = None
    source: str = "<quote>"


@dataclass(frozen=True, slots=True)
class QuoteLine:
    """A priced item, or (``plan`` set) the shortfall of a plan's minimum commitment."""

    amount: Decimal
    price: str | None = None
    product: str | None = None
    quantity: Decimal | None = None
    unit: str | None = None
    intervals: Fraction | None = None
    plan: str | None = None
    minimum: Decimal | None = None


@dataclass(frozen=True, slots=True)
class Discount:
    coupon: str
    amount: Decimal


@dataclass(frozen=True, slots=True)
class TaxLine:
    tax_rate: str
    percentage: Decimal
    inclusive: bool
    amount: Decimal


@dataclass(frozen=True, slots=True)
class Quote:
    currency: str
    lines: tuple[QuoteLine, ...]
    subtotal: Decimal
    discounts: tuple[Discount, ...]
    taxes: tuple[TaxLine, ...]
    total: Decimal


# -- the request -------------------------------------------------------------------------


def parse_quote_text(text: str, source: str) -> QuoteRequest:
    """A quote request from JSON (or TOML) text."""
    return parse_quote_request(load_document(text, source), source)


def parse_quote_request(data: Mapping[str, object], source: str) -> QuoteRequest:
    """Validate a quote request; :class:`TariffError` lists every problem with its path."""
    reader = Reader(source)
    top = reader.table(data, "", QUOTE_KEYS, required=("period", "items"))
    if top is None:
        reader.raise_errors()
        raise AssertionError("unreachable")
    period = reader.get(top, "period", "", lambda v, p: _window(reader, v, p))
    items: list[QuoteItem] = []
    for index, raw in enumerate(reader.get(top, "items", "", reader.array) or []):
        item = _item(reader, raw, f"items[{index}]")
        if item is not None:
            items.append(item)
    coupons = reader.get(top, "coupons", "", reader.strings) or ()
    tax_rates = reader.get(top, "tax_rates", "", reader.strings) or ()
    plans = reader.get(top, "plans", "", reader.strings) or ()
    currency = reader.get(top, "currency", "", reader.currency)
    for key, ids in (("coupons", coupons), ("tax_rates", tax_rates), ("plans", plans)):
        for index, item_id in enumerate(ids):
            if ids.index(item_id) != index:
                reader.fail(f"{key}[{index}]", f"{item_id!r} is listed twice")
    if not items and currency is None and not reader.errors:
        reader.fail("currency", "required when there are no items")
    reader.raise_errors()
    assert period is not None
    return QuoteRequest(
        period=period,
        items=tuple(items),
        coupons=coupons,
        tax_rates=tax_rates,
        plans=plans,
        currency=currency,
        source=source,
    )


def _window(reader: Reader, raw: object, path: str) -> Window | None:
    table = reader.table(raw, path, WINDOW_KEYS, required=WINDOW_KEYS)
    if table is None:
        return None
    start = reader.get(table, "start", path, reader.instant)
    end = reader.get(table, "end", path, reader.instant)
    if start is None or end is None:
        return None
    try:
        return Window(start, end)
    except RatingError as exc:
        reader.fail(join(path, "end"), str(exc))
        return None


def _item(reader: Reader, raw: object, path: str) -> QuoteItem | None:
    mark = reader.mark()
    table = reader.table(raw, path, ITEM_KEYS, required=("price",))
    if table is None:
        return None
    price = reader.get(table, "price", path, reader.text)
    quantity = reader.get(table, "quantity", path, reader.decimal)
    samples: tuple[Decimal, ...] | None = None
    raw_samples = reader.get(table, "samples", path, reader.array)
    if raw_samples is not None:
        found = [
            reader.decimal(sample, f"{join(path, 'samples')}[{index}]")
            for index, sample in enumerate(raw_samples)
        ]
        samples = tuple(s for s in found if s is not None)
    if "quantity" in table and "samples" in table:
        reader.fail(join(path, "samples"), "give quantity or samples, not both")
    active = reader.get(table, "active", path, lambda v, p: _window(reader, v, p))
    if not reader.clean_since(mark) or price is None:
        return None
    return QuoteItem(price=price, path=path, quantity=quantity, samples=samples, active=active)


# -- pricing -----------------------------------------------------------------------------


class _Problems:
    def __init__(self, source: str) -> None:
        self.source = source
        self.errors: list[ConfigError] = []

    def fail(self, path: str, expected: str) -> None:
        self.errors.append(ConfigError(self.source, path, expected))


def quote(tariff: Tariff, request: QuoteRequest) -> Quote:
    """Price ``request`` against ``tariff``; :class:`TariffError` lists what is wrong."""
    problems = _Problems(request.source)
    period = request.period
    priced: list[tuple[QuoteItem, Price]] = []
    currency = request.currency
    for item in request.items:
        start = period.start if item.active is None else max(
            item.active.start, period.start, key=lambda moment: moment.timestamp()
        )
        try:
            price = tariff.price(item.price, start)
        except RatingError as exc:
            problems.fail(join(item.path, "price"), str(exc))
            continue
        if currency is None:
            currency = price.currency
        if price.currency != currency:
            problems.fail(
                join(item.path, "price"),
                f"price {price.id!r} is in {price.currency}, the quote in {currency}; "
                "meterd does not convert currencies",
            )
            continue
        priced.append((item, price))
    if currency is None:
        problems.fail("currency", "required when no item names a price")
        raise TariffError(problems.errors)

    lines = [line for item, price in priced if (line := _line(problems, item, price, period))]
    return settle(problems, tariff, request, currency, lines)


def settle(
    problems: _Problems,
    tariff: Tariff,
    request: QuoteRequest,
    currency: str,
    lines: list[QuoteLine],
) -> Quote:
    """Steps 2 to 6 over priced lines: minimum commitments, subtotal, coupons, taxes and
    the total. :class:`TariffError` naming every problem found on the way."""
    lines = lines + _minimums(problems, tariff, request, currency, lines)
    subtotal = _sum(line.amount for line in lines)
    discounts = _discounts(problems, tariff, request, currency, subtotal)
    discounted = CONTEXT.subtract(subtotal, _sum(d.amount for d in discounts))
    taxes = _taxes(problems, tariff, request, currency, discounted)
    if problems.errors:
        raise TariffError(problems.errors)
    exclusive = _sum(tax.amount for tax in taxes if not tax.inclusive)
    return Quote(
        currency=currency,
        lines=tuple(lines),
        subtotal=subtotal,
        discounts=tuple(discounts),
        taxes=tuple(taxes),
        total=CONTEXT.add(discounted, exclusive),
    )


def _sum(amounts: Iterable[Decimal]) -> Decimal:
    total = Decimal(0)
    for amount in amounts:
        total = CONTEXT.add(total, amount)
    return total


def _line(problems: _Problems, item: QuoteItem, price: Price, period: Window) -> QuoteLine | None:
    usage_type = price.usage_type
    try:
        if usage_type == "metered":
            if item.active is not None:
                problems.fail(join(item.path, "active"), "a metered price takes no active window")
                return None
            if item.quantity is None and item.samples is None:
                problems.fail(item.path, f"metered price {price.id!r} needs quantity or samples")
                return None
            quantity = item.quantity
            if quantity is None:
                quantity = aggregate(price, item.samples or ())
            return QuoteLine(
                amount=rated_amount(price, quantity),
                price=price.id,
                product=price.product,
                quantity=quantity,
                unit=price.unit,
            )
        if item.samples is not None:
            problems.fail(join(item.path, "samples"), "samples feed metered prices only")
            return None
        quantity = Decimal(1) if item.quantity is None else item.quantity
        if usage_type == "one_time":
            if item.active is not None:
                problems.fail(join(item.path, "active"), "a one-time price has no active window")
                return None
            return QuoteLine(
                amount=rated_amount(price, quantity),
                price=price.id,
                product=price.product,
                quantity=quantity,
            )
        amount = licensed_amount(price, quantity, period, item.active)
        return QuoteLine(
            amount=round_amount(price, amount),
            price=price.id,
            product=price.product,
            quantity=quantity,
            intervals=billed_intervals(price, period, item.active),
        )
    except RatingError as exc:
        problems.fail(item.path, str(exc))
        return None


def _minimums(
    problems: _Problems,
    tariff: Tariff,
    request: QuoteRequest,
    currency: str,
    lines: list[QuoteLine],
) -> list[QuoteLine]:
    owner: dict[str, str] = {}
    topups: list[QuoteLine] = []
    for index, plan_id in enumerate(request.plans):
        path = f"plans[{index}]"
        plan = tariff.plans.get(plan_id)
        if plan is None:
            problems.fail(path, f"no plan {plan_id!r} in the tariff")
            continue
        if plan.currency != currency:
            problems.fail(path, f"plan {plan_id!r} is in {plan.currency}, the quote in {currency}")
            continue
        for price_id in plan.prices:
            if price_id in owner:
                problems.fail(
                    path,
                    f"price {price_id!r} is in both plan {owner[price_id]!r} and "
                    f"{plan_id!r}: a line can count toward one minimum only",
                )
            owner[price_id] = plan_id
        if plan.minimum_amount is None:
            continue
        minimum = round_minor(plan.minimum_amount, currency)
        spent = _sum(line.amount for line in lines if line.price in plan.prices)
        if spent < minimum:
            topups.append(
                QuoteLine(amount=CONTEXT.subtract(minimum, spent), plan=plan.id, minimum=minimum)
            )
    return topups


def _discounts(
    problems: _Problems,
    tariff: Tariff,
    request: QuoteRequest,
    currency: str,
    subtotal: Decimal,
) -> list[Discount]:
    discounts: list[Discount] = []
    left = subtotal
    for index, coupon_id in enumerate(request.coupons):
        path = f"coupons[{index}]"
        coupon = tariff.coupons.get(coupon_id)
        if coupon is None:
            problems.fail(path, f"no coupon {coupon_id!r} in the tariff")
            continue
        if coupon.percent_off is not None:
            off = Fraction(left) * Fraction(coupon.percent_off) / 100
            amount = round_minor(to_decimal_exact(off), currency, ROUND_HALF_EVEN)
        else:
            assert coupon.amount_off is not None
            if coupon.currency != currency:
                problems.fail(
                    path,
                    f"coupon {coupon_id!r} takes {coupon.currency} off, the quote is in "
                    f"{currency}; meterd does not convert currencies",
                )
                continue
            amount = round_minor(coupon.amount_off, currency, ROUND_HALF_EVEN)
        amount = min(amount, left)
        left = CONTEXT.subtract(left, amount)
        discounts.append(Discount(coupon=coupon.id, amount=amount))
    return discounts


def _taxes(
    problems: _Problems,
    tariff: Tariff,
    request: QuoteRequest,
    currency: str,
    discounted: Decimal,
) -> list[TaxLine]:
    rates = []
    for index, rate_id in enumerate(request.tax_rates):
        rate = tariff.tax_rates.get(rate_id)
        if rate is None:
            problems.fail(f"tax_rates[{index}]", f"no tax rate {rate_id!r} in the tariff")
        else:
            rates.append(rate)
    if len({rate.inclusive for rate in rates}) > 1:
        problems.fail(
            "tax_rates",
            "inclusive and exclusive tax rates cannot be mixed on one quote: prices either "
            "contain tax or do not",
        )
        return []
    inclusive_sum = Fraction(0)
    for rate in rates:
        if rate.inclusive:
            inclusive_sum += Fraction(rate.percentage)
    taxes: list[TaxLine] = []
    for rate in rates:
        base = Fraction(discounted)
        if rate.inclusive:
            share = base * Fraction(rate.percentage) / (100 + inclusive_sum)
        else:
            share = base * Fraction(rate.percentage) / 100
        amount = round_minor(to_decimal_exact(share), currency, ROUND_HALF_EVEN)
        taxes.append(TaxLine(rate.id, rate.percentage, rate.inclusive, amount))
    return taxes


# -- output ------------------------------------------------------------------------------


def money_text(amount: Decimal, currency: str) -> str:
    """``amount`` in the currency's minor unit as plain text: "2.35", "1200", "1.250"."""
    rounded = round_minor(amount, currency)
    return format(abs(rounded) if rounded.is_zero() else rounded, "f")


def fraction_text(value: Fraction) -> str:
    """``value`` as "383/743", or "3" when it is whole."""
    if value.denominator == 1:
        return str(value.numerator)
    return f"{value.numerator}/{value.denominator}"


def quote_document(result: Quote) -> dict[str, object]:
    """The quote as a JSON-ready mapping; every amount is a decimal string."""
    currency = result.currency
    lines: list[dict[str, object]] = []
    for line in result.lines:
        entry: dict[str, object] = {}
        if line.plan is not None:
            entry["plan"] = line.plan
            entry["minimum"] = money_text(line.minimum or Decimal(0), currency)
        else:
            entry["price"] = line.price
            if line.product is not None:
                entry["product"] = line.product
            if line.quantity is not None:
                entry["quantity"] = canonical_text(line.quantity)
            if line.unit is not None:
                entry["unit"] = line.unit
            if line.intervals is not None:
                entry["intervals"] = fraction_text(line.intervals)
        entry["amount"] = money_text(line.amount, currency)
        lines.append(entry)
    return {
        "currency": currency,
        "lines": lines,
        "subtotal": money_text(result.subtotal, currency),
        "discounts": [
            {"coupon": d.coupon, "amount": money_text(d.amount, currency)}
            for d in result.discounts
        ],
        "taxes": [
            {
                "tax_rate": tax.tax_rate,
                "percentage": canonical_text(tax.percentage),
                "inclusive": tax.inclusive,
                "amount": money_text(tax.amount, currency),
            }
            for tax in result.taxes
        ],
        "total": money_text(result.total, currency),
    }
