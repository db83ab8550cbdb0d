"""Rating: from a quantity to an amount, exactly.

Amounts are computed as exact rationals and handed out as :class:`~decimal.Decimal`,
unrounded: a value that has a finite decimal expansion comes out exact, any other to
50 significant digits, which cannot move it across a rounding boundary of the minor
unit. Rounding happens once per amount that is shown or posted, with
:func:`round_amount` (half-even to the currency's minor unit unless the price says
otherwise).

Metered usage arrives in pieces. The collector keeps the period's quantity so far and
posts ``increment(price, before, after)``, which is
``round(usage_amount(after)) - round(usage_amount(before))``: the pieces add up to the
rounded amount of the whole period, tiers included, with nothing left over.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from decimal import Decimal
from fractions import Fraction

from collector.rating.model import Price, RatingError
from collector.rating.proration import Window, billed_intervals
from common.money import CONTEXT, round_minor

Quantity = Decimal | Fraction


def to_decimal_exact(value: Fraction) -> Decimal:
    """``value`` as a Decimal: exact when it has a finite expansion within 50 digits."""
    if value.denominator == 1:
        return Decimal(value.numerator)
    return CONTEXT.divide(Decimal(value.numerator), Decimal(value.denominator))


def billing_quantity(
    price: Price, base_quantity: Decimal, *, window_seconds: Decimal | None = None
) -> Fraction:
    """``base_quantity`` (bytes, seconds ...) in ``price``'s billing unit, as a rational.

    A rate unit (``Mbit/s``) needs ``window_seconds``, the length of the sample's window;
    every other unit refuses it.
    """
    unit = price.billing_unit
    if unit is None:
        raise RatingError(f"price {price.id!r} is not metered: it has no billing unit")
    quantity = Fraction(base_quantity)
    if quantity < 0:
        raise RatingError(f"a quantity cannot be negative, got {base_quantity}")
    if unit.rate:
        if window_seconds is None or window_seconds <= 0:
            raise RatingError(f"unit {unit.name} is a rate: give the sample's window_seconds")
        quantity /= Fraction(window_seconds)
    elif window_seconds is not None:
        raise RatingError(f"unit {unit.name} is not a rate: it takes no window_seconds")
    return quantity / unit.per_base


def to_billing_units(
    price: Price, base_quantity: Decimal, *, window_seconds: Decimal | None = None
) -> Decimal:
    """``base_quantity`` in the price's billing unit: bytes to GB is ``/ 10^9`` and to
    GiB ``/ 2^30`` (both exact); seconds to hours is ``/ 3600`` (exact when the result
    has a finite decimal expansion, 50 significant digits otherwise)."""
    return to_decimal_exact(billing_quantity(price, base_quantity, window_seconds=window_seconds))


def percentile_95(samples: Sequence[Decimal]) -> Decimal:
    """Burstable billing: sort the samples, discard the highest 5% (rounded down) and
    return the highest that remains; zero when there are no samples."""
    if not samples:
        return Decimal(0)
    ordered = sorted(samples)
    discard = len(ordered) * 5 // 100
    return ordered[len(ordered) - 1 - discard]


def aggregate(price: Price, samples: Sequence[Decimal]) -> Decimal:
    """The period quantity of a metered price from its samples, in order of time."""
    aggregate_usage = price.aggregate_usage
    if aggregate_usage is None:
        raise RatingError(f"price {price.id!r} is not metered")
    if any(sample < 0 for sample in samples):
        raise RatingError("samples cannot be negative")
    if aggregate_usage == "sum":
        total = Decimal(0)
        for sample in samples:
            total = CONTEXT.add(total, sample)
        return total
    if not samples:
        return Decimal(0)
    if aggregate_usage == "max":
        return max(samples)
    if aggregate_usage == "last_during_period":
        return samples[-1]
    return percentile_95(samples)


def scheme_amount(price: Price, quantity: Quantity) -> Fraction:
    """The exact amount of ``quantity`` under the price's scheme, before any cap.

    Zero quantity costs zero. ``per_unit``: ``quantity * unit_amount``, the quantity first
    divided by ``transform_quantity.divide_by`` and rounded up or down. ``graduated``:
    each tier prices the part of the quantity inside it, ``(previous up_to, up_to]``, and
    adds its flat amount once the quantity enters it. ``volume``: the single tier whose
    range holds the quantity prices all of it, plus that tier's flat amount.
    """
    q = Fraction(quantity)
    if q < 0:
        raise RatingError(f"a quantity cannot be negative, got {quantity}")
    if price.billing_scheme == "per_unit":
        assert price.unit_amount is not None
        transform = price.transform_quantity
        if transform is not None:
            packages = q / transform.divide_by
            q = Fraction(math.ceil(packages) if transform.round == "up" else math.floor(packages))
        return q * Fraction(price.unit_amount)
    if q == 0:
        return Fraction(0)
    if price.tiers_mode == "volume":
        for tier in price.tiers:
            if tier.up_to is None or q <= tier.up_to:
                return q * Fraction(tier.unit_amount) + Fraction(tier.flat_amount)
        raise AssertionError("the last tier is unbounded")
    total = Fraction(0)
    lower = Fraction(0)
    for tier in price.tiers:
        upper = q if tier.up_to is None else min(q, Fraction(tier.up_to))
        total += (upper - lower) * Fraction(tier.unit_amount) + Fraction(tier.flat_amount)
        if tier.up_to is None or q <= tier.up_to:
            break
        lower = Fraction(tier.up_to)
    return total


def usage_amount_exact(price: Price, quantity: Quantity) -> Fraction:
    """:func:`usage_amount` as an exact rational."""
    amount = scheme_amount(price, quantity)
    if price.is_metered and price.period_cap is not None:
        amount = min(amount, Fraction(price.period_cap))
    return amount


def usage_amount(price: Price, quantity: Quantity) -> Decimal:
    """The unrounded amount for a period quantity in billing units.

    For a metered price this is the amount of the whole period's quantity so far:
    tiers, flat amounts and package transform applied, then ``period_cap_decimal``.
    For a licensed or one-time price it is the amount of ``quantity`` for one interval
    (see :func:`licensed_amount` for proration and the per-unit cap).
    """
    return to_decimal_exact(usage_amount_exact(price, quantity))


def round_amount(price: Price, amount: Decimal) -> Decimal:
    """Round ``amount`` once to the minor unit of the price's currency, with the price's
    rounding mode (half-even unless the tariff says otherwise)."""
    return round_minor(amount, price.currency, price.rounding_mode)


def rated_amount(price: Price, quantity: Quantity) -> Decimal:
    """``round_amount(usage_amount(quantity))``: the amount of one line."""
    return round_amount(price, usage_amount(price, quantity))


def increment(price: Price, before: Quantity, after: Quantity) -> Decimal:
    """What to post when the period quantity goes from ``before`` to ``after``:
    ``round(usage_amount(after)) - round(usage_amount(before))``.

    Posted batch by batch, these add up exactly to the rounded amount of the period.
    Negative when the amount falls: a volume price crossing into a cheaper tier, a
    ``last_during_period`` or ``p95`` quantity going down.
    """
    return CONTEXT.subtract(rated_amount(price, after), rated_amount(price, before))


def licensed_amount(
    price: Price, quantity: Quantity, period: Window, active: Window | None = None
) -> Decimal:
    """The unrounded amount of a licensed price for one billing ``period``.

    ``usage_amount(quantity)`` for one interval, times :func:`billed_intervals`; then at
    most ``period_cap_decimal * quantity`` when the price has a cap (the cap is per unit
    of quantity: per server).
    """
    amount = scheme_amount(price, quantity) * billed_intervals(price, period, active)
    if price.period_cap is not None:
        amount = min(amount, Fraction(price.period_cap) * Fraction(quantity))
    return to_decimal_exact(amount)
