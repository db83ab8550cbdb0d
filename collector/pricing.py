"""Which prices rate an account's usage: the tariff, filtered by the account's terms."""

from __future__ import annotations

import bisect
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
        # Answers by (account, metric, stretch of time): which versions are in force
        # changes only at the instants some version takes effect, so every instant
        # between two of them gets the same answer. The tariff and the terms never
        # change (a reload builds a new AccountPrices), so the ingest path computes each
        # answer once instead of once per window of every batch.
        self._changes = sorted({
            v.effective_from
            for versions in tariff.versions.values()
            for v in versions
            if v.effective_from is not None
        })
        self._summed: dict[tuple[str, str, int], tuple[Price, ...]] = {}
        self._metered: dict[tuple[str, str, int], tuple[Price, ...]] = {}

    def prices_for(self, account_id: str, metric: str, at: datetime) -> Sequence[Price]:
        if at.utcoffset() is None:  # no answer to remember (nothing is in force)
            return [p for p in self.metered_prices_for(account_id, metric, at)
                    if p.aggregate_usage == "sum"]  # fmt: skip
        key = (account_id, metric, bisect.bisect_right(self._changes, at))
        found = self._summed.get(key)
        if found is None:
            found = tuple(p for p in self.metered_prices_for(account_id, metric, at)
                          if p.aggregate_usage == "sum")  # fmt: skip
            _remember(self._summed, key, found)
        return found

    # --- billing (collector.billing) ------------------------------------------------------
    def metered_prices_for(self, account_id: str, metric: str, at: datetime) -> Sequence[Price]:
        """Every metered price (any aggregation) that rates ``metric`` for the account."""
        if at.utcoffset() is None:
            return self._metered_prices(account_id, metric, at)
        key = (account_id, metric, bisect.bisect_right(self._changes, at))
        found = self._metered.get(key)
        if found is None:
            found = self._metered_prices(account_id, metric, at)
            _remember(self._metered, key, found)
        return found

    def _metered_prices(self, account_id: str, metric: str, at: datetime) -> tuple[Price, ...]:
        terms = self.terms.get(account_id)
        if terms is None:
            return ()
        return tuple(
            p
            for p in self.tariff.metered_prices(metric, at)
            if p.currency == terms.currency and (not terms.price_ids or p.id in terms.price_ids)
        )

    def billing_cycle(self, account_id: str) -> Cycle:
        """The account's billing cycle (monthly in UTC for an account without terms)."""
        terms = self.terms.get(account_id)
        return MONTHLY_UTC if terms is None else terms.cycle

    # --- end billing ----------------------------------------------------------------------


_REMEMBERED_MAX = 65_536


def _remember(
    memo: dict[tuple[str, str, int], tuple[Price, ...]],
    key: tuple[str, str, int],
    value: tuple[Price, ...],
) -> None:
    if len(memo) >= _REMEMBERED_MAX:
        memo.clear()
    memo[key] = value
