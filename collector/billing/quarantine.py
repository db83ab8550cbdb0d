"""Records beyond the maximum lateness: kept aside with their reason, never dropped.

The ingest service quarantines a record whose window ended longer ago than
``ingest.max_lateness_days`` instead of rejecting it. The record is stored, with the
reason, on the shard of the account that held its host at the record's time (or on
the control shard when no account did), a ``usage.quarantined`` event is emitted in
the same transaction, and the agent is answered ``accepted``: the record is safe, so
it leaves the agent's spool. Sending it again answers ``duplicate``.

Operators list quarantined records and release them
(:meth:`collector.billing.service.BillingService.release`, ``meterd billing quarantine
release``); a released record is posted like any other, once (its id decides), and if
its period is finalized it is billed as late usage on the next invoice.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

from collector.ledger.outbox import USAGE_QUARANTINED
from collector.ledger.service import LedgerService, Outcome
from collector.ledger.store import LedgerStore, QuarantinedRecord
from common.records import UsageRecord


async def quarantine_records(
    service: LedgerService,
    records: Sequence[UsageRecord],
    reasons: Mapping[str, str],
    now_us: int,
) -> dict[str, Outcome]:
    """Quarantine ``records`` (each with ``reasons[id]``); ``ACCEPTED`` for those kept
    now, ``DUPLICATE`` for those already quarantined or already posted."""
    ledger = service.ledger
    groups: dict[int, tuple[LedgerStore, list[QuarantinedRecord]]] = {}
    for record in records:
        account = service.router.account_for(record) or ""
        store = ledger.for_event(account)
        groups.setdefault(id(store), (store, []))[1].append(
            QuarantinedRecord(record, account, reasons[record.id], now_us)
        )
    outcomes: dict[str, Outcome] = {}
    for store, rows in groups.values():
        async with store.transaction() as tx:
            new = await tx.quarantine(rows)
            by_account: dict[str, list[QuarantinedRecord]] = defaultdict(list)
            for row in rows:
                if row.record.id in new:
                    by_account[row.account_id].append(row)
            for account, kept in sorted(by_account.items()):
                await tx.emit(
                    USAGE_QUARANTINED,
                    account,
                    {
                        "account": account,
                        "records": [
                            {
                                "id": q.record.id,
                                "host_id": q.record.host_id,
                                "metric": q.record.metric,
                                "quantity": q.record.quantity_text,
                                "unit": q.record.unit,
                                "start_us": q.record.start_us,
                                "end_us": q.record.end_us,
                                "reason": q.reason,
                            }
                            for q in kept
                        ],
                    },
                )
        for row in rows:
            outcomes[row.record.id] = (
                Outcome.ACCEPTED if row.record.id in new else Outcome.DUPLICATE
            )
    return outcomes
