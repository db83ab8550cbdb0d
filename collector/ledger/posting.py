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

import operator
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
from common.records import SeriesBatch, UsageRecord, from_us

_record_id = operator.attrgetter("id")


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

    __slots__ = ("_account_id", "_cycle", "_memo", "_prices")

    def __init__(self, account_id: str, prices: PriceSource) -> None:
        self._account_id = account_id
        self._prices = prices
        self._cycle = prices.billing_cycle(account_id)
        self._memo: dict[tuple[str, int], list[tuple[Price, CounterKey]]] = {}

    def of(self, metric: str, start_us: int) -> list[tuple[Price, CounterKey]]:
        key = (metric, start_us)
        found = self._memo.get(key)
        if found is None:
            period = period_start_us(start_us, self._cycle)
            found = self._memo[key] = [
                (price, CounterKey(self._account_id, price.id, period))
                for price in self._prices.prices_for(self._account_id, metric,
                                                     from_us(start_us))
            ]
        return found


@dataclass(frozen=True, slots=True)
class PricedUsage:
    """New records of one account, grouped for rating: each group is the records of one
    window start and metric that some price rates, with those prices (each with its
    counter key) and the records' quantities in record id order; groups in window
    order. ``keys`` are the counters the records touch, each with its price, and
    ``metrics`` every metric of the records (priced or not)."""

    groups: list[tuple[list[tuple[Price, CounterKey]], list[Decimal]]]
    keys: dict[CounterKey, Price]
    metrics: list[str]


def price_usage(
    account_id: str, records: Sequence[UsageRecord], prices: PriceSource
) -> PricedUsage:
    """Group ``records`` (of ``account_id``) by window start and metric and look their
    prices up once per group (see :class:`PricedUsage`)."""
    by_window: dict[tuple[int, str], list[Decimal]] = {}
    get = by_window.get
    if isinstance(records, SeriesBatch):  # the same groups, read from its columns
        metrics, values = records.metrics, records.values
        windows = list(
            zip(records.starts_us, map(metrics.__getitem__, records.series), strict=True)
        )
        for i in sorted(range(len(records)), key=records.ids.__getitem__):
            window = windows[i]
            quantities = get(window)
            if quantities is None:
                by_window[window] = [values[i]]
            else:
                quantities.append(values[i])
    else:
        for record in sorted(records, key=_record_id):
            window = (record.start_us, record.metric)
            quantities = get(window)
            if quantities is None:
                by_window[window] = [record.quantity]
            else:
                quantities.append(record.quantity)
    lookup = _AccountPrices(account_id, prices)
    groups: list[tuple[list[tuple[Price, CounterKey]], list[Decimal]]] = []
    keys: dict[CounterKey, Price] = {}
    for start_us, metric in sorted(by_window):
        priced = lookup.of(metric, start_us)
        if priced:
            groups.append((priced, by_window[(start_us, metric)]))
            for price, key in priced:
                keys[key] = price
    return PricedUsage(groups, keys, sorted({metric for _, metric in by_window}))


def counter_keys(
    account_id: str, records: Sequence[UsageRecord], prices: PriceSource
) -> dict[CounterKey, Price]:
    """The counters that ``records`` touch, each with its price."""
    return price_usage(account_id, records, prices).keys


def rate_usage(
    *,
    entry_id: str,
    account_id: str,
    records: Sequence[UsageRecord],
    prices: PriceSource,
    counters: Mapping[CounterKey, Counter],
    now_us: int,
    priced: PricedUsage | None = None,
) -> RatedBatch:
    """Rate ``records`` (all new, all of ``account_id``) against ``counters``.

    Records are taken in time order (window start, then id). Each run of records rated
    by the same price version moves its counter from ``before`` to ``after`` and posts
    ``round(f(after)) - round(f(before))`` with that version's amount function ``f``.
    Within a version the postings telescope to the rounded amount of the version's
    whole quantity; when a new version takes effect (an effective date, a reloaded
    tariff) usage already posted keeps its price and new usage is priced at the
    margin of the new version. ``priced`` is :func:`price_usage` of the same records,
    when the caller already has it.
    """
    if priced is None:
        priced = price_usage(account_id, records, prices)
    add = CONTEXT.add
    # Per counter, the runs of one price version and their summed quantity. A counter
    # gets at most one group per window start (one price version, of one metric, is in
    # force at an instant), so the groups in window order, each in record id order,
    # add the quantities in the records' time order.
    runs: dict[CounterKey, list[tuple[Price, Decimal]]] = {}
    for group_prices, quantities in priced.groups:
        for price, key in group_prices:
            key_runs = runs.setdefault(key, [])
            if key_runs and (key_runs[-1][0] is price or key_runs[-1][0] == price):
                total = key_runs[-1][1]
                for quantity in quantities:
                    total = add(total, quantity)
                key_runs[-1] = (price, total)
            else:
                total = quantities[0]
                for quantity in quantities[1:]:
                    total = add(total, quantity)
                key_runs.append((price, total))
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
    metrics = priced.metrics
    entry = JournalEntry(
        id=entry_id,
        account_id=account_id,
        kind="usage",
        memo=f"usage: {len(records)} records ({', '.join(metrics)})",
        created_us=now_us,
        postings=tuple(postings),
        records_digest=records_digest(
            zip(records.ids, records.quantity_texts, strict=True)
            if isinstance(records, SeriesBatch)
            else ((r.id, r.quantity_text) for r in records)
        ),
    )
    return RatedBatch(entry, updated)
