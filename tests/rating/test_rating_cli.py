"""``meterd tariff check`` and ``meterd tariff quote`` through the real dispatcher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
PRICEBOOK = EXAMPLES / "pricebook.toml"
QUOTE = EXAMPLES / "quote.json"

GOOD = """
[[prices]]
id = "egress"
currency = "eur"
metric = "net.tx_bytes"
unit = "GB"
billing_scheme = "tiered"
tiers_mode = "graduated"
tiers = [
  { up_to = 1000, unit_amount_decimal = "0" },
  { up_to = "inf", unit_amount_decimal = "0.01" },
]
recurring = { interval = "month", usage_type = "metered", aggregate_usage = "sum" }
"""


def test_check_accepts_the_example_price_book(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tariff", "check", str(PRICEBOOK)]) == 0
    out = capsys.readouterr().out
    assert out == (
        f"{PRICEBOOK}: ok: Example Hosting price book 2026: 14 prices in eur (9 licensed, "
        "4 metered, 1 one-time), 1 later version, 3 plans, 3 tax rates, 2 coupons\n"
    )


def test_quote_prices_the_example_invoice(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tariff", "quote", str(PRICEBOOK), "--input", str(QUOTE)]) == 0
    document = json.loads(capsys.readouterr().out)
    lines = document["lines"]
    amounts = [(line.get("price") or line.get("plan"), line["amount"]) for line in lines]
    assert amounts == [
        ("vps-s-monthly", "6.00"),  # 12.00 for 15 of November's 30 days
        ("ipv4", "3.00"),  # 2 * 1.50
        ("vps-s-hourly", "0.94"),  # 46 h 45 min, 47 started hours * 0.02
        ("vps-m-hourly", "24.00"),  # 720 h * 0.035 = 25.20, capped at 24.00
        ("dedi-ax-monthly", "89.00"),  # a started month
        ("dedi-ax-setup", "49.00"),
        ("egress", "2.34"),  # (1234.5 - 1000) * 0.01 = 2.345, half-even
        ("bw95", "12.00"),  # 20 samples, 300 discarded, 130 billed: 30 * 0.40
        ("s3-requests", "0.05"),  # 13 started packages * 0.004 = 0.052
        ("dedicated-commit", "46.66"),  # 150.00 - (89.00 + 12.00 + 2.34)
    ]
    assert document["lines"][0]["intervals"] == "1/2"
    assert document["lines"][7]["quantity"] == "130"
    assert document["currency"] == "eur"
    assert document["subtotal"] == "232.99"
    assert document["discounts"] == [{"coupon": "welcome10", "amount": "23.30"}]  # 23.299
    assert document["taxes"] == [
        {"tax_rate": "de-vat", "percentage": "19", "inclusive": False, "amount": "39.84"}
    ]  # 209.69 * 0.19 = 39.8411
    assert document["total"] == "249.53"


def test_check_accepts_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tariff.json"
    path.write_text(
        json.dumps({"prices": [{"id": "a", "currency": "jpy", "unit_amount_decimal": "500"}]}),
        encoding="utf-8",
    )
    assert main(["tariff", "check", str(path)]) == 0
    assert "1 price in jpy (1 one-time)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("replace", "by", "expected"),
    [
        ('"0.01"', "0.01", "prices[0].tiers[1].unit_amount_decimal: a float literal (0.01)"),
        ('unit = "GB"', 'unit = "GB"\nunits = "GB"', "prices[0].units: unknown key"),
        ('"0" },', '"0" }, { up_to = 900, unit_amount_decimal = "1" },',
         "prices[0].tiers[1].up_to: tiers must ascend"),
        ('up_to = "inf"', "up_to = 2000",
         'prices[0].tiers[1].up_to: the last tier must have up_to = "inf"'),
        ('currency = "eur"', 'currency = "euro"', "prices[0].currency: unknown currency 'euro'"),
    ],
)  # fmt: skip
def test_check_refuses_a_bad_tariff_with_the_key_path(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    replace: str,
    by: str,
    expected: str,
) -> None:
    path = tmp_path / "tariff.toml"
    text = GOOD.replace(replace, by, 1)
    assert text != GOOD
    path.write_text(text, encoding="utf-8")
    assert main(["tariff", "check", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"meterd: error: {path}: {expected}" in captured.err


def test_check_lists_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tariff.toml"
    text = GOOD.replace('currency = "eur"', 'currency = "euro"').replace('"0.01"', "0.01")
    path.write_text(text, encoding="utf-8")
    assert main(["tariff", "check", str(path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"meterd: error: {path}: prices[0].currency: unknown currency 'euro': expected an "
        "ISO 4217 code such as 'eur'",
        f"meterd: error: {path}: prices[0].tiers[1].unit_amount_decimal: a float literal "
        '(0.01) has already lost precision; write a decimal string such as "0.10" or an integer',
        "meterd: 2 problems",
    ]


def test_check_reports_a_syntax_error_and_a_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[[prices]\n", encoding="utf-8")
    assert main(["tariff", "check", str(path)]) == 1
    assert f"{path}: not valid TOML" in capsys.readouterr().err
    assert main(["tariff", "check", str(tmp_path / "missing.toml")]) == 1
    assert "missing.toml" in capsys.readouterr().err


def test_quote_reports_request_problems_with_their_paths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    request = tmp_path / "quote.json"
    request.write_text(
        json.dumps(
            {
                "period": {
                    "start": "2026-11-01T00:00:00+01:00",
                    "end": "2026-12-01T00:00:00+01:00",
                },
                "items": [{"price": "egress", "quantity": "5"}, {"price": "nope"}],
            }
        ),
        encoding="utf-8",
    )
    assert main(["tariff", "quote", str(PRICEBOOK), "--input", str(request)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    expected = f"meterd: error: {request}: items[1].price: no price 'nope' in the tariff"
    assert expected in captured.err
