"""Quoting one invoice: lines, minimum commitments, coupons, taxes, total."""

from __future__ import annotations

from typing import Any

import pytest

from collector.rating.document import TariffError
from collector.rating.quote import parse_quote_request, quote, quote_document
from collector.rating.tariff import parse_tariff_text

TARIFF = """
[[prices]]
id = "server"
currency = "eur"
unit_amount_decimal = "100.00"
recurring = { interval = "month", usage_type = "licensed" }

[[prices]]
id = "server"
currency = "eur"
unit_amount_decimal = "110.00"
effective_from = 2027-01-01T00:00:00+01:00
recurring = { interval = "month", usage_type = "licensed" }

[[prices]]
id = "traffic"
currency = "eur"
metric = "net.tx_bytes"
unit = "GB"
unit_amount_decimal = "0.01"
recurring = { interval = "month", usage_type = "metered" }

[[prices]]
id = "setup"
currency = "eur"
unit_amount_decimal = "19.99"

[[prices]]
id = "yen-server"
currency = "jpy"
unit_amount_decimal = "1500"
recurring = { interval = "month", usage_type = "licensed" }

[[prices]]
id = "dinar-server"
currency = "bhd"
unit_amount_decimal = "4.125"
recurring = { interval = "month", usage_type = "licensed" }

[[plans]]
id = "commit"
prices = ["server", "traffic"]
minimum_amount_decimal = "150.00"

[[tax_rates]]
id = "vat19"
percentage = "19"

[[tax_rates]]
id = "city"
percentage = "2.5"

[[tax_rates]]
id = "vat20-incl"
percentage = "20"
inclusive = true

[[coupons]]
id = "ten"
percent_off = "10"

[[coupons]]
id = "five"
amount_off = "5.00"
currency = "eur"

[[coupons]]
id = "thousand"
amount_off = "1000"
currency = "eur"

[[coupons]]
id = "dollar"
amount_off = "5"
currency = "usd"
"""

NOVEMBER = {"start": "2026-11-01T00:00:00+01:00", "end": "2026-12-01T00:00:00+01:00"}
JANUARY = {"start": "2027-01-01T00:00:00+01:00", "end": "2027-02-01T00:00:00+01:00"}


def priced(request: dict[str, Any]) -> dict[str, Any]:
    tariff = parse_tariff_text(TARIFF, "t.toml")
    return quote_document(quote(tariff, parse_quote_request(request, "q.json")))


def refused(request: dict[str, Any]) -> list[str]:
    tariff = parse_tariff_text(TARIFF, "t.toml")
    with pytest.raises(TariffError) as caught:
        quote(tariff, parse_quote_request(request, "q.json"))
    return [f"{error.key}: {error.expected}" for error in caught.value.errors]


def test_lines_subtotal_and_total_without_discounts_or_taxes() -> None:
    result = priced(
        {
            "period": NOVEMBER,
            "items": [
                {"price": "server", "quantity": "1"},
                {"price": "traffic", "quantity": "1234.5"},  # 12.345, half-even 12.34
                {"price": "setup"},
            ],
        }
    )
    assert [line["amount"] for line in result["lines"]] == ["100.00", "12.34", "19.99"]
    assert result["subtotal"] == "132.33"
    assert result["discounts"] == []
    assert result["taxes"] == []
    assert result["total"] == "132.33"


def test_usage_is_rated_by_the_version_in_force_at_the_window_start() -> None:
    item = {"price": "server"}
    assert priced({"period": NOVEMBER, "items": [item]})["total"] == "100.00"
    assert priced({"period": JANUARY, "items": [item]})["total"] == "110.00"


def test_coupons_apply_in_order_to_what_is_left() -> None:
    # 200.00; ten: 20.00, leaving 180.00; five: 5.00, leaving 175.00.
    result = priced(
        {"period": NOVEMBER, "items": [{"price": "server", "quantity": "2"}],
         "coupons": ["ten", "five"]}
    )  # fmt: skip
    assert result["discounts"] == [
        {"coupon": "ten", "amount": "20.00"},
        {"coupon": "five", "amount": "5.00"},
    ]
    assert result["total"] == "175.00"


def test_a_percent_coupon_rounds_half_even() -> None:
    # 100.00 + 1225 GB * 0.01 = 112.25; 10% of it is 11.225, half-even 11.22 (half-up: 11.23)
    result = priced(
        {"period": NOVEMBER,
         "items": [{"price": "server"}, {"price": "traffic", "quantity": "1225"}],
         "coupons": ["ten"]}
    )  # fmt: skip
    assert result["discounts"] == [{"coupon": "ten", "amount": "11.22"}]
    assert result["total"] == "101.03"


def test_a_discount_never_takes_the_total_below_zero() -> None:
    result = priced({"period": NOVEMBER, "items": [{"price": "setup"}], "coupons": ["thousand"]})
    assert result["discounts"] == [{"coupon": "thousand", "amount": "19.99"}]
    assert result["total"] == "0.00"


def test_exclusive_taxes_are_each_computed_once_on_the_discounted_subtotal() -> None:
    # 3 * 19.99 = 59.97; less 10% (5.997, so 6.00) = 53.97
    # vat19: 53.97 * 0.19 = 10.2543, so 10.25; city: 53.97 * 0.025 = 1.34925, so 1.35
    result = priced(
        {"period": NOVEMBER, "items": [{"price": "setup", "quantity": "3"}],
         "coupons": ["ten"], "tax_rates": ["vat19", "city"]}
    )  # fmt: skip
    assert result["subtotal"] == "59.97"
    assert result["discounts"] == [{"coupon": "ten", "amount": "6.00"}]
    assert [(t["tax_rate"], t["amount"]) for t in result["taxes"]] == [
        ("vat19", "10.25"),
        ("city", "1.35"),
    ]
    assert result["total"] == "65.57"  # 53.97 + 10.25 + 1.35


def test_an_inclusive_tax_is_reported_and_not_added() -> None:
    # 100.00 + 19.99 = 119.99 gross; its VAT is 119.99 * 20 / 120 = 19.998..., so 20.00
    result = priced(
        {"period": NOVEMBER, "items": [{"price": "server"}, {"price": "setup"}],
         "tax_rates": ["vat20-incl"]}
    )  # fmt: skip
    assert result["taxes"] == [
        {"tax_rate": "vat20-incl", "percentage": "20", "inclusive": True, "amount": "20.00"}
    ]
    assert result["total"] == "119.99"


def test_a_minimum_commitment_adds_the_shortfall() -> None:
    # plan "commit" holds server and traffic: 100.00 + 10.00 = 110.00 < 150.00
    result = priced(
        {"period": NOVEMBER, "plans": ["commit"],
         "items": [{"price": "server"}, {"price": "traffic", "quantity": "1000"},
                   {"price": "setup"}]}
    )  # fmt: skip
    assert result["lines"][-1] == {"plan": "commit", "minimum": "150.00", "amount": "40.00"}
    assert result["subtotal"] == "169.99"  # 110.00 + 40.00 + 19.99 (setup is not in the plan)


def test_a_minimum_commitment_that_is_met_adds_nothing() -> None:
    result = priced(
        {"period": NOVEMBER, "plans": ["commit"],
         "items": [{"price": "server", "quantity": "2"}]}
    )  # fmt: skip
    assert [line.get("plan") for line in result["lines"]] == [None]
    assert result["total"] == "200.00"


def test_zero_and_three_decimal_currencies() -> None:
    # 1500 yen * 16/30 of November = 800 yen exactly; 4.125 dinar * 16/30 = 2.2 dinar
    active = {"start": "2026-11-15T00:00:00+01:00", "end": "2026-12-01T00:00:00+01:00"}
    yen = priced({"period": NOVEMBER, "items": [{"price": "yen-server", "active": active}]})
    assert yen["currency"] == "jpy"
    assert yen["total"] == "800"
    dinar = priced({"period": NOVEMBER, "items": [{"price": "dinar-server", "active": active}]})
    assert dinar["total"] == "2.200"
    one_third = {"start": "2026-11-21T00:00:00+01:00", "end": "2026-12-01T00:00:00+01:00"}
    dinar = priced({"period": NOVEMBER, "items": [{"price": "dinar-server", "active": one_third}]})
    assert dinar["total"] == "1.375"  # 4.125 / 3 exactly


def test_another_currency_is_an_error_not_a_conversion() -> None:
    found = refused(
        {"period": NOVEMBER, "items": [{"price": "server"}, {"price": "yen-server"}]}
    )
    assert found == [
        "items[1].price: price 'yen-server' is in jpy, the quote in eur; "
        "meterd does not convert currencies"
    ]
    coupon = refused({"period": NOVEMBER, "items": [{"price": "server"}], "coupons": ["dollar"]})
    assert coupon[0].startswith("coupons[0]: coupon 'dollar' takes usd off")


def test_inclusive_and_exclusive_taxes_do_not_mix() -> None:
    found = refused(
        {"period": NOVEMBER, "items": [{"price": "server"}], "tax_rates": ["vat19", "vat20-incl"]}
    )
    assert found[0].startswith("tax_rates: inclusive and exclusive tax rates cannot be mixed")


def test_request_problems_name_their_paths() -> None:
    found = refused(
        {"period": NOVEMBER,
         "items": [{"price": "nope"}, {"price": "traffic"},
                   {"price": "server", "samples": ["1"]}],
         "coupons": ["none"], "tax_rates": ["none"], "plans": ["none"]}
    )  # fmt: skip
    keys = [problem.split(":")[0] for problem in found]
    assert keys == [
        "items[0].price", "items[1]", "items[2].samples", "plans[0]", "coupons[0]",
        "tax_rates[0]",
    ]  # fmt: skip


def test_the_request_refuses_floats_unknown_keys_and_backwards_windows() -> None:
    for request, expected in [
        ({"period": NOVEMBER, "items": [{"price": "traffic", "quantity": 1.5}]},
         "items[0].quantity: a float"),
        ({"period": NOVEMBER, "items": [{"price": "server", "qty": "1"}]},
         "items[0].qty: unknown key"),
        ({"period": {"start": NOVEMBER["end"], "end": NOVEMBER["start"]}, "items": []},
         "period.end: a window must end after it starts"),
        ({"period": {"start": "2026-11-01T00:00:00", "end": NOVEMBER["end"]}, "items": []},
         "period.start: expected a date-time with a UTC offset"),
    ]:  # fmt: skip
        with pytest.raises(TariffError) as caught:
            parse_quote_request(request, "q.json")
        messages = [f"{e.key}: {e.expected}" for e in caught.value.errors]
        assert any(message.startswith(expected) for message in messages), messages
