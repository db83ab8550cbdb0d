"""Billing periods in an account's time zone: true lengths across daylight-saving changes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from collector.billing.periods import HOUR_US, Cycle, period_from_text
from collector.config import load_collector_config
from common.errors import ConfigError, ValidationError
from common.records import to_us
from tests.billing.scenario import at

BERLIN = Cycle("monthly", "Europe/Berlin")


def test_a_berlin_month_with_a_clock_change_has_its_true_length() -> None:
    march = BERLIN.period_of(at("2026-03-15T12:00:00+01:00"))
    assert march.label == "2026-03-01T00:00:00+01:00/2026-04-01T00:00:00+02:00"
    assert march.hours == 743
    october = BERLIN.period_of(at("2026-10-15T12:00:00+02:00"))
    assert october.hours == 745
    assert BERLIN.after(march).hours == 720


def test_the_local_calendar_decides_not_utc() -> None:
    # 00:10 on 1 April in Berlin is 22:10 on 31 March in UTC.
    assert BERLIN.period_of(at("2026-04-01T00:10:00+02:00")).start.isoformat() == (
        "2026-04-01T00:00:00+02:00"
    )
    assert Cycle().period_of(at("2026-04-01T00:10:00+02:00")).start.isoformat() == (
        "2026-03-01T00:00:00+00:00"
    )


def test_an_anchor_day_starts_each_period() -> None:
    newyork = Cycle("monthly", "America/New_York", anchor_day=15)
    period = newyork.period_of(at("2026-03-01T00:00:00-05:00"))
    assert period.label == "2026-02-15T00:00:00-05:00/2026-03-15T00:00:00-04:00"
    assert period.hours == 28 * 24 - 1
    assert newyork.period_of(at("2026-03-15T00:00:00-04:00")).start_us == period.end_us


def test_the_repeated_hour_of_autumn_is_two_hourly_periods() -> None:
    hourly = Cycle("hourly", "Europe/Berlin")
    first = hourly.period_of(at("2026-10-25T02:30:00+02:00"))
    second = hourly.after(first)
    assert first.label == "2026-10-25T02:00:00+02:00/2026-10-25T02:00:00+01:00"
    assert second.label == "2026-10-25T02:00:00+01:00/2026-10-25T03:00:00+01:00"
    assert first.hours == second.hours == 1


def test_a_custom_week_counts_calendar_days() -> None:
    week = Cycle("custom", "Europe/Berlin", interval_days=7,
                 anchor_us=at("2026-03-02T00:00:00+01:00"))
    spanning = week.period_of(at("2026-03-29T12:00:00+02:00"))
    assert spanning.label == "2026-03-23T00:00:00+01:00/2026-03-30T00:00:00+02:00"
    assert spanning.hours == 167
    before_anchor = week.period_of(at("2026-02-25T00:00:00+01:00"))
    assert before_anchor.start.isoformat() == "2026-02-23T00:00:00+01:00"


def test_a_period_is_found_from_a_local_date() -> None:
    assert period_from_text(BERLIN, "2026-03-31").start.isoformat() == "2026-03-01T00:00:00+01:00"
    with pytest.raises(ValidationError, match="RFC 3339"):
        period_from_text(BERLIN, "March")


@pytest.mark.parametrize(
    ("settings", "key", "expected"),
    [
        ('time_zone = "Europe/Berln"', "accounts.a.time_zone", "unknown time zone"),
        ("anchor_day = 31", "accounts.a.anchor_day", "1..28"),
        ('cycle = "weekly"', "accounts.a.cycle", '"monthly", "hourly" or "custom"'),
        ('cycle = "custom"\nanchor = "2026-03-02T00:00:00Z"', "accounts.a.interval", "required"),
        ('cycle = "custom"\ninterval = "7w"\nanchor = "2026-03-02T00:00:00Z"',
         "accounts.a.interval", '"7d"'),
        ('interval = "7d"', "accounts.a.interval", 'only with cycle = "custom"'),
        ('[[accounts.a.plans]]\nplan = "p"\nsince = "2026-03-02"', "accounts.a.plans[0].since",
         "UTC offset"),
        ('[[accounts.a.coupons]]\ncoupon = "c"', "accounts.a.coupons[0].redeemed", "required"),
    ],
)
def test_a_bad_billing_setting_names_file_key_and_expectation(
    tmp_path: object, settings: str, key: str, expected: str
) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    path = tmp_path / "collector.toml"
    path.write_text(f'[accounts.a]\ncurrency = "eur"\n{settings}\n')
    with pytest.raises(ConfigError) as info:
        load_collector_config(path)
    assert info.value.source == str(path)
    assert info.value.key == key
    assert expected in info.value.expected


ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe",
         "America/Santiago", "Pacific/Chatham"]
EPOCH_2020 = to_us(datetime(2020, 1, 1, tzinfo=UTC))


@st.composite
def cycles(draw: st.DrawFn) -> Cycle:
    zone = draw(st.sampled_from(ZONES))
    kind = draw(st.sampled_from(["monthly", "hourly", "custom_days", "custom_hours"]))
    if kind == "monthly":
        return Cycle("monthly", zone, anchor_day=draw(st.integers(1, 28)))
    if kind == "hourly":
        return Cycle("hourly", zone)
    anchor = EPOCH_2020 + draw(st.integers(0, 5 * 365 * 24)) * HOUR_US
    if kind == "custom_days":
        return Cycle("custom", zone, interval_days=draw(st.integers(1, 40)), anchor_us=anchor)
    return Cycle("custom", zone, interval_hours=draw(st.integers(1, 200)), anchor_us=anchor)


@given(cycles(), st.integers(EPOCH_2020, EPOCH_2020 + 10 * 365 * 24 * HOUR_US))
def test_periods_tile_time(cycle: Cycle, instant: int) -> None:
    period = cycle.period_of(instant)
    assert period.start_us <= instant < period.end_us
    following = cycle.after(period)
    assert following.start_us == period.end_us
    assert cycle.before(following) == period
    assert cycle.period_of(period.start_us) == period
    assert cycle.period_of(period.end_us - 1) == period
