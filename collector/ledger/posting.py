"""From newly accepted usage records to counter updates and one balanced journal entry.

Pure: takes values, returns values. Metered prices with ``aggregate_usage = "sum"``
are rated as records arrive, against a running counter per (account, price, period).
Counters hold the period's quantity in the metric's base units (exact decimals); it is
converted to the price's billing unit as an exact fraction only to be priced. The
amount posted for a batch is ``round(amount(total_after)) - round(amount(total_before))``,
so however usage is split into batches, the postings of a period add up exactly to
the rounded amount of the period's total, with no residue to chase: this is the one
place where usage amounts are rounded (half-even to the currency's minor unit).

The period of a counter is the account's billing period that holds the record's
window start, computed in the account's time zone and on its cycle
(:mod:`collector.billing.periods`).

Prices aggregated by ``max``, ``last_during_period`` or ``p95`` cannot be rated
piecewise; they are rated when the period closes (:mod:`collector.billing.compose`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Protocol

from collector.billing.periods import MONTHLY_UTC, Cycle
from collector.ledger.journal import (
    RECEIVABLE,
    JournalEntry,
    Posting,
    records_digest,
    revenue_account,
)
from collector.ledger.store import ZERO_COUNTER, Counter, CounterKey
from collector.rating.engine import billing_quantity, rated_amount
from collector.rating.tariff import Price
from common.money import CONTEXT
from common.records import UsageRecord


class PriceSource(Protocol):
    def prices_for(self, account_id: str, metric: str, at: datetime) -> Sequence[Price]:
        """The metered, summed prices that rate ``metric`` for the account at ``at``."""

    def metered_prices_for(self, account_id: str, metric: str, at: datetime) -> Sequence[Price]:
        """Every metered price (any aggregation) that rates ``metric`` for the account."""

    def billing_cycle(self, account_id: str) -> Cycle:
        """The account's billing cycle: its periods key the running counters."""


def period_start_us(start_us: int, cycle: Cycle = MONTHLY_UTC) -> int:
    """Start of the billing period of ``cycle`` that holds ``start_us``."""
    return cycle.period_start(start_us)


@dataclass(frozen=True, slots=True)
class RatedBatch:
    entry: JournalEntry
    counters: dict[CounterKey, Counter]


class _AccountPrices:
    """The prices (each with its counter key) that rate a record of one account, looked
    up once per (metric, window start): the records of one sampling cycle share their
    window, so a batch of a thousand records needs a few dozen lookups, not a thousand."""

    __slots__ = ("_account_id", "_memo", "_prices")

    def __init__(self, account_id: str, prices: PriceSource) -> None:
        self._account_id = account_id
        self._prices = prices
        self._memo: dict[tuple[str, int], list[tuple[Price, CounterKey]]] = {}

    def of(self, record: UsageRecord) -> list[tuple[Price, CounterKey]]:
        key = (record.metric, record.start_us)
        found = self._memo.get(key)
        if found is None:
            period = period_start_us(record.start_us, self._prices.billing_cycle(self._account_id))
            found = self._memo[key] = [
                (price, CounterKey(self._account_id, price.id, period))
                for price in self._prices.prices_for(self._account_id, record.metric,
                                                     record.start)
            ]
        return found


def counter_keys(
    account_id: str, records: Sequence[UsageRecord], prices: PriceSource
) -> dict[CounterKey, Price]:
    """The counters that ``records`` touch, each with its price."""
    keys: dict[CounterKey, Price] = {}
    lookup = _AccountPrices(account_id, prices)
    for record in records:
        for price, key in lookup.of(record):
            keys[key] = price
    return keys


def rate_usage(
    *,
    entry_id: str,
    account_id: str,
    records: Sequence[UsageRecord],
    prices: PriceSource,
    counters: Mapping[CounterKey, Counter],
    now_us: int,
) -> RatedBatch:
    """Rate ``records`` (all new, all of ``account_id``) against ``counters``.

    Records are taken in time order. Each run of records rated by the same price
    version moves its counter from ``before`` to ``after`` and posts
    ``round(f(after)) - round(f(before))`` with that version's amount function ``f``.
    Within a version the postings telescope to the rounded amount of the version's
    whole quantity; when a new version takes effect (an effective date, a reloaded
    tariff) usage already posted keeps its price and new usage is priced at the
    margin of the new version.
    """
    runs: dict[CounterKey, list[tuple[Price, Decimal]]] = {}
    lookup = _AccountPrices(account_id, prices)
    for record in sorted(records, key=lambda r: (r.start_us, r.id)):
        for price, key in lookup.of(record):
            key_runs = runs.setdefault(key, [])
            if key_runs and (key_runs[-1][0] is price or key_runs[-1][0] == price):
                key_runs[-1] = (price, CONTEXT.add(key_runs[-1][1], record.quantity))
            else:
                key_runs.append((price, record.quantity))
    updated: dict[CounterKey, Counter] = {}
    revenue: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for key in sorted(runs):
        counter = counters.get(key, ZERO_COUNTER)
        quantity, posted = counter.quantity, counter.amount
        for price, added in runs[key]:
            after = CONTEXT.add(quantity, added)
            delta = CONTEXT.subtract(
                rated_amount(price, billing_quantity(price, after)),
                rated_amount(price, billing_quantity(price, quantity)),
            )
            quantity, posted = after, CONTEXT.add(posted, delta)
            if delta:
                revenue[(price.product or price.id, price.currency)] -= delta
        updated[key] = Counter(quantity, posted)
    postings: list[Posting] = []
    receivable: dict[str, Decimal] = defaultdict(Decimal)
    for (product, currency), amount in sorted(revenue.items()):
        postings.append(Posting(revenue_account(product), currency, amount))
        receivable[currency] -= amount
    for currency, amount in sorted(receivable.items()):
        postings.append(Posting(RECEIVABLE, currency, amount))
    metrics = sorted({r.metric for r in records})
    entry = JournalEntry(
        id=entry_id,
        account_id=account_id,
        kind="usage",
        memo=f"usage: {len(records)} records ({', '.join(metrics)})",
        created_us=now_us,
        postings=tuple(postings),
        records_digest=records_digest((r.id, r.quantity_text) for r in records),
    )
    return RatedBatch(entry, updated)
