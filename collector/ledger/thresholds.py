"""Receivable balance thresholds: which ones a posting crossed. Pure.

An account may name thresholds (``balance_thresholds = ["100.00", "500.00"]`` in its
``[accounts.<id>]`` table), amounts in its currency. The balance is at or above a
threshold, or below it; a posting that moves it from one side to the other crosses the
threshold once, upwards or downwards, and the posting transaction emits one
``balance.threshold_crossed`` event per threshold crossed. A balance that falls back
below a threshold and rises past it again crosses it again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from common.money import CONTEXT, exponent

UP = "up"
DOWN = "down"


@dataclass(frozen=True, slots=True)
class BalanceThresholds:
    """An account's thresholds on its receivable balance in ``currency``, ascending."""

    currency: str
    amounts: tuple[Decimal, ...]

    @classmethod
    def of(cls, currency: str, amounts: Iterable[Decimal]) -> BalanceThresholds:
        return cls(currency, tuple(sorted(set(amounts))))


def crossings(
    thresholds: BalanceThresholds, before: Decimal, after: Decimal
) -> list[tuple[Decimal, str]]:
    """Each threshold crossed going from ``before`` to ``after``, in the order passed."""
    if after > before:
        return [(t, UP) for t in thresholds.amounts if before < t <= after]
    if after < before:
        return [(t, DOWN) for t in reversed(thresholds.amounts) if after < t <= before]
    return []


def amount_text(amount: Decimal, currency: str) -> str:
    """Decimal text with at least the currency's minor-unit digits ("0.10", not "0.1")."""
    minor = Decimal(1).scaleb(-exponent(currency))
    if amount.as_tuple().exponent > minor.as_tuple().exponent:  # type: ignore[operator]
        amount = amount.quantize(minor, context=CONTEXT)  # only appends zeros: exact
    return format(amount, "f")


def crossing_events(
    thresholds: BalanceThresholds, before: Decimal, after: Decimal, entry_id: str
) -> list[dict[str, Any]]:
    """The ``data`` of each ``balance.threshold_crossed`` event for one posting."""
    currency = thresholds.currency
    return [
        {
            "ledger_account": "receivable",
            "currency": currency,
            "threshold": amount_text(threshold, currency),
            "direction": direction,
            "balance_before": amount_text(before, currency),
            "balance": amount_text(after, currency),
            "entry_id": entry_id,
        }
        for threshold, direction in crossings(thresholds, before, after)
    ]
