"""Which period's invoice carries each usage posting, and late usage.

Runs inside the ingest path's posting transaction (:class:`collector.ledger.service.
LedgerService`), just before the usage entry is appended (a store may write the period
postings with the entry), so it commits or rolls back with it. For every running counter
the entry moved, one *period posting* records the amount and two periods: the usage's
own (``origin``) and the one whose invoice carries it. They are the same unless the
usage's period is already finalized: then the record is **late** (so is one of a period
before the account's first invoice, once that is finalized), it is rated against its own
period's counter (as if it had come in time: tiers and rounding continue from what that
period already holds) and carried by the next open period, whose invoice shows it as an
adjustment line naming the original period. A late record of a price rated at close
(``max``, ``last_during_period``, ``p95``) leaves a mark (a period posting of zero) so
that the next invoice measures the original period again. Each late period gets one
``usage.late`` event.

Whether a period is finalized is only asked when it has ended (or ends within the
hour, to allow for clocks that differ a little), and only with the account's chain head
locked first: finalizing takes that lock first too, so the answer cannot change before
this transaction commits.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from decimal import Decimal

from collector.billing.periods import HOUR_US, Cycle, Period
from collector.ledger.outbox import USAGE_LATE
from collector.ledger.posting import PriceSource
from collector.ledger.store import ZERO_COUNTER, Counter, CounterKey, LedgerTx, PeriodPosting
from collector.rating.model import Price
from common.money import CONTEXT, canonical_text
from common.records import SeriesBatch, UsageRecord

LATE_CHECK_MARGIN_US = HOUR_US


def increments(
    before: Mapping[CounterKey, Counter], after: Mapping[CounterKey, Counter]
) -> dict[CounterKey, Decimal]:
    """What the entry posted per counter (zero increments left out)."""
    moved: dict[CounterKey, Decimal] = {}
    for key, counter in after.items():
        delta = CONTEXT.subtract(counter.amount, before.get(key, ZERO_COUNTER).amount)
        if delta:
            moved[key] = delta
    return moved


def open_period(cycle: Cycle, origin_start_us: int, finalized: Sequence[int]) -> Period:
    """The period whose invoice carries usage of the origin period: the origin itself
    while no period from it on is finalized; else the one after the latest finalized
    period (periods are finalized in order, so every period up to that one is closed,
    including any before the account's first invoice)."""
    if finalized and max(finalized) >= origin_start_us:
        return cycle.after(cycle.period_of(max(finalized)))
    return cycle.period_of(origin_start_us)


async def attribute_usage(
    tx: LedgerTx,
    prices: PriceSource,
    *,
    account_id: str,
    entry_id: str,
    priced: Mapping[CounterKey, Price],
    before: Mapping[CounterKey, Counter],
    after: Mapping[CounterKey, Counter],
    records: Sequence[UsageRecord],
    now_us: int,
) -> None:
    """Write the period postings of one usage entry (see the module docstring)."""
    cycle = prices.billing_cycle(account_id)
    moved = increments(before, after)
    # The period of each distinct window start (a batch has a few), from its column
    # when the records come in column form.
    starts_us = (
        records.starts_us if isinstance(records, SeriesBatch) else [r.start_us for r in records]
    )
    period_of = {start_us: cycle.period_start(start_us) for start_us in set(starts_us)}
    origins = set(period_of.values()) | {key.period_start_us for key in moved}
    ended = [o for o in origins if cycle.period_of(o).end_us <= now_us + LATE_CHECK_MARGIN_US]
    finalized: list[int] = []
    if ended:
        await tx.lock_account(account_id)
        finalized = await tx.finalized_periods(account_id, min(ended))
    closed = {o for o in ended if finalized and max(finalized) >= o}
    rows: dict[tuple[str, int], PeriodPosting] = {}
    for key, amount in sorted(moved.items()):
        target = open_period(cycle, key.period_start_us, finalized).start_us
        rows[(key.price_id, key.period_start_us)] = PeriodPosting(
            entry_id, account_id, key.price_id, priced[key].currency, target,
            key.period_start_us, amount,
        )
    late: dict[int, list[UsageRecord]] = defaultdict(list)  # records of closed periods
    if closed:
        for record in records:
            origin = period_of[record.start_us]
            if origin in closed:
                late[origin].append(record)
    for origin, recs in sorted(late.items()):
        target = open_period(cycle, origin, finalized).start_us
        for record in recs:
            for price in prices.metered_prices_for(account_id, record.metric, record.start):
                if price.aggregate_usage != "sum" and (price.id, origin) not in rows:
                    rows[(price.id, origin)] = PeriodPosting(
                        entry_id, account_id, price.id, price.currency, target, origin,
                        Decimal(0),
                    )
    if not rows:
        return
    await tx.insert_period_postings([rows[k] for k in sorted(rows)])
    for origin in sorted(late):
        carried = [row for row in rows.values() if row.origin_start_us == origin]
        if not carried:
            continue
        original = cycle.period_of(origin)
        target_period = cycle.period_of(carried[0].period_start_us)
        amount = Decimal(0)
        for row in carried:
            amount = CONTEXT.add(amount, row.amount)
        await tx.emit(
            USAGE_LATE,
            account_id,
            {
                "account": account_id,
                "entry_id": entry_id,
                "records": len(late[origin]),
                "period": {"start": original.start.isoformat(), "end": original.end.isoformat()},
                "billed_in_period": {
                    "start": target_period.start.isoformat(),
                    "end": target_period.end.isoformat(),
                },
                "currency": carried[0].currency,
                "amount": canonical_text(amount),
                "prices": sorted({row.price_id for row in carried}),
            },
        )
