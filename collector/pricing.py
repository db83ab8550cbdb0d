"""Which prices rate an account's usage: the tariff, filtered by the account's terms."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from collector.rating.tariff import Price, Tariff


@dataclass(frozen=True, slots=True)
class AccountTerms:
    """An account's currency and the price ids it subscribes to (empty: every metered
    price of the tariff in the account's currency)."""

    currency: str
    price_ids: frozenset[str] = field(default_factory=frozenset)


class AccountPrices:
    """A :class:`collector.ledger.posting.PriceSource` over a tariff and account terms.

    Only prices aggregated by ``sum`` are rated as usage arrives; an account without
    terms is rated by nothing (its usage is still recorded exactly).
    """

    def __init__(self, tariff: Tariff, terms: Mapping[str, AccountTerms]) -> None:
        self.tariff = tariff
        self.terms = dict(terms)

    def prices_for(self, account_id: str, metric: str, at: datetime) -> Sequence[Price]:
        terms = self.terms.get(account_id)
        if terms is None:
            return ()
        return [
            p
            for p in self.tariff.metered_prices(metric, at)
            if p.aggregate_usage == "sum"
            and p.currency == terms.currency
            and (not terms.price_ids or p.id in terms.price_ids)
        ]
