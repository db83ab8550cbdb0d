"""``meterd ledger verify``: every invariant of the stored ledger, across all shards.

Checks, per shard: every account's hash chain (nothing changed, removed or reordered
after posting); every entry balanced per currency; every balance equal to the sum of
its postings; no record id twice; every usage entry's records match its digest.
Record ids cannot repeat across shards: a record is routed to exactly one account,
and an account lives on exactly one shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from collector.ledger.journal import sums_by_currency, verify_chain
from collector.ledger.store import LedgerStore


@dataclass
class VerifyReport:
    shards: int = 0
    accounts: int = 0
    entries: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


async def verify_ledger(stores: list[LedgerStore]) -> VerifyReport:
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
    return report
