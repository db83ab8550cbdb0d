"""Reading a tariff file (TOML, or JSON) into a validated :class:`Tariff`.

Every problem is collected with its key path (``prices[2].tiers[1].up_to``) and all of
them are raised together as one :class:`TariffError`, so ``meterd tariff check`` can
show the whole list at once. Unknown keys are refused, so a typo cannot silently
change a price. Money is a decimal string or an integer: a float literal (``0.1`` in
TOML or JSON) has already lost precision and is refused with its path.

The format is documented in ``docs/tariffs.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import TypeVar

from collector.rating.document import (
    FloatLiteral,
    Reader,
    TariffError,
    describe,
    join,
    load_document,
)
from collector.rating.model import (
    AGGREGATE_USAGE,
    BILLED_PER,
    BILLING_SCHEMES,
    INTERVALS,
    TIERS_MODES,
    TRANSFORM_ROUNDING,
    Coupon,
    Plan,
    Price,
    RatingError,
    Recurring,
    Tariff,
    TaxRate,
    Tier,
    TransformQuantity,
)
from collector.rating.units import UNITS
from common.errors import ConfigError, ValidationError
from common.money import ROUNDING_MODES
from common.records import METRIC_NAME

__all__ = [
    "Coupon",
    "FloatLiteral",
    "Plan",
    "Price",
    "RatingError",
    "Recurring",
    "Tariff",
    "TariffError",
    "TaxRate",
    "Tier",
    "TransformQuantity",
    "load_document",
    "parse_tariff",
    "parse_tariff_text",
]

TOP_KEYS = ("name", "prices", "plans", "tax_rates", "coupons")
PRICE_KEYS = (
    "id", "product", "nickname", "currency", "effective_from", "metric", "unit",
    "billing_scheme", "unit_amount_decimal", "tiers_mode", "tiers", "transform_quantity",
    "recurring", "period_cap_decimal", "rounding", "metadata",
)  # fmt: skip
TIER_KEYS = ("up_to", "unit_amount_decimal", "flat_amount_decimal")
RECURRING_KEYS = ("interval", "interval_count", "usage_type", "aggregate_usage", "billed_per")
TRANSFORM_KEYS = ("divide_by", "round")
PLAN_KEYS = ("id", "name", "description", "prices", "minimum_amount_decimal", "metadata")
TAX_KEYS = (
    "id", "percentage", "inclusive", "display_name", "description", "jurisdiction",
    "country", "metadata",
)  # fmt: skip
COUPON_KEYS = (
    "id", "percent_off", "amount_off", "currency", "name", "duration",
    "duration_in_months", "metadata",
)  # fmt: skip
COUPON_DURATIONS = ("once", "repeating", "forever")

_MINOR_UNIT_HINT = (
    "meterd does not read Stripe's integer {key} in minor units; write "
    '{key}_decimal in major units, e.g. "12.00" for 12 EUR'
)
HINTS = {
    "unit_amount": _MINOR_UNIT_HINT.format(key="unit_amount"),
    "flat_amount": _MINOR_UNIT_HINT.format(key="flat_amount"),
    "amount_off_decimal": "write amount_off as a decimal string in major units",
    "minimum_amount": "write minimum_amount_decimal",
    "period_cap": "write period_cap_decimal",
}



def parse_tariff_text(text: str, source: str, fmt: str | None = None) -> Tariff:
    """Parse a tariff from TOML, or JSON (text starting with ``{``, or ``fmt="json"``)."""
    return parse_tariff(load_document(text, source, fmt), source)


def parse_tariff(data: Mapping[str, object], source: str) -> Tariff:
    """Validate ``data`` into a :class:`Tariff`, or raise :class:`TariffError` listing
    every problem with its key path."""
    reader = Reader(source, HINTS)
    top = reader.table(data, "", TOP_KEYS, required=("prices",))
    if top is None:
        reader.raise_errors()
        raise AssertionError("unreachable")
    name = reader.get(top, "name", "", reader.text)

    prices: list[tuple[str, Price]] = []
    raw_prices = reader.get(top, "prices", "", reader.array) or []
    if "prices" in top and isinstance(top["prices"], list) and not raw_prices:
        reader.fail("prices", "expected at least one [[prices]] table")
    for index, raw in enumerate(raw_prices):
        path = f"prices[{index}]"
        price = _price(reader, raw, path)
        if price is not None:
            prices.append((path, price))
    versions = _versions(reader, prices)

    # ids of price tables that failed: a plan naming one gets no second, misleading error
    broken = {
        str(raw["id"]) for raw in raw_prices if isinstance(raw, Mapping) and "id" in raw
    } - set(versions)
    plans = _collect(reader, top, "plans", _plan_reader(versions, broken))
    tax_rates = _collect(reader, top, "tax_rates", _tax_rate)
    coupons = _collect(reader, top, "coupons", _coupon)
    reader.raise_errors()
    try:
        return Tariff(
            versions=versions,
            plans={plan.id: plan for plan in plans},
            tax_rates={rate.id: rate for rate in tax_rates},
            coupons={coupon.id: coupon for coupon in coupons},
            name=name,
        )
    except ValidationError as exc:
        raise TariffError([ConfigError(source, "", str(exc))]) from None


Item = TypeVar("Item", Plan, TaxRate, Coupon)


def _collect(
    reader: Reader,
    top: Mapping[str, object],
    key: str,
    read: Callable[[Reader, object, str], Item | None],
) -> list[Item]:
    found: list[Item] = []
    seen: dict[str, str] = {}
    for index, raw in enumerate(reader.get(top, key, "", reader.array) or []):
        path = f"{key}[{index}]"
        item = read(reader, raw, path)
        if item is None:
            continue
        if item.id in seen:
            reader.fail(join(path, "id"), f"duplicate id {item.id!r} (also at {seen[item.id]})")
            continue
        seen[item.id] = path
        found.append(item)
    return found


# -- prices ------------------------------------------------------------------------------


def _price(reader: Reader, raw: object, path: str) -> Price | None:
    mark = reader.mark()
    table = reader.table(raw, path, PRICE_KEYS, required=("id", "currency"))
    if table is None:
        return None
    price_id = reader.get(table, "id", path, reader.identifier)
    currency = reader.get(table, "currency", path, reader.currency)
    recurring = reader.get(table, "recurring", path, lambda v, p: _recurring(reader, v, p))
    usage_type = recurring.usage_type if recurring else "one_time"
    if "recurring" in table and recurring is None:
        usage_type = "unknown"
    scheme = reader.get(table, "billing_scheme", path, reader.choice(BILLING_SCHEMES), "per_unit")

    unit_amount: Decimal | None = None
    tiers_mode: str | None = None
    tiers: tuple[Tier, ...] = ()
    transform: TransformQuantity | None = None
    if scheme == "per_unit":
        unit_amount = reader.get(
            table, "unit_amount_decimal", path, reader.decimal, required=True
        )
        why = 'belongs to billing_scheme = "tiered"'
        reader.forbid(table, "tiers", path, why)
        reader.forbid(table, "tiers_mode", path, why)
        transform = reader.get(
            table, "transform_quantity", path, lambda v, p: _transform(reader, v, p)
        )
    elif scheme == "tiered":
        why = 'belongs to billing_scheme = "per_unit"'
        reader.forbid(table, "unit_amount_decimal", path, why)
        reader.forbid(table, "transform_quantity", path, why)
        tiers_mode = reader.get(
            table, "tiers_mode", path, reader.choice(TIERS_MODES), required=True
        )
        read_tiers = reader.get(
            table, "tiers", path, lambda v, p: _tiers(reader, v, p), required=True
        )
        tiers = read_tiers or ()

    metric: str | None = None
    unit: str | None = None
    if usage_type == "metered":
        metric = reader.get(table, "metric", path, _metric(reader), required=True)
        unit = reader.get(table, "unit", path, _unit(reader), required=True)
        aggregate = recurring.aggregate_usage if recurring else None
        if unit is not None and UNITS[unit].rate and aggregate == "sum":
            reader.fail(
                join(path, "unit"),
                f"{unit} is a rate: a summed rate means nothing; use aggregate_usage "
                '"p95", "max" or "last_during_period", or a volume unit such as "GB"',
            )
    elif usage_type in ("licensed", "one_time"):
        why = "only a metered price (recurring.usage_type = \"metered\") has a metric and unit"
        reader.forbid(table, "metric", path, why)
        reader.forbid(table, "unit", path, why)
    if usage_type == "one_time":
        reader.forbid(table, "period_cap_decimal", path, "a one-time price has no period to cap")
    period_cap = reader.get(table, "period_cap_decimal", path, reader.positive_decimal)
    rounding = reader.get(
        table, "rounding", path, reader.choice(tuple(ROUNDING_MODES)), "half_even"
    )
    effective_from = reader.get(table, "effective_from", path, reader.instant)
    metadata = reader.get(table, "metadata", path, reader.metadata) or {}
    product = reader.get(table, "product", path, reader.text)
    nickname = reader.get(table, "nickname", path, reader.text)
    if not reader.clean_since(mark) or price_id is None or currency is None:
        return None
    try:
        return Price(
            id=price_id,
            currency=currency,
            billing_scheme=scheme or "per_unit",
            unit_amount=unit_amount,
            tiers_mode=tiers_mode,
            tiers=tiers,
            transform_quantity=transform,
            recurring=recurring,
            metric=metric,
            unit=unit,
            product=product,
            nickname=nickname,
            effective_from=effective_from,
            period_cap=period_cap,
            rounding=rounding or "half_even",
            metadata=metadata,
        )
    except ValidationError as exc:
        reader.fail(path, str(exc))
        return None


def _metric(reader: Reader) -> Callable[[object, str], str | None]:
    def convert(value: object, path: str) -> str | None:
        if isinstance(value, str) and METRIC_NAME.match(value):
            return value
        reader.fail(path, f"expected a dotted lower-case metric name such as "
                    f"\"net.tx_bytes\", got {describe(value)}")  # fmt: skip
        return None

    return convert


def _unit(reader: Reader) -> Callable[[object, str], str | None]:
    def convert(value: object, path: str) -> str | None:
        if isinstance(value, str) and value in UNITS:
            return value
        reader.fail(path, f"unknown unit {describe(value)}; expected one of: {', '.join(UNITS)}")
        return None

    return convert


def _recurring(reader: Reader, raw: object, path: str) -> Recurring | None:
    mark = reader.mark()
    table = reader.table(raw, path, RECURRING_KEYS, required=("interval",))
    if table is None:
        return None
    interval = reader.get(table, "interval", path, reader.choice(INTERVALS))
    count = reader.get(table, "interval_count", path, reader.integer, 1)
    usage_type = reader.get(table, "usage_type", path, reader.choice(("licensed", "metered")),
                            "licensed")  # fmt: skip
    aggregate: str | None = None
    billed_per = "second"
    if usage_type == "metered":
        aggregate = reader.get(table, "aggregate_usage", path, reader.choice(AGGREGATE_USAGE),
                               "sum")  # fmt: skip
        reader.forbid(table, "billed_per", path, "applies to licensed prices only")
        if interval == "hour":
            reader.fail(
                join(path, "interval"),
                "a metered price accumulates usage over a billing period of a day or longer; "
                'bill hours through the unit (unit = "hour")',
            )
    else:
        reader.forbid(table, "aggregate_usage", path, "applies to metered prices only")
        chosen = reader.get(table, "billed_per", path, reader.choice(BILLED_PER), "second")
        billed_per = chosen or "second"
    if not reader.clean_since(mark) or interval is None or count is None or usage_type is None:
        return None
    return Recurring(
        interval=interval,
        interval_count=count,
        usage_type=usage_type,
        aggregate_usage=aggregate,
        billed_per=billed_per,
    )


def _transform(reader: Reader, raw: object, path: str) -> TransformQuantity | None:
    mark = reader.mark()
    table = reader.table(raw, path, TRANSFORM_KEYS, required=TRANSFORM_KEYS)
    if table is None:
        return None
    divide_by = reader.get(table, "divide_by", path, reader.integer)
    rounding = reader.get(table, "round", path, reader.choice(TRANSFORM_ROUNDING))
    if not reader.clean_since(mark) or divide_by is None or rounding is None:
        return None
    return TransformQuantity(divide_by=divide_by, round=rounding)


def _tiers(reader: Reader, raw: object, path: str) -> tuple[Tier, ...] | None:
    items = reader.array(raw, path)
    if items is None:
        return None
    if not items:
        reader.fail(path, 'expected at least one tier, the last with up_to = "inf"')
        return None
    mark = reader.mark()
    tiers: list[Tier] = []
    previous: Decimal | None = None
    last = len(items) - 1
    for index, item in enumerate(items):
        tier_path = f"{path}[{index}]"
        table = reader.table(item, tier_path, TIER_KEYS, required=("up_to",))
        if table is None:
            continue
        up_to_path = join(tier_path, "up_to")
        up_to = _up_to(reader, table.get("up_to"), up_to_path) if "up_to" in table else None
        if up_to == "inf" and index != last:
            reader.fail(up_to_path, 'only the last tier may have up_to = "inf"')
        if isinstance(up_to, Decimal):
            if index == last:
                reader.fail(
                    up_to_path,
                    f'the last tier must have up_to = "inf" (it has {up_to}), so every '
                    "quantity has a price",
                )
            if previous is not None and up_to <= previous:
                reader.fail(
                    up_to_path,
                    f"tiers must ascend: {up_to} is not greater than the previous "
                    f"tier's up_to {previous}",
                )
            previous = up_to
        unit_amount = reader.get(table, "unit_amount_decimal", tier_path, reader.decimal)
        flat_amount = reader.get(table, "flat_amount_decimal", tier_path, reader.decimal)
        if "unit_amount_decimal" not in table and "flat_amount_decimal" not in table:
            reader.fail(tier_path, "expected unit_amount_decimal, flat_amount_decimal or both")
        tiers.append(
            Tier(
                up_to=up_to if isinstance(up_to, Decimal) else None,
                unit_amount=unit_amount or Decimal(0),
                flat_amount=flat_amount or Decimal(0),
            )
        )
    if not reader.clean_since(mark):
        return None
    return tuple(tiers)


def _up_to(reader: Reader, value: object, path: str) -> Decimal | str | None:
    if value == "inf":
        return "inf"
    if isinstance(value, FloatLiteral) and value.text.lstrip("+") == "inf":
        reader.fail(path, 'write infinity as the string "inf" (up_to = "inf")')
        return None
    return reader.positive_decimal(value, path)


def _versions(
    reader: Reader, prices: Sequence[tuple[str, Price]]
) -> dict[str, tuple[Price, ...]]:
    """Group price versions by id; versions of one id must agree on what they meter."""
    groups: dict[str, list[tuple[str, Price]]] = {}
    for path, price in prices:
        groups.setdefault(price.id, []).append((path, price))
    versions: dict[str, tuple[Price, ...]] = {}
    for price_id, group in groups.items():
        first_path, first = group[0]
        starts: dict[datetime | None, str] = {first.effective_from: first_path}
        ok = True
        for path, other in group[1:]:
            if other.effective_from in starts:
                where = starts[other.effective_from]
                if other.effective_from is None:
                    reader.fail(
                        join(path, "id"),
                        f"duplicate price id {price_id!r} (also at {where}); a later version "
                        "needs effective_from",
                    )
                else:
                    reader.fail(
                        join(path, "effective_from"),
                        f"price {price_id!r} already has a version taking effect at "
                        f"{other.effective_from.isoformat()} ({where})",
                    )
                ok = False
                continue
            starts[other.effective_from] = path
            for key, mine, theirs in _identity(other, first):
                if mine != theirs:
                    reader.fail(
                        join(path, key),
                        f"every version of price {price_id!r} must have the same {key} "
                        f"({theirs} at {first_path}, here {mine})",
                    )
                    ok = False
        if ok:
            versions[price_id] = tuple(price for _, price in group)
    return versions


def _identity(price: Price, first: Price) -> list[tuple[str, object, object]]:
    def interval(p: Price) -> object:
        return f"{p.recurring.interval_count} {p.recurring.interval}" if p.recurring else None

    return [
        ("currency", price.currency, first.currency),
        ("recurring.usage_type", price.usage_type, first.usage_type),
        ("recurring.interval", interval(price), interval(first)),
        ("recurring.aggregate_usage", price.aggregate_usage, first.aggregate_usage),
        ("metric", price.metric, first.metric),
        ("unit", price.unit, first.unit),
    ]


# -- plans, tax rates, coupons ------------------------------------------------------------


def _plan_reader(
    versions: Mapping[str, tuple[Price, ...]], broken: Collection[str]
) -> Callable[[Reader, object, str], Plan | None]:
    def read(reader: Reader, raw: object, path: str) -> Plan | None:
        mark = reader.mark()
        table = reader.table(raw, path, PLAN_KEYS, required=("id", "prices"))
        if table is None:
            return None
        plan_id = reader.get(table, "id", path, reader.identifier)
        price_ids = reader.get(table, "prices", path, reader.strings) or ()
        if "prices" in table and isinstance(table["prices"], list) and not price_ids:
            reader.fail(join(path, "prices"), "expected at least one price id")
        currency: str | None = None
        for index, price_id in enumerate(price_ids):
            item_path = f"{join(path, 'prices')}[{index}]"
            if price_id not in versions:
                if price_id not in broken:
                    reader.fail(item_path, f"no price with id {price_id!r}")
                continue
            if price_ids.index(price_id) != index:
                reader.fail(item_path, f"price {price_id!r} is listed twice")
            price_currency = versions[price_id][0].currency
            if currency is None:
                currency = price_currency
            elif price_currency != currency:
                reader.fail(
                    item_path,
                    f"price {price_id!r} is in {price_currency}, the plan's other prices "
                    f"in {currency}",
                )
        minimum = reader.get(table, "minimum_amount_decimal", path, reader.positive_decimal)
        name = reader.get(table, "name", path, reader.text)
        description = reader.get(table, "description", path, reader.text)
        metadata = reader.get(table, "metadata", path, reader.metadata) or {}
        if not reader.clean_since(mark) or plan_id is None or currency is None:
            return None
        return Plan(
            id=plan_id,
            currency=currency,
            prices=price_ids,
            name=name,
            description=description,
            minimum_amount=minimum,
            metadata=metadata,
        )

    return read


def _tax_rate(reader: Reader, raw: object, path: str) -> TaxRate | None:
    mark = reader.mark()
    table = reader.table(raw, path, TAX_KEYS, required=("id", "percentage"))
    if table is None:
        return None
    rate_id = reader.get(table, "id", path, reader.identifier)
    percentage = reader.get(table, "percentage", path, reader.decimal)
    if percentage is not None and percentage > 100:
        reader.fail(join(path, "percentage"), f"expected at most 100, got {percentage}")
    inclusive = reader.get(table, "inclusive", path, reader.boolean, False)
    texts = {
        key: reader.get(table, key, path, reader.text)
        for key in ("display_name", "description", "jurisdiction", "country")
    }
    metadata = reader.get(table, "metadata", path, reader.metadata) or {}
    if not reader.clean_since(mark) or rate_id is None or percentage is None:
        return None
    return TaxRate(
        id=rate_id,
        percentage=percentage,
        inclusive=bool(inclusive),
        display_name=texts["display_name"],
        description=texts["description"],
        jurisdiction=texts["jurisdiction"],
        country=texts["country"],
        metadata=metadata,
    )


def _coupon(reader: Reader, raw: object, path: str) -> Coupon | None:
    mark = reader.mark()
    table = reader.table(raw, path, COUPON_KEYS, required=("id",))
    if table is None:
        return None
    coupon_id = reader.get(table, "id", path, reader.identifier)
    percent_off = reader.get(table, "percent_off", path, reader.positive_decimal)
    amount_off = reader.get(table, "amount_off", path, reader.positive_decimal)
    currency = reader.get(table, "currency", path, reader.currency)
    if ("percent_off" in table) == ("amount_off" in table):
        reader.fail(path, "expected exactly one of percent_off and amount_off")
    if percent_off is not None and percent_off > 100:
        reader.fail(join(path, "percent_off"), f"expected at most 100, got {percent_off}")
    if "amount_off" in table and "percent_off" not in table and "currency" not in table:
        reader.fail(join(path, "currency"), "required with amount_off")
    if "percent_off" in table:
        reader.forbid(table, "currency", path, "only an amount_off coupon has a currency")
    duration = reader.get(table, "duration", path, reader.choice(COUPON_DURATIONS), "forever")
    months = reader.get(table, "duration_in_months", path, reader.integer)
    if duration == "repeating" and "duration_in_months" not in table:
        reader.fail(join(path, "duration_in_months"), 'required with duration = "repeating"')
    if duration != "repeating":
        reader.forbid(table, "duration_in_months", path, 'only with duration = "repeating"')
    name = reader.get(table, "name", path, reader.text)
    metadata = reader.get(table, "metadata", path, reader.metadata) or {}
    if not reader.clean_since(mark) or coupon_id is None:
        return None
    return Coupon(
        id=coupon_id,
        percent_off=percent_off,
        amount_off=amount_off,
        currency=currency,
        name=name,
        duration=duration or "forever",
        duration_in_months=months,
        metadata=metadata,
    )
