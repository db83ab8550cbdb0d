"""Hand-computed amounts for every pricing field: each expected value is worked out
in the comment or the table beside it."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest

from collector.rating.engine import (
    aggregate,
    billing_quantity,
    increment,
    percentile_95,
    rated_amount,
    to_billing_units,
    usage_amount,
)
from collector.rating.model import Price, RatingError
from collector.rating.quote import money_text
from tests.strategies import price_from

D = Decimal
MONTHLY_SUM = {"interval": "month", "usage_type": "metered", "aggregate_usage": "sum"}


def metered(**fields: object) -> Price:
    document: dict[str, object] = {
        "id": "p",
        "currency": "eur",
        "metric": "net.tx_bytes",
        "unit": "GB",
        "recurring": dict(MONTHLY_SUM),
    }
    document.update(fields)
    return price_from(document)


def tiered(mode: str, tiers: list[dict[str, object]], **fields: object) -> Price:
    return metered(billing_scheme="tiered", tiers_mode=mode, tiers=tiers, **fields)


EGRESS_TIERS: list[dict[str, object]] = [
    {"up_to": 1000, "unit_amount_decimal": "0"},
    {"up_to": 5000, "unit_amount_decimal": "0.01"},
    {"up_to": "inf", "unit_amount_decimal": "0.005"},
]


def test_per_unit_multiplies_quantity_by_unit_amount() -> None:
    price = metered(unit_amount_decimal="0.01")
    assert usage_amount(price, D("1234.5")) == D("12.345")
    assert rated_amount(price, D("1234.5")) == D("12.34")  # half-even: 4 is even


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [
        (D("0"), D("0.00")),
        (D("1000"), D("0.00")),  # exactly at up_to: still the free tier
        (D("1000.5"), D("0.00")),  # 0.5 * 0.01 = 0.005, half-even to 0.00
        (D("1001.5"), D("0.02")),  # 1.5 * 0.01 = 0.015, half-even to 0.02
        (D("1234.5"), D("2.34")),  # 234.5 * 0.01 = 2.345, half-even to 2.34
        (D("5000"), D("40.00")),  # 4000 * 0.01, exactly at the second up_to
        (D("5001"), D("40.00")),  # 40 + 1 * 0.005 = 40.005, half-even to 40.00
        (D("5003"), D("40.02")),  # 40 + 3 * 0.005 = 40.015, half-even to 40.02
        (D("6000"), D("45.00")),  # 40 + 1000 * 0.005
    ],
)
def test_graduated_tiers_price_each_part_in_its_own_tier(
    quantity: Decimal, expected: Decimal
) -> None:
    assert rated_amount(tiered("graduated", EGRESS_TIERS), quantity) == expected


FLAT_TIERS: list[dict[str, object]] = [
    {"up_to": 10, "unit_amount_decimal": "1", "flat_amount_decimal": "5"},
    {"up_to": "inf", "unit_amount_decimal": "0.5", "flat_amount_decimal": "3"},
]


@pytest.mark.parametrize(
    ("quantity", "graduated", "volume"),
    [
        (D("0"), D("0"), D("0")),  # zero quantity costs zero in both modes
        (D("1"), D("6"), D("6")),  # 1 * 1 + 5 in both
        (D("10"), D("15"), D("15")),  # at up_to: 10 * 1 + 5 in both
        (D("11"), D("18.5"), D("8.5")),  # 15 + (1 * 0.5 + 3) | 11 * 0.5 + 3
        (D("25"), D("25.5"), D("15.5")),  # 15 + (15 * 0.5 + 3) | 25 * 0.5 + 3
    ],
)
def test_flat_amounts_and_volume_versus_graduated_on_the_same_usage(
    quantity: Decimal, graduated: Decimal, volume: Decimal
) -> None:
    assert usage_amount(tiered("graduated", FLAT_TIERS), quantity) == graduated
    assert usage_amount(tiered("volume", FLAT_TIERS), quantity) == volume


def test_a_volume_price_can_fall_when_usage_crosses_into_a_cheaper_tier() -> None:
    price = tiered("volume", FLAT_TIERS)
    assert usage_amount(price, D("10")) == D("15")
    assert usage_amount(price, D("11")) == D("8.5")
    # The collector then posts a negative increment, and the period still sums right.
    assert increment(price, D("10"), D("11")) == D("-6.50")


@pytest.mark.parametrize(
    ("rounding", "quantity", "packages"),
    [
        ("up", D("0"), 0),
        ("up", D("1"), 1),
        ("up", D("10000"), 1),  # exactly one package
        ("up", D("10001"), 2),  # a started package counts
        ("down", D("19999"), 1),
        ("down", D("20000"), 2),
        ("down", D("9999.9"), 0),
    ],
)
def test_transform_quantity_bills_whole_packages(
    rounding: str, quantity: Decimal, packages: int
) -> None:
    price = metered(
        unit="request",
        metric="s3.requests",
        unit_amount_decimal="0.40",
        transform_quantity={"divide_by": 10000, "round": rounding},
    )
    assert usage_amount(price, quantity) == D("0.40") * packages


@pytest.mark.parametrize(
    ("unit", "metric", "base", "expected"),
    [
        ("GB", "net.tx_bytes", D("1234500000000"), D("1234.5")),  # / 10^9
        ("GiB", "net.tx_bytes", D(2**30 * 3), D("3")),  # / 2^30
        ("GiB", "net.tx_bytes", D("1000000000"), D("0.931322574615478515625")),  # exact
        ("MB", "net.tx_bytes", D("1500000"), D("1.5")),
        ("hour", "vm.running_seconds", D("5400"), D("1.5")),
        ("minute", "vm.running_seconds", D("90"), D("1.5")),
        ("GiB-hour", "storage.used_byte_seconds", D(2**30 * 7200), D("2")),
        ("GB-day", "storage.used_byte_seconds", D(10**9 * 43200), D("0.5")),
        ("request", "s3.requests", D("17"), D("17")),
    ],
)
def test_base_units_convert_exactly_to_billing_units(
    unit: str, metric: str, base: Decimal, expected: Decimal
) -> None:
    price = metered(unit=unit, metric=metric, unit_amount_decimal="1")
    assert to_billing_units(price, base) == expected


def test_a_rate_unit_needs_the_sample_window() -> None:
    price = metered(
        unit="Mbit/s",
        unit_amount_decimal="0.40",
        recurring={"interval": "month", "usage_type": "metered", "aggregate_usage": "p95"},
    )
    # 3.75 GB in 300 s is 12.5 MB/s, which is 100 Mbit/s
    assert to_billing_units(price, D("3750000000"), window_seconds=D(300)) == D("100")
    with pytest.raises(RatingError, match="window_seconds"):
        to_billing_units(price, D("3750000000"))
    with pytest.raises(RatingError, match="not a rate"):
        to_billing_units(metered(unit_amount_decimal="1"), D(1), window_seconds=D(300))


def test_seconds_to_hours_rates_a_half_cent_tie_exactly_from_the_base_quantity() -> None:
    # 60 s at 0.30 per hour is exactly 0.005: half-even gives 0.00. Rating from the
    # exact billing quantity keeps it a tie; 1/60 hour has no finite decimal form.
    price = metered(unit="hour", metric="vm.running_seconds", unit_amount_decimal="0.30")
    quantity = billing_quantity(price, D(60))
    assert quantity == Fraction(1, 60)
    assert usage_amount(price, quantity) == D("0.005")
    assert rated_amount(price, quantity) == D("0.00")


def test_period_cap_limits_a_metered_amount() -> None:
    price = metered(unit_amount_decimal="0.01", period_cap_decimal="5.00")
    assert rated_amount(price, D("400")) == D("4.00")
    assert rated_amount(price, D("500")) == D("5.00")
    assert rated_amount(price, D("600")) == D("5.00")


@pytest.mark.parametrize(
    ("rounding", "expected"),
    [("half_even", D("0.00")), ("half_up", D("0.01")), ("up", D("0.01")), ("down", D("0.00"))],
)
def test_a_price_may_name_its_rounding_mode(rounding: str, expected: Decimal) -> None:
    price = metered(unit_amount_decimal="0.001", rounding=rounding)
    assert rated_amount(price, D("5")) == expected  # 0.005


def test_p95_discards_the_highest_five_percent_rounded_down() -> None:
    assert percentile_95([D(n) for n in range(100, 0, -1)]) == D(95)  # 5 of 100 discarded
    assert percentile_95([D(n) for n in range(1, 20)]) == D(19)  # 19 * 5% = 0.95: none
    twenty = [D(n) for n in (5, 300, 7, 250, *range(10, 26))]
    assert percentile_95(twenty) == D(250)  # 20 * 5% = 1: only 300 is discarded
    forty = [D(n) for n in range(1, 41)]
    assert percentile_95(forty) == D(38)  # 2 discarded
    assert percentile_95([]) == D(0)


def test_aggregate_usage_reduces_samples_as_the_price_says() -> None:
    samples = [D("3"), D("9.5"), D("4")]

    def with_aggregate(name: str) -> Price:
        recurring = {"interval": "month", "usage_type": "metered", "aggregate_usage": name}
        return metered(unit_amount_decimal="1", recurring=recurring)

    assert aggregate(with_aggregate("sum"), samples) == D("16.5")
    assert aggregate(with_aggregate("max"), samples) == D("9.5")
    assert aggregate(with_aggregate("last_during_period"), samples) == D("4")
    assert aggregate(with_aggregate("p95"), samples) == D("9.5")


@pytest.mark.parametrize(
    ("currency", "unit_amount", "quantity", "text"),
    [
        ("jpy", "1.5", "3", "4"),  # 4.5 yen, half-even to 4
        ("jpy", "1.5", "5", "8"),  # 7.5 yen, half-even to 8
        ("bhd", "0.0005", "3", "0.002"),  # 0.0015 dinar, half-even to 0.002
        ("bhd", "0.0005", "5", "0.002"),  # 0.0025 dinar, half-even to 0.002
        ("eur", "0.005", "3", "0.02"),  # 0.015 euro, half-even to 0.02
    ],
)
def test_amounts_round_to_the_minor_unit_of_their_currency(
    currency: str, unit_amount: str, quantity: str, text: str
) -> None:
    price = metered(currency=currency, unit_amount_decimal=unit_amount)
    amount = rated_amount(price, D(quantity))
    assert money_text(amount, currency) == text


def test_a_negative_quantity_is_refused() -> None:
    with pytest.raises(RatingError, match="negative"):
        usage_amount(metered(unit_amount_decimal="1"), D("-1"))
