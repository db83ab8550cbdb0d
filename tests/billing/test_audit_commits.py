"""Closing periods and releasing quarantined records commit their audit rows with the
change itself (collector.audit): a collector that stops right after the change leaves
rows on the change's shard, which the next relay appends, never a change without its
row in the log."""

from __future__ import annotations

from pathlib import Path

import pytest

from collector.audit import AuditLog, verify_audit_log
from collector.billing.quarantine import quarantine_records
from collector.billing.service import Invoice
from collector.ledger.store import InvoiceQuery
from tests.billing.conftest import World
from tests.billing.scenario import GB, berlin_march, kolkata_week, newyork_period, record
from tests.billing.test_month import APRIL_3, post


async def drafts(world: World, account: str) -> list[Invoice]:
    return await world.billing.invoices(InvoiceQuery(account_id=account, status="draft"))


class Stopped(BaseException):
    """The collector stopping right after a change committed."""


def stop_before_relaying(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    async def stopped(*args: object) -> int:
        raise Stopped

    monkeypatch.setattr(world.billing.audit, "relay", stopped)


async def log_of(world: World, action: str) -> list[str]:
    rows = await world.ledger.control.audit_rows(from_us=0, to_us=2**62, after_seq=0,
                                                 limit=None)
    return [r.target for r in rows if r.action == action]


async def test_a_close_stopped_after_its_drafts_leaves_their_rows_for_the_next_relay(
    world: World, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for traffic in (berlin_march(), newyork_period(), kolkata_week()):
        await post(world, traffic)
    stop_before_relaying(world, monkeypatch)
    with pytest.raises(Stopped):
        await world.billing.close(APRIL_3, actor="cli:ops")
    monkeypatch.undo()
    # The stop came after the first account's drafts committed.
    stored = [i for a in ("berlin", "newyork", "kolkata") for i in await drafts(world, a)]
    assert {i.account_id for i in stored} == {"berlin"}
    await AuditLog.for_ledger(world.ledger).relay_all(world.ledger.stores)
    assert sorted(await log_of(world, "invoice.close")) == sorted(
        f"invoice/{i.invoice_id}" for i in stored
    )
    assert (await verify_audit_log(world.ledger.control))[1] == []


async def test_a_release_stopped_after_it_committed_leaves_its_row_for_the_next_relay(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    late = [record("host-newyork", "net.tx_bytes", 300 * GB, APRIL_3 - 40 * 86_400_000_000)]
    await quarantine_records(world.service, late, {late[0].id: "too late"}, APRIL_3)
    stop_before_relaying(world, monkeypatch)
    with pytest.raises(Stopped):
        await world.billing.release(None, APRIL_3 + 1, actor="cli:ops")
    monkeypatch.undo()
    assert await world.billing.quarantined() == []  # released, and marked so
    await AuditLog.for_ledger(world.ledger).relay_all(world.ledger.stores)
    assert await log_of(world, "quarantine.release") == ["records/1"]
