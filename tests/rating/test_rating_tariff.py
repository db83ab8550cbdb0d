"""Reading tariffs: every problem is refused with its key path, and TOML and JSON agree."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from collector.rating.document import TariffError
from collector.rating.model import RatingError
from collector.rating.tariff import parse_tariff, parse_tariff_text
from common.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
BERLIN = ZoneInfo("Europe/Berlin")

EGRESS = """
[[prices]]
id = "egress"
product = "Bandwidth"
currency = "eur"
metric = "net.tx_bytes"
unit = "GB"
billing_scheme = "tiered"
tiers_mode = "graduated"
tiers = [
  { up_to = 1000, unit_amount_decimal = "0" },
  { up_to = "inf", unit_amount_decimal = "0.01", flat_amount_decimal = "0" },
]
recurring = { interval = "month", usage_type = "metered", aggregate_usage = "sum" }
"""


def problems(text: str) -> list[str]:
    """Every problem in ``text`` as "key: expected"; fails if it parses."""
    with pytest.raises(TariffError) as caught:
        parse_tariff_text(text, "t.toml")
    return [f"{error.key}: {error.expected}" for error in caught.value.errors]


def only_problem(text: str) -> str:
    found = problems(text)
    assert len(found) == 1, found
    return found[0]


def test_the_issue_example_parses_into_its_fields() -> None:
    tariff = parse_tariff_text(EGRESS, "t.toml")
    price = tariff.price("egress", datetime(2026, 1, 1, tzinfo=BERLIN))
    assert (price.currency, price.metric, price.unit, price.product) == (
        "eur", "net.tx_bytes", "GB", "Bandwidth",
    )  # fmt: skip
    assert price.tiers_mode == "graduated"
    assert [tier.up_to for tier in price.tiers] == [Decimal(1000), None]
    assert price.tiers[1].unit_amount == Decimal("0.01")
    assert price.aggregate_usage == "sum"
    assert price.base_unit == "bytes"


def test_a_toml_float_literal_is_refused_with_its_path() -> None:
    text = EGRESS.replace('unit_amount_decimal = "0.01"', "unit_amount_decimal = 0.01")
    problem = only_problem(text)
    assert problem.startswith("prices[0].tiers[1].unit_amount_decimal: a float literal (0.01)")


def test_a_json_float_is_refused_with_its_path() -> None:
    document = {"prices": [{"id": "a", "currency": "eur", "unit_amount_decimal": "1"}]}
    text = json.dumps(document).replace('"1"', "1.10")
    with pytest.raises(TariffError, match=r"prices\[0\]\.unit_amount_decimal: a float literal"):
        parse_tariff_text(text, "t.json")


def test_a_python_float_in_a_mapping_is_refused() -> None:
    document = {"prices": [{"id": "a", "currency": "eur", "unit_amount_decimal": 0.1}]}
    with pytest.raises(TariffError, match=r"prices\[0\]\.unit_amount_decimal: a float literal"):
        parse_tariff(document, "<memory>")


def test_an_unknown_key_is_refused_with_its_path() -> None:
    text = EGRESS.replace('unit = "GB"', 'unit = "GB"\nunit_amout_decimal = "1"')
    assert only_problem(text).startswith("prices[0].unit_amout_decimal: unknown key")
    nested = EGRESS.replace('aggregate_usage = "sum"', 'aggregate_usage = "sum", intervall = 2')
    assert only_problem(nested).startswith("prices[0].recurring.intervall: unknown key")
    in_tier = EGRESS.replace('{ up_to = 1000,', '{ up_to = 1000, flat = "1",')
    assert only_problem(in_tier).startswith("prices[0].tiers[0].flat: unknown key")


def test_stripes_minor_unit_integer_field_gets_a_hint() -> None:
    text = '[[prices]]\nid = "a"\ncurrency = "eur"\nunit_amount = 1200\n'
    found = problems(text)
    assert any(p.startswith("prices[0].unit_amount: unknown key; meterd does not") for p in found)


def test_descending_tiers_are_refused_with_the_path_of_the_offending_bound() -> None:
    text = EGRESS.replace(
        '{ up_to = 1000, unit_amount_decimal = "0" },',
        '{ up_to = 1000, unit_amount_decimal = "0" },\n'
        '  { up_to = 500, unit_amount_decimal = "1" },',
    )
    problem = only_problem(text)
    assert problem.startswith("prices[0].tiers[1].up_to: tiers must ascend: 500 is not greater")


def test_a_missing_final_inf_tier_is_refused() -> None:
    text = EGRESS.replace('up_to = "inf"', "up_to = 5000")
    assert only_problem(text).startswith('prices[0].tiers[1].up_to: the last tier must have up_to')


def test_inf_must_be_last_and_written_as_a_string() -> None:
    early = EGRESS.replace("up_to = 1000", 'up_to = "inf"').replace(
        '{ up_to = "inf", unit_amount_decimal = "0.01"', '{ up_to = 9, unit_amount_decimal = "0.01"'
    )
    assert 'up_to = "inf", unit_amount_decimal = "0" }' in early
    found = problems(early)
    assert 'prices[0].tiers[0].up_to: only the last tier may have up_to = "inf"' in found
    bare = EGRESS.replace('up_to = "inf"', "up_to = inf")
    assert only_problem(bare) == (
        'prices[0].tiers[1].up_to: write infinity as the string "inf" (up_to = "inf")'
    )


def test_an_unknown_currency_is_refused_with_its_path() -> None:
    text = EGRESS.replace('currency = "eur"', 'currency = "eru"')
    assert only_problem(text) == (
        "prices[0].currency: unknown currency 'eru': expected an ISO 4217 code such as 'eur'"
    )


def test_every_problem_is_reported_at_once() -> None:
    text = (
        EGRESS.replace('currency = "eur"', 'currency = "xxx"')
        .replace('up_to = "inf"', "up_to = 10")
        .replace('tiers_mode = "graduated"', 'tiers_mode = "graduated"\ncolour = "red"')
    )
    keys = {problem.split(":")[0] for problem in problems(text)}
    assert keys == {"prices[0].currency", "prices[0].tiers[1].up_to", "prices[0].colour"}


@pytest.mark.parametrize(
    ("replace", "by", "expected"),
    [
        ('unit = "GB"', 'unit = "gigabytes"', "prices[0].unit: unknown unit 'gigabytes'"),
        ('metric = "net.tx_bytes"', 'metric = "Net TX"', "prices[0].metric: expected a dotted"),
        ('tiers_mode = "graduated"', 'tiers_mode = "stepped"', "prices[0].tiers_mode: expected"),
        ('interval = "month"', 'interval = "hour"', "prices[0].recurring.interval: a metered"),
        ('unit = "GB"', 'unit = "Mbit/s"', "prices[0].unit: Mbit/s is a rate"),
        ('id = "egress"', 'id = "bad id"', "prices[0].id: expected an id"),
        ('up_to = 1000', 'up_to = -5', "prices[0].tiers[0].up_to: must not be negative"),
        ('up_to = 1000', 'up_to = 0', "prices[0].tiers[0].up_to: must be greater than zero"),
        ('up_to = 1000, unit_amount_decimal = "0"', 'up_to = 1000', "prices[0].tiers[0]: expected"),
        ('usage_type = "metered", ', "", "prices[0].recurring.aggregate_usage: applies to"),
    ],
)
def test_a_bad_value_is_refused_with_its_path(replace: str, by: str, expected: str) -> None:
    text = EGRESS.replace(replace, by)
    assert text != EGRESS
    assert any(problem.startswith(expected) for problem in problems(text)), problems(text)


def test_per_unit_and_tiered_fields_do_not_mix() -> None:
    text = (
        '[[prices]]\nid = "a"\ncurrency = "eur"\nunit_amount_decimal = "1"\n'
        'tiers_mode = "volume"\n'
    )
    assert only_problem(text).startswith('prices[0].tiers_mode: belongs to billing_scheme')


def test_effective_from_needs_an_offset() -> None:
    text = '[[prices]]\nid = "a"\ncurrency = "eur"\nunit_amount_decimal = "1"\n'
    local = text + "effective_from = 2027-01-01T00:00:00\n"
    assert only_problem(local).startswith("prices[0].effective_from: expected a date-time")


def test_json_is_read_like_toml() -> None:
    document = {
        "prices": [
            {
                "id": "egress", "product": "Bandwidth", "currency": "eur",
                "metric": "net.tx_bytes", "unit": "GB", "billing_scheme": "tiered",
                "tiers_mode": "graduated",
                "tiers": [
                    {"up_to": 1000, "unit_amount_decimal": "0"},
                    {"up_to": "inf", "unit_amount_decimal": "0.01", "flat_amount_decimal": "0"},
                ],
                "recurring": {"interval": "month", "usage_type": "metered",
                              "aggregate_usage": "sum"},
            }
        ]
    }  # fmt: skip
    from_json = parse_tariff_text(json.dumps(document, indent=1), "t.json")
    from_toml = parse_tariff_text(EGRESS, "t.toml")
    assert from_json.versions == from_toml.versions


def test_a_json_key_given_twice_is_refused() -> None:
    text = '{"prices": [], "prices": []}'
    with pytest.raises(ConfigError, match="prices: this key appears twice"):
        parse_tariff_text(text, "t.json")


def test_versions_take_effect_at_their_instant() -> None:
    tariff = parse_tariff_text((EXAMPLES / "pricebook.toml").read_text("utf-8"), "pricebook")
    change = datetime(2027, 1, 1, tzinfo=BERLIN)
    assert tariff.price("vps-m-monthly", change).unit_amount == Decimal("26.00")
    before = change - timedelta(microseconds=1)
    assert tariff.price("vps-m-monthly", before).unit_amount == Decimal("24.00")
    with pytest.raises(RatingError, match="no price 'nope'"):
        tariff.price("nope", change)


def test_metered_prices_finds_every_price_fed_by_a_metric() -> None:
    tariff = parse_tariff_text((EXAMPLES / "pricebook.toml").read_text("utf-8"), "pricebook")
    at = datetime(2026, 11, 1, tzinfo=BERLIN)
    assert [p.id for p in tariff.metered_prices("net.tx_bytes", at)] == ["bw95", "egress"]
    assert tariff.metered_prices("disk.read_bytes", at) == []


def test_a_price_not_yet_in_force_is_not_found() -> None:
    text = (
        '[[prices]]\nid = "new"\ncurrency = "eur"\nunit_amount_decimal = "1"\n'
        "effective_from = 2027-01-01T00:00:00+01:00\n"
    )
    tariff = parse_tariff_text(text, "t.toml")
    with pytest.raises(RatingError, match="no version in force"):
        tariff.price("new", datetime(2026, 6, 1, tzinfo=BERLIN))


def test_versions_of_one_price_must_meter_the_same_thing() -> None:
    later = EGRESS.replace('id = "egress"', 'id = "egress"\neffective_from = 2027-01-01T00:00:00Z')
    changed = later.replace('unit = "GB"', 'unit = "GiB"')
    found = problems(EGRESS + changed)
    assert any(p.startswith("prices[1].unit: every version of price 'egress'") for p in found)
    duplicate = problems(EGRESS + EGRESS)
    assert any(p.startswith("prices[1].id: duplicate price id 'egress'") for p in duplicate)
    same_instant = problems(later + later)
    expected = "prices[1].effective_from: price 'egress' already has a version"
    assert any(p.startswith(expected) for p in same_instant)


def test_plans_coupons_and_tax_rates_are_checked() -> None:
    text = EGRESS + """
[[plans]]
id = "p"
prices = ["egress", "missing"]
minimum_amount_decimal = "10"

[[coupons]]
id = "c"
percent_off = "10"
amount_off = "5"

[[coupons]]
id = "d"
amount_off = "5"

[[tax_rates]]
id = "t"
percentage = "119"
"""
    keys = {problem.split(":")[0] for problem in problems(text)}
    assert keys == {
        "plans[0].prices[1]",
        "coupons[0]",
        "coupons[1].currency",
        "tax_rates[0].percentage",
    }


def test_a_plan_naming_a_broken_price_gets_no_second_error() -> None:
    text = EGRESS.replace('"0.01"', "0.01") + '\n[[plans]]\nid = "p"\nprices = ["egress"]\n'
    assert only_problem(text).startswith("prices[0].tiers[1].unit_amount_decimal: a float")
