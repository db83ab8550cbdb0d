"""Which prices rate an account's usage: the tariff, filtered by the account's terms."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from collector.billing.periods import MONTHLY_UTC, Cycle
from collector.rating.tariff import Price, Tariff


@dataclass(frozen=True, slots=True)
class AccountTerms:
    """An account's currency, the price ids it subscribes to (empty: every metered
    price of the tariff in the account's currency) and its billing cycle (the periods
    its running counters are kept for)."""

    currency: str
    price_ids: frozenset[str] = field(default_factory=frozenset)
    cycle: Cycle = MONTHLY_UTC


class AccountPrices:
    """A :class:`collector.ledger.posting.PriceSource` over a tariff and account terms.

    Only prices aggregated by ``sum`` are rated as usage arrives; an account without
    terms is rated by nothing (its usage is still recorded exactly).
    """

    def __init__(self, tariff: Tariff, terms: Mapping[str, AccountTerms]) -> None:
        self.tariff = tariff
        self.terms = dict(terms)

    def prices_for(self, account_id: str, metric: str, at: datetime) -> Sequence[Price]:
        return [p for p in self.metered_prices_for(account_id, metric, at)
                if p.aggregate_usage == "sum"]  # fmt: skip

    # --- billing (collector.billing) ------------------------------------------------------
    def metered_prices_for(self, account_id: str, metric: str, at: datetime) -> Sequence[Price]:
        """Every metered price (any aggregation) that rates ``metric`` for the account."""
        terms = self.terms.get(account_id)
        if terms is None:
            return ()
        return [
            p
            for p in self.tariff.metered_prices(metric, at)
            if p.currency == terms.currency and (not terms.price_ids or p.id in terms.price_ids)
        ]

    def billing_cycle(self, account_id: str) -> Cycle:
        """The account's billing cycle (monthly in UTC for an account without terms)."""
        terms = self.terms.get(account_id)
        return MONTHLY_UTC if terms is None else terms.cycle

    # --- end billing ----------------------------------------------------------------------
