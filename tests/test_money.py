"""Exact money: minor units per ISO 4217, half-even rounding with a named scale."""

from __future__ import annotations

from decimal import Decimal

import pytest

from common.errors import MoneyError
from common.money import Money, canonical_text, exponent, round_minor


@pytest.mark.parametrize(
    ("currency", "digits"), [("eur", 2), ("EUR", 2), ("jpy", 0), ("bhd", 3), ("clf", 4)]
)
def test_minor_unit_exponents(currency: str, digits: int) -> None:
    assert exponent(currency) == digits


def test_unknown_currency_is_refused() -> None:
    with pytest.raises(MoneyError, match="unknown currency 'xyz'"):
        exponent("xyz")


@pytest.mark.parametrize(
    ("amount", "currency", "rounded"),
    [
        ("2.345", "eur", "2.34"),
        ("2.355", "eur", "2.36"),
        ("0.5", "jpy", "0"),
        ("1.5", "jpy", "2"),
        ("1.0005", "bhd", "1.000"),
        ("-2.345", "eur", "-2.34"),
    ],
)
def test_half_even_to_the_minor_unit(amount: str, currency: str, rounded: str) -> None:
    assert round_minor(Decimal(amount), currency) == Decimal(rounded)
    assert str(round_minor(Decimal(amount), currency)) == rounded


def test_rounding_ignores_the_ambient_context() -> None:
    import decimal

    with decimal.localcontext() as ctx:
        ctx.rounding = decimal.ROUND_UP
        ctx.prec = 3
        assert Money(Decimal("2.5"), "jpy").rounded().amount == Decimal(2)
        assert (
            Money(Decimal("1234.565"), "eur") + Money(Decimal("0.001"), "eur")
        ).amount == Decimal("1234.566")


@pytest.mark.parametrize(
    ("value", "text"), [("1E+3", "1000"), ("0.10", "0.1"), ("-0", "0"), ("12.500", "12.5")]
)
def test_canonical_text(value: str, text: str) -> None:
    assert canonical_text(Decimal(value)) == text
