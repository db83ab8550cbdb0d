"""Exact money and quantities.

Money and quantities are :class:`decimal.Decimal` (or ``int``), never ``float``: a
float has already lost the value before any code sees it, so every entry point here
refuses one outright. Arithmetic runs in :data:`CONTEXT` (50 significant digits,
traps on), never the ambient decimal context, and rounding always names its mode
and scale.

Where rounding happens: once per amount that is shown or posted, half-even to the
currency's minor unit (ISO 4217 exponent) unless a tariff names another mode.
"""

from __future__ import annotations

import decimal
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal

from common.errors import MoneyError

CONTEXT = decimal.Context(
    prec=50,
    rounding=ROUND_HALF_EVEN,
    traps=[decimal.InvalidOperation, decimal.DivisionByZero, decimal.Overflow],
)

# ISO 4217 minor-unit exponents. Currencies not listed with an exponent use 2.
_EXPONENT_0 = (
    "bif clp djf gnf isk jpy kmf krw pyg rwf ugx uyi vnd vuv xaf xof xpf"
).split()
_EXPONENT_3 = "bhd iqd jod kwd lyd omr tnd".split()
_EXPONENT_4 = "clf uyw".split()
_EXPONENT_2 = (
    "aed afn all amd ang aoa ars aud awg azn bam bbd bdt bgn bmd bnd bob bov brl bsd btn"
    " bwp byn bzd cad cdf che chf chw cny cop cou crc cuc cup cve czk dkk dop dzd egp ern"
    " etb eur fjd fkp gbp gel ghs gip gmd gtq gyd hkd hnl htg huf idr ils inr irr jmd kes"
    " kgs khr kpw kyd kzt lak lbp lkr lrd lsl mad mdl mga mkd mmk mnt mop mru mur mvr mwk"
    " mxn mxv myr mzn nad ngn nio nok npr nzd pab pen pgk php pkr pln qar ron rsd rub sar"
    " sbd scr sdg sek sgd shp sle sll sos srd ssp stn svc syp szl thb tjs tmt top try ttd"
    " twd tzs uah usd usn uyu uzs ves xcd yer zar zmw zwl"
).split()

CURRENCY_EXPONENTS: dict[str, int] = {
    **dict.fromkeys(_EXPONENT_2, 2),
    **dict.fromkeys(_EXPONENT_0, 0),
    **dict.fromkeys(_EXPONENT_3, 3),
    **dict.fromkeys(_EXPONENT_4, 4),
}

ROUNDING_MODES = {
    "half_even": decimal.ROUND_HALF_EVEN,
    "half_up": decimal.ROUND_HALF_UP,
    "up": decimal.ROUND_UP,
    "down": decimal.ROUND_DOWN,
    "ceiling": decimal.ROUND_CEILING,
    "floor": decimal.ROUND_FLOOR,
}


def currency_code(code: str) -> str:
    """Return the canonical (lower-case) ISO 4217 code, or raise :class:`MoneyError`."""
    if not isinstance(code, str):
        raise MoneyError(f"currency must be an ISO 4217 code string, got {type(code).__name__}")
    canonical = code.strip().lower()
    if canonical not in CURRENCY_EXPONENTS:
        raise MoneyError(f"unknown currency {code!r}: expected an ISO 4217 code such as 'eur'")
    return canonical


def exponent(currency: str) -> int:
    """Number of minor-unit digits of ``currency`` (2 for eur, 0 for jpy, 3 for bhd)."""
    return CURRENCY_EXPONENTS[currency_code(currency)]


def to_decimal(value: object, what: str = "value") -> Decimal:
    """Convert ``value`` to a finite Decimal exactly, refusing anything lossy.

    Accepts ``Decimal``, ``int`` (not ``bool``) and decimal strings such as ``"12.50"``.
    A ``float`` is refused: it cannot be converted exactly into the amount its author
    meant.
    """
    if isinstance(value, bool):
        raise MoneyError(f"{what}: expected a decimal number, got a boolean")
    if isinstance(value, float):
        raise MoneyError(
            f"{what}: a float ({value!r}) has already lost precision; "
            "write it as a decimal string such as \"0.10\""
        )
    if isinstance(value, Decimal):
        result = value
    elif isinstance(value, int):
        result = Decimal(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            result = Decimal(text)
        except decimal.InvalidOperation:
            raise MoneyError(f"{what}: {value!r} is not a decimal number") from None
    else:
        kind = type(value).__name__
        raise MoneyError(f"{what}: expected a decimal string or integer, got {kind}")
    if not result.is_finite():
        raise MoneyError(f"{what}: {value!r} is not a finite number")
    return result


def quantize(amount: Decimal, places: int, rounding: str = ROUND_HALF_EVEN) -> Decimal:
    """Round ``amount`` to ``places`` decimal places with the named ``rounding`` mode."""
    return amount.quantize(Decimal(1).scaleb(-places), rounding=rounding, context=CONTEXT)


def round_minor(amount: Decimal, currency: str, rounding: str = ROUND_HALF_EVEN) -> Decimal:
    """Round ``amount`` to the minor unit of ``currency`` (half-even unless told)."""
    return quantize(amount, exponent(currency), rounding)


def canonical_text(value: Decimal) -> str:
    """Plain decimal text without exponent notation, for storage and the wire."""
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


@dataclass(frozen=True, slots=True)
class Money:
    """An exact amount in one currency. Refuses floats and mixed currencies."""

    amount: Decimal
    currency: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "amount", to_decimal(self.amount, "amount"))
        object.__setattr__(self, "currency", currency_code(self.currency))

    @classmethod
    def zero(cls, currency: str) -> Money:
        return cls(Decimal(0), currency)

    def _same(self, other: object) -> Money:
        if not isinstance(other, Money):
            raise MoneyError(f"cannot combine money with {type(other).__name__}")
        if other.currency != self.currency:
            raise MoneyError(f"cannot combine {self.currency} with {other.currency}")
        return other

    def __add__(self, other: object) -> Money:
        o = self._same(other)
        return Money(CONTEXT.add(self.amount, o.amount), self.currency)

    def __sub__(self, other: object) -> Money:
        o = self._same(other)
        return Money(CONTEXT.subtract(self.amount, o.amount), self.currency)

    def __neg__(self) -> Money:
        return Money(-self.amount, self.currency)

    def __mul__(self, factor: object) -> Money:
        return Money(CONTEXT.multiply(self.amount, to_decimal(factor, "factor")), self.currency)

    def rounded(self, rounding: str = ROUND_HALF_EVEN) -> Money:
        return Money(round_minor(self.amount, self.currency, rounding), self.currency)

    def __str__(self) -> str:
        return f"{quantize(self.amount, exponent(self.currency))} {self.currency.upper()}"
