"""Licensed prices over a billing period: proration by real seconds, hourly billing,
started intervals and caps."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from zoneinfo import ZoneInfo

import pytest

from collector.rating.engine import licensed_amount, round_amount
from collector.rating.model import Price, RatingError
from collector.rating.proration import Window, billed_intervals, calendar_length
from tests.strategies import price_from

D = Decimal
BERLIN = ZoneInfo("Europe/Berlin")


def berlin(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=BERLIN)  # type: ignore[misc]


def licensed(unit_amount: str, interval: str = "month", **fields: object) -> Price:
    recurring: dict[str, object] = {"interval": interval, "usage_type": "licensed"}
    recurring.update(fields.pop("recurring", {}))  # type: ignore[arg-type]
    return price_from(
        {"id": "p", "currency": "eur", "unit_amount_decimal": unit_amount,
         "recurring": recurring, **fields}
    )  # fmt: skip


def charge(
    price: Price, period: Window, active: Window | None = None, quantity: str = "1"
) -> Decimal:
    return round_amount(price, licensed_amount(price, D(quantity), period, active))


MARCH = Window(berlin(2026, 3, 1), berlin(2026, 4, 1))  # 743 hours: DST starts 29 March
OCTOBER = Window(berlin(2026, 10, 1), berlin(2026, 11, 1))  # 745 hours: DST ends 25 October


def test_a_dst_month_has_its_true_length() -> None:
    # Both ends share one zone object, so Python's own subtraction is by wall clock.
    assert MARCH.end - MARCH.start == timedelta(days=31)
    assert MARCH.seconds == 743 * 3600
    assert OCTOBER.seconds == 745 * 3600


def test_proration_across_the_spring_dst_change_uses_real_seconds() -> None:
    # Active from 16 March: 16 days less the lost hour is 383 hours of 743.
    # 100.00 * 383 / 743 = 51.547..., so 51.55 (by calendar days it would be 51.61).
    price = licensed("100.00")
    active = Window(berlin(2026, 3, 16), berlin(2026, 4, 1))
    assert billed_intervals(price, MARCH, active) == Fraction(383, 743)
    assert charge(price, MARCH, active) == D("51.55")


def test_proration_across_the_autumn_dst_change_uses_real_seconds() -> None:
    # Active until 16 October: 15 days, 360 hours of 745.
    # 100.00 * 360 / 745 = 48.322..., so 48.32 (by calendar days it would be 48.39).
    price = licensed("100.00")
    active = Window(berlin(2026, 10, 1), berlin(2026, 10, 16))
    assert billed_intervals(price, OCTOBER, active) == Fraction(360, 745)
    assert charge(price, OCTOBER, active) == D("48.32")


def test_a_whole_period_charges_the_whole_price_and_quantity_multiplies() -> None:
    price = licensed("12.00")
    assert charge(price, MARCH) == D("12.00")
    assert charge(price, MARCH, quantity="3") == D("36.00")


def test_an_active_window_is_clipped_to_the_period() -> None:
    price = licensed("100.00")
    before_and_into = Window(berlin(2026, 2, 1), berlin(2026, 3, 16))
    assert billed_intervals(price, MARCH, before_and_into) == Fraction(360, 743)
    outside = Window(berlin(2026, 5, 1), berlin(2026, 5, 2))
    assert charge(price, MARCH, outside) == D("0.00")


def test_hourly_per_started_hour_rounds_the_active_time_up() -> None:
    price = licensed("0.0200", "hour", recurring={"billed_per": "started_interval"})
    period = Window(berlin(2026, 11, 1), berlin(2026, 12, 1))
    start = berlin(2026, 11, 3, 10, 15)
    for duration, hours in [
        (timedelta(hours=46, minutes=45), 47),
        (timedelta(hours=47), 47),
        (timedelta(seconds=1), 1),
    ]:
        active = Window(start, start + duration)
        assert billed_intervals(price, period, active) == hours
    active = Window(start, start + timedelta(hours=46, minutes=45))
    assert charge(price, period, active) == D("0.94")  # 47 * 0.02


def test_hourly_per_second_charges_the_exact_fraction() -> None:
    price = licensed("0.0350", "hour")
    period = Window(berlin(2026, 11, 1), berlin(2026, 12, 1))
    active = Window(berlin(2026, 11, 2), berlin(2026, 11, 2, 1, 30))
    assert billed_intervals(price, period, active) == Fraction(3, 2)
    assert licensed_amount(price, D(1), period, active) == D("0.0525")
    assert charge(price, period, active) == D("0.05")  # 0.0525 to two places


def test_hourly_across_the_autumn_dst_change_counts_the_repeated_hour() -> None:
    price = licensed("0.02", "hour")
    day = Window(berlin(2026, 10, 25), berlin(2026, 10, 26))  # 25 real hours
    assert billed_intervals(price, OCTOBER, day) == 25
    assert charge(price, OCTOBER, day) == D("0.50")


def test_the_cap_keeps_an_hourly_server_at_its_monthly_price_per_unit() -> None:
    price = licensed("0.0350", "hour", period_cap_decimal="24.00")
    period = Window(berlin(2026, 11, 1), berlin(2026, 12, 1))  # 720 hours: 25.20 uncapped
    assert charge(price, period) == D("24.00")
    assert charge(price, period, quantity="2") == D("48.00")
    short = Window(berlin(2026, 11, 1), berlin(2026, 11, 11))  # 240 hours: 8.40
    assert charge(price, period, short) == D("8.40")


def test_per_started_month_charges_a_whole_month_for_any_part() -> None:
    price = licensed("89.00", recurring={"billed_per": "started_interval"})
    period = Window(berlin(2026, 11, 1), berlin(2026, 12, 1))
    late = Window(berlin(2026, 11, 30, 23), berlin(2026, 12, 1))
    assert billed_intervals(price, period, late) == 1
    assert charge(price, period, late) == D("89.00")


def test_a_yearly_price_on_a_monthly_period_charges_a_twelfth() -> None:
    price = licensed("120.00", "year")
    assert billed_intervals(price, MARCH) == Fraction(1, 12)
    assert charge(price, MARCH) == D("10.00")


def test_a_quarterly_period_charges_three_months_of_a_monthly_price() -> None:
    price = licensed("10.00")
    quarter = Window(berlin(2026, 1, 1), berlin(2026, 4, 1))
    assert calendar_length(quarter, "month") == 3
    assert charge(price, quarter) == D("30.00")


def test_volume_tiers_on_a_licensed_quantity() -> None:
    price = price_from(
        {
            "id": "k8s",
            "currency": "eur",
            "billing_scheme": "tiered",
            "tiers_mode": "volume",
            "tiers": [
                {"up_to": 5, "unit_amount_decimal": "9.00"},
                {"up_to": "inf", "unit_amount_decimal": "8.00"},
            ],
            "recurring": {"interval": "month", "usage_type": "licensed"},
        }
    )
    assert charge(price, MARCH, quantity="5") == D("45.00")
    assert charge(price, MARCH, quantity="6") == D("48.00")


def test_a_period_that_is_not_whole_months_cannot_prorate_a_monthly_price() -> None:
    ragged = Window(berlin(2026, 3, 1), berlin(2026, 3, 31, 12))
    with pytest.raises(RatingError, match="whole number of months"):
        billed_intervals(licensed("10.00"), ragged)

