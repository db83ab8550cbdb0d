"""The validated tariff: prices and their versions, plans, tax rates, coupons.

These are frozen values. :mod:`collector.rating.tariff` builds them from a file and
reports every problem with its key path; the checks in ``__post_init__`` keep a value
that breaks a rule from being constructed by any other route.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from types import MappingProxyType

from collector.rating.units import UNITS, Unit
from common.errors import ValidationError
from common.money import ROUNDING_MODES, currency_code

INTERVALS = ("hour", "day", "week", "month", "year")
USAGE_TYPES = ("licensed", "metered")
AGGREGATE_USAGE = ("sum", "max", "last_during_period", "p95")
BILLED_PER = ("second", "started_interval")
BILLING_SCHEMES = ("per_unit", "tiered")
TIERS_MODES = ("graduated", "volume")
TRANSFORM_ROUNDING = ("up", "down")


class RatingError(ValidationError):
    """A request the tariff cannot answer: unknown price, none in force, bad input."""


@dataclass(frozen=True, slots=True)
class Tier:
    """One tier; ``up_to`` is inclusive and ``None`` stands for ``"inf"``."""

    up_to: Decimal | None
    unit_amount: Decimal = Decimal(0)
    flat_amount: Decimal = Decimal(0)


@dataclass(frozen=True, slots=True)
class TransformQuantity:
    """Package pricing: bill ``quantity / divide_by`` rounded ``up`` or ``down``."""

    divide_by: int
    round: str

    def __post_init__(self) -> None:
        if self.divide_by < 1 or self.round not in TRANSFORM_ROUNDING:
            raise ValidationError("transform_quantity needs divide_by >= 1 and round up|down")


@dataclass(frozen=True, slots=True)
class Recurring:
    """How often a price recurs and how its quantity is found."""

    interval: str
    interval_count: int = 1
    usage_type: str = "licensed"
    aggregate_usage: str | None = None
    billed_per: str = "second"

    def __post_init__(self) -> None:
        if self.interval not in INTERVALS or self.interval_count < 1:
            raise ValidationError(f"bad recurring interval {self.interval_count} {self.interval}")
        if self.usage_type not in USAGE_TYPES:
            raise ValidationError(f"bad usage_type {self.usage_type!r}")
        if (self.usage_type == "metered") != (self.aggregate_usage in AGGREGATE_USAGE):
            raise ValidationError("aggregate_usage is required for metered prices only")
        if self.billed_per not in BILLED_PER:
            raise ValidationError(f"bad billed_per {self.billed_per!r}")


@dataclass(frozen=True, slots=True)
class Price:
    """One version of a price. Several versions share an ``id``; ``effective_from``
    (an aware instant, or ``None`` for "always") says when each takes effect."""

    id: str
    currency: str
    billing_scheme: str = "per_unit"
    unit_amount: Decimal | None = None
    tiers_mode: str | None = None
    tiers: tuple[Tier, ...] = ()
    transform_quantity: TransformQuantity | None = None
    recurring: Recurring | None = None
    metric: str | None = None
    unit: str | None = None
    product: str | None = None
    nickname: str | None = None
    effective_from: datetime | None = None
    period_cap: Decimal | None = None
    rounding: str = "half_even"
    metadata: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "currency", currency_code(self.currency))
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))
        problem = _price_problem(self)
        if problem:
            raise ValidationError(f"price {self.id!r}: {problem}")

    @property
    def usage_type(self) -> str:
        """``licensed``, ``metered`` or ``one_time`` (no ``recurring``)."""
        return self.recurring.usage_type if self.recurring else "one_time"

    @property
    def is_metered(self) -> bool:
        return self.usage_type == "metered"

    @property
    def aggregate_usage(self) -> str | None:
        return self.recurring.aggregate_usage if self.recurring else None

    @property
    def billing_unit(self) -> Unit | None:
        return UNITS[self.unit] if self.unit else None

    @property
    def base_unit(self) -> str | None:
        """The record unit (``bytes``, ``seconds`` ...) the price's metric must carry."""
        return UNITS[self.unit].base if self.unit else None

    @property
    def rounding_mode(self) -> str:
        """The :mod:`decimal` rounding constant for this price's lines."""
        return ROUNDING_MODES[self.rounding]


def _price_problem(price: Price) -> str | None:
    if price.billing_scheme == "per_unit":
        if price.unit_amount is None or price.tiers or price.tiers_mode:
            return "a per_unit price has unit_amount_decimal and no tiers"
    elif price.billing_scheme == "tiered":
        if price.unit_amount is not None or price.tiers_mode not in TIERS_MODES:
            return "a tiered price has tiers_mode and no unit_amount_decimal"
        if price.transform_quantity is not None:
            return "transform_quantity applies to per_unit prices only"
        if not price.tiers or price.tiers[-1].up_to is not None:
            return 'the last tier must have up_to = "inf"'
        bounds = [tier.up_to for tier in price.tiers[:-1]]
        if any(bound is None for bound in bounds):
            return 'only the last tier may have up_to = "inf"'
        pairs = itertools.pairwise(bounds)
        if any(b <= a for a, b in pairs if a is not None and b is not None):
            return "tiers must ascend"
    else:
        return f"unknown billing_scheme {price.billing_scheme!r}"
    amounts = [price.unit_amount, price.period_cap]
    amounts += [a for tier in price.tiers for a in (tier.unit_amount, tier.flat_amount)]
    if any(a is not None and a < 0 for a in amounts):
        return "amounts must not be negative"
    if price.is_metered != (price.metric is not None and price.unit in UNITS):
        return "a metered price, and only a metered price, has a metric and a known unit"
    if price.rounding not in ROUNDING_MODES:
        return f"unknown rounding {price.rounding!r}"
    if price.effective_from is not None and price.effective_from.utcoffset() is None:
        return "effective_from must carry a UTC offset"
    return None


@dataclass(frozen=True, slots=True)
class Plan:
    """Prices sold together, with an optional minimum amount per billing period."""

    id: str
    currency: str
    prices: tuple[str, ...]
    name: str | None = None
    description: str | None = None
    minimum_amount: Decimal | None = None
    metadata: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "currency", currency_code(self.currency))
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))
        if not self.prices:
            raise ValidationError(f"plan {self.id!r} has no prices")
        if self.minimum_amount is not None and self.minimum_amount < 0:
            raise ValidationError(f"plan {self.id!r}: minimum must not be negative")


@dataclass(frozen=True, slots=True)
class TaxRate:
    """A tax rate in percent; ``inclusive`` means prices already contain it."""

    id: str
    percentage: Decimal
    inclusive: bool = False
    display_name: str | None = None
    description: str | None = None
    jurisdiction: str | None = None
    country: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))
        if not Decimal(0) <= self.percentage <= Decimal(100):
            raise ValidationError(f"tax rate {self.id!r}: percentage must be within 0..100")


@dataclass(frozen=True, slots=True)
class Coupon:
    """A discount on the subtotal: ``percent_off``, or ``amount_off`` in ``currency``."""

    id: str
    percent_off: Decimal | None = None
    amount_off: Decimal | None = None
    currency: str | None = None
    name: str | None = None
    duration: str = "forever"
    duration_in_months: int | None = None
    metadata: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))
        if self.currency is not None:
            object.__setattr__(self, "currency", currency_code(self.currency))
        if (self.percent_off is None) == (self.amount_off is None):
            raise ValidationError(f"coupon {self.id!r}: give percent_off or amount_off")
        if self.percent_off is not None and not Decimal(0) < self.percent_off <= Decimal(100):
            raise ValidationError(f"coupon {self.id!r}: percent_off must be within (0, 100]")
        if self.amount_off is not None and (self.amount_off <= 0 or self.currency is None):
            raise ValidationError(f"coupon {self.id!r}: amount_off needs a currency and > 0")
        if (self.duration == "repeating") != (self.duration_in_months is not None):
            raise ValidationError(f"coupon {self.id!r}: duration_in_months only if repeating")


@dataclass(frozen=True)
class Tariff:
    """A whole price book. ``versions`` maps a price id to its versions, oldest first."""

    versions: Mapping[str, tuple[Price, ...]]
    plans: Mapping[str, Plan] = field(default_factory=dict)
    tax_rates: Mapping[str, TaxRate] = field(default_factory=dict)
    coupons: Mapping[str, Coupon] = field(default_factory=dict)
    name: str | None = None

    def __post_init__(self) -> None:
        versions = {pid: tuple(sorted(vs, key=_effective_key)) for pid, vs in self.versions.items()}
        for pid, vs in versions.items():
            if not vs or any(v.id != pid for v in vs):
                raise ValidationError(f"price versions filed under {pid!r} must carry that id")
            starts = [_effective_key(v) for v in vs]
            if len(set(starts)) != len(starts):
                raise ValidationError(f"price {pid!r} has two versions with one effective_from")
        object.__setattr__(self, "versions", MappingProxyType(versions))
        object.__setattr__(self, "plans", MappingProxyType(dict(self.plans)))
        object.__setattr__(self, "tax_rates", MappingProxyType(dict(self.tax_rates)))
        object.__setattr__(self, "coupons", MappingProxyType(dict(self.coupons)))

    def price(self, price_id: str, at: datetime) -> Price:
        """The version of ``price_id`` in force at the aware instant ``at``."""
        if at.utcoffset() is None:
            raise RatingError("the instant to look a price up at must carry a UTC offset")
        versions = self.versions.get(price_id)
        if versions is None:
            raise RatingError(f"no price {price_id!r} in the tariff")
        moment = at.astimezone(UTC)
        in_force = [
            v for v in versions if v.effective_from is None or v.effective_from <= moment
        ]
        if not in_force:
            raise RatingError(f"price {price_id!r} has no version in force at {at.isoformat()}")
        return in_force[-1]

    def metered_prices(self, metric: str, at: datetime) -> list[Price]:
        """Metered prices fed by ``metric``, each in the version in force at ``at``."""
        found: list[Price] = []
        for price_id in sorted(self.versions):
            try:
                price = self.price(price_id, at)
            except RatingError:
                continue
            if price.is_metered and price.metric == metric:
                found.append(price)
        return found

    def plans_of(self, price_id: str) -> list[Plan]:
        """The plans that contain ``price_id``."""
        return [plan for plan in self.plans.values() if price_id in plan.prices]


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _effective_key(price: Price) -> tuple[int, datetime]:
    # ``None`` (always in force) sorts before every instant
    if price.effective_from is None:
        return (0, _EPOCH)
    return (1, price.effective_from)
