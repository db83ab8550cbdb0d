"""An account's billing settings and their check against the tariff. Pure.

The settings come from ``[accounts.<id>]`` in the collector's configuration
(:mod:`collector.config` reads them): currency, time zone and cycle, tax jurisdiction
and tax id, coupons, and the plans and add-ons the account holds, each with its
effective range ``[since, until)``.

What goes on an invoice, by these settings:

- **Plans**: every licensed price of a plan is charged for the part of the period the
  plan was held, prorated by seconds exactly as ``meterd tariff quote`` prorates an
  item with an ``active`` window; a one-time price of the plan (a setup fee) is charged
  in the period the plan starts. A plan with a minimum commitment adds its shortfall.
  A plan change within a period is one plan ending and another starting.
- **Add-ons**: a licensed or one-time price held on its own, with a quantity.
- **Metered prices** rate usage: those listed in ``prices`` (empty: every metered
  price in the account's currency).
- **Coupons**, in the order listed: ``once`` applies to the period that holds the
  redemption instant; ``repeating`` to every period that ends after the redemption and
  at most ``duration_in_months`` months (local calendar) after it (redeemed on
  10 March for 3 months: the invoices of March, April and May); ``forever`` to every
  period that ends after it.
- **Taxes**: every tax rate of the tariff whose ``jurisdiction`` is the account's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from collector.billing.periods import MONTHLY_UTC, Cycle, Period
from collector.rating.model import Price, RatingError, Tariff
from collector.rating.proration import add_months
from collector.routing import FOREVER
from common.errors import ConfigError
from common.records import from_us, to_us

# Licensed price intervals a cycle can prorate: calendar months need whole months.
_INTERVALS_BY_CYCLE = {
    "monthly": {"hour", "day", "week", "month", "year"},
    "hourly": {"hour"},
    "custom_days": {"hour", "day", "week"},
    "custom_hours": {"hour"},
}


@dataclass(frozen=True, slots=True)
class Subscription:
    """A plan (``plan``) or an add-on price (``price``) held from ``since_us`` until
    ``until_us`` (exclusive); ``key`` is where it is configured, for messages."""

    key: str
    plan: str | None = None
    price: str | None = None
    quantity: Decimal = Decimal(1)
    since_us: int = 0
    until_us: int = FOREVER

    def active_in(self, period: Period) -> bool:
        return self.since_us < period.end_us and self.until_us > period.start_us

    def covers(self, period: Period) -> bool:
        return self.since_us <= period.start_us and self.until_us >= period.end_us


@dataclass(frozen=True, slots=True)
class CouponRedemption:
    key: str
    coupon: str
    redeemed_us: int


@dataclass(frozen=True, slots=True)
class AccountBilling:
    """Everything billing needs to know about one account."""

    account_id: str
    currency: str
    cycle: Cycle = MONTHLY_UTC
    price_ids: frozenset[str] = frozenset()
    plans: tuple[Subscription, ...] = ()
    addons: tuple[Subscription, ...] = ()
    coupons: tuple[CouponRedemption, ...] = ()
    tax_jurisdiction: str = ""
    tax_id: str = ""
    name: str = ""
    address: tuple[str, ...] = ()


def tax_rates_for(tariff: Tariff, billing: AccountBilling) -> tuple[str, ...]:
    """Ids of the tariff's tax rates in the account's jurisdiction, sorted."""
    if not billing.tax_jurisdiction:
        return ()
    return tuple(
        sorted(
            rate.id
            for rate in tariff.tax_rates.values()
            if rate.jurisdiction == billing.tax_jurisdiction
        )
    )


def coupons_for(tariff: Tariff, billing: AccountBilling, period: Period) -> tuple[str, ...]:
    """The coupons that apply to ``period``, in the order the settings list them."""
    found: list[str] = []
    for redemption in billing.coupons:
        coupon = tariff.coupons.get(redemption.coupon)
        if coupon is None or redemption.coupon in found:
            continue
        redeemed = redemption.redeemed_us
        if coupon.duration == "once":
            applies = period.contains(redeemed)
        elif coupon.duration == "repeating":
            local = from_us(redeemed).astimezone(billing.cycle.zone)
            until = to_us(add_months(local, coupon.duration_in_months or 0))
            applies = redeemed < period.end_us <= until
        else:
            applies = period.end_us > redeemed
        if applies:
            found.append(redemption.coupon)
    return tuple(found)


def metered_prices(tariff: Tariff, billing: AccountBilling, at: datetime) -> list[Price]:
    """The metered prices that rate the account's usage, each in its version at ``at``
    (the start of the period), sorted by id."""
    found: list[Price] = []
    for price_id in sorted(tariff.versions):
        if billing.price_ids and price_id not in billing.price_ids:
            continue
        try:
            price = tariff.price(price_id, at)
        except RatingError:
            price = tariff.versions[price_id][0]
        if price.is_metered and price.currency == billing.currency:
            found.append(price)
    return found


def _cycle_kind(cycle: Cycle) -> str:
    if cycle.kind == "custom":
        return "custom_days" if cycle.interval_days else "custom_hours"
    return cycle.kind


def check_settings(tariff: Tariff, billing: AccountBilling, source: str) -> list[ConfigError]:
    """Every way the settings contradict the tariff, each naming its key."""
    errors: list[ConfigError] = []
    key = f"accounts.{billing.account_id}"

    def fail(path: str, expected: str) -> None:
        errors.append(ConfigError(source, path, expected))

    allowed = _INTERVALS_BY_CYCLE[_cycle_kind(billing.cycle)]

    def check_price(path: str, price_id: str, *, metered_ok: bool) -> None:
        versions = tariff.versions.get(price_id)
        if versions is None:
            fail(path, f"no price {price_id!r} in the tariff")
            return
        price = versions[0]
        if price.currency != billing.currency:
            fail(path, f"price {price_id!r} is in {price.currency}, the account in "
                 f"{billing.currency}; meterd does not convert currencies")
        if price.is_metered and not metered_ok:
            fail(path, f"price {price_id!r} is metered: it rates usage and is listed in "
                 "prices, not held as an add-on")
        if price.usage_type == "licensed" and price.recurring is not None:
            interval = price.recurring.interval
            if interval not in allowed:
                fail(path, f"price {price_id!r} is charged per {interval}, which a "
                     f"{billing.cycle.describe()} cycle cannot prorate; use prices per "
                     f"{' or '.join(sorted(allowed))}")

    for index, price_id in enumerate(sorted(billing.price_ids)):
        path = f"{key}.prices[{index}]"
        if price_id not in tariff.versions:
            fail(path, f"no price {price_id!r} in the tariff")
        elif not tariff.versions[price_id][0].is_metered:
            fail(path, f"price {price_id!r} is not metered: hold it as an add-on")
    for sub in billing.plans:
        plan = tariff.plans.get(sub.plan or "")
        if plan is None:
            fail(f"{sub.key}.plan", f"no plan {sub.plan!r} in the tariff")
            continue
        if plan.currency != billing.currency:
            fail(f"{sub.key}.plan", f"plan {plan.id!r} is in {plan.currency}, the account in "
                 f"{billing.currency}")
            continue
        for price_id in plan.prices:
            check_price(f"{sub.key}.plan", price_id, metered_ok=True)
    for sub in billing.addons:
        check_price(f"{sub.key}.price", sub.price or "", metered_ok=False)
    for redemption in billing.coupons:
        coupon = tariff.coupons.get(redemption.coupon)
        if coupon is None:
            fail(f"{redemption.key}.coupon", f"no coupon {redemption.coupon!r} in the tariff")
        elif coupon.currency is not None and coupon.currency != billing.currency:
            fail(f"{redemption.key}.coupon", f"coupon {coupon.id!r} takes {coupon.currency} "
                 f"off, the account is billed in {billing.currency}")
    if billing.tax_jurisdiction:
        rates = [tariff.tax_rates[r] for r in tax_rates_for(tariff, billing)]
        if not rates:
            fail(f"{key}.tax_jurisdiction", f"no tax rate of the tariff has jurisdiction "
                 f"{billing.tax_jurisdiction!r}")
        elif len({rate.inclusive for rate in rates}) > 1:
            fail(f"{key}.tax_jurisdiction", "the jurisdiction has both inclusive and "
                 "exclusive tax rates; prices either contain tax or do not")
    errors += _minimum_overlaps(tariff, billing, source)
    return errors


def _minimum_overlaps(tariff: Tariff, billing: AccountBilling, source: str) -> list[ConfigError]:
    """Two plans with minimum commitments held at once may not share a price: a line
    can count toward one minimum only."""
    errors: list[ConfigError] = []
    committed = [
        (sub, tariff.plans[sub.plan])
        for sub in billing.plans
        if sub.plan is not None
        and sub.plan in tariff.plans
        and tariff.plans[sub.plan].minimum_amount is not None
    ]
    for index, (sub, plan) in enumerate(committed):
        for other, other_plan in committed[:index]:
            overlap = sub.since_us < other.until_us and other.since_us < sub.until_us
            shared = set(plan.prices) & set(other_plan.prices)
            if overlap and shared and plan.id != other_plan.id:
                errors.append(
                    ConfigError(
                        source, f"{sub.key}.plan",
                        f"plan {plan.id!r} shares {sorted(shared)[0]!r} with plan "
                        f"{other_plan.id!r} held at the same time ({other.key}); a line can "
                        "count toward one minimum commitment only",
                    )
                )
    return errors
