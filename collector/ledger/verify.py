"""``meterd ledger verify``: every invariant of the stored ledger, across all shards.

Checks, per shard: every account's hash chain (nothing changed, removed or reordered
after posting); every entry balanced per currency; every balance equal to the sum of
its postings; no record id twice; every usage entry's records match its digest;
the usage sums that PostgreSQL shards read for usage equal their records;
every finalized invoice and credit note equals its ledger postings to the minor unit
and is the document its journal entry was chained with (:mod:`collector.billing.verify`);
and, given the prices that rate the ledger (:class:`PriceSource`), every running
counter equal to the sum of the records it counts.

Running counters. A counter (account, price, period) holds the quantity, in the
metric's base units, of the account's records of the price's metric whose window
starts in the period, for the prices that rate them (a metric may have several
prices, each with its counter; an account only has counters for the prices it
subscribes to in its currency). The check rebuilds each counter from the stored
records with the rating's own rules (:meth:`PriceSource.prices_for` at the record's
window start, :func:`period_start_us` on the account's cycle) and names every counter
whose quantity differs, every counter that records imply and that is missing, and
every counter that no record explains. It reads the prices in force now: records
rated before a change to which prices rate an account (its price list, currency or
billing cycle, or a price added to the tariff without an ``effective_from``) were
counted under the earlier rules, and their period's counters are reported too.
Record ids cannot repeat across shards: a record is routed to exactly one account,
and an account lives on exactly one shard.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal

from collector.audit import verify_audit_log
from collector.billing.verify import billing_problems
from collector.ledger.journal import sums_by_currency, verify_chain
from collector.ledger.posting import PriceSource, period_start_us
from collector.ledger.store import Counter, CounterKey, LedgerStore
from common.money import CONTEXT, canonical_text
from common.records import from_us


@dataclass
class VerifyReport:
    shards: int = 0
    accounts: int = 0
    entries: int = 0
    audit_rows: int = 0  # rows of the audit log (control shard), chain checked
    # Audit rows of committed changes still on their account's shard, not yet in the
    # log: not a violation, they are relayed at the next change there or at start-up.
    audit_staged: int = 0
    counters: int = 0  # running counters checked against their records
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


async def verify_ledger(
    stores: list[LedgerStore], prices: PriceSource | None = None
) -> VerifyReport:
    """Check ``stores``; with ``prices``, the running counters too."""
    report = VerifyReport(shards=len(stores))
    for store in stores:
        prefix = f"[{store.name}] "
        for account_id in await store.accounts():
            report.accounts += 1
            links = [link async for link in store.chain(account_id)]
            report.entries += len(links)
            report.problems += [prefix + p for p in verify_chain(links)]
            for link in links:
                unbalanced = {
                    c: s for c, s in sums_by_currency(link.entry.postings).items() if s != 0
                }
                if unbalanced:
                    detail = ", ".join(f"{c} {s}" for c, s in sorted(unbalanced.items()))
                    report.problems.append(
                        f"{prefix}account {account_id} entry {link.entry.id}: "
                        f"postings do not balance ({detail})"
                    )
        report.problems += [prefix + p for p in await store.balance_mismatches()]
        report.problems += [
            f"{prefix}record {r} stored twice" for r in await store.duplicate_record_ids()
        ]
        report.problems += [prefix + p for p in await store.unlinked_records()]
        report.problems += [prefix + p for p in await store.usage_sum_mismatches()]
        if prices is not None:
            counters = await store.counters()
            report.counters += len(counters)
            report.problems += [
                prefix + p
                for p in counter_mismatches(counters, await store.record_sums(), prices)
            ]
        # billing: every finalized invoice equals its period's ledger postings (collector.billing)
        report.problems += [prefix + p for p in await billing_problems(store)]
    # --- the audit log's hash chain, on the control shard (collector.audit) ---
    if stores:
        report.audit_rows, audit_problems = await verify_audit_log(stores[0])
        report.problems += [f"[{stores[0].name}] {p}" for p in audit_problems]
    for store in stores[1:]:
        async with store.transaction() as tx:
            report.audit_staged += len(await tx.staged_audits())
    return report


def counter_mismatches(
    counters: Mapping[CounterKey, Counter],
    record_sums: Iterable[tuple[str, str, int, Decimal]],
    prices: PriceSource,
) -> list[str]:
    """Each running counter whose quantity is not the sum of the records it counts,
    from (account, metric, window start, total quantity) sums of the stored records."""
    expected: dict[CounterKey, Decimal] = {}
    for account_id, metric, start_us, total in record_sums:
        at = from_us(start_us)
        period = period_start_us(start_us, prices.billing_cycle(account_id))
        for price in prices.prices_for(account_id, metric, at):
            key = CounterKey(account_id, price.id, period)
            expected[key] = CONTEXT.add(expected.get(key, Decimal(0)), total)
    problems = []
    for key in sorted(set(expected) | set(counters)):
        want = expected.get(key)
        have = counters.get(key)
        where = (
            f"account {key.account_id} price {key.price_id} period"
            f" {from_us(key.period_start_us).isoformat().replace('+00:00', 'Z')}"
        )
        if have is None:
            if want:
                problems.append(
                    f"{where}: running counter missing, its records sum to {canonical_text(want)}"
                )
        elif want is None:
            if have.quantity:
                problems.append(
                    f"{where}: running counter holds {canonical_text(have.quantity)} but no"
                    " record counts towards it"
                )
        elif have.quantity != want:
            problems.append(
                f"{where}: running counter holds {canonical_text(have.quantity)} but its"
                f" records sum to {canonical_text(want)}"
            )
    return problems
