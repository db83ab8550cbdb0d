"""A simulated billing month, on the embedded SQLite ledger and on two PostgreSQL shards.

Three accounts in three time zones (see :mod:`tests.billing.scenario`): every invoice
equals what ``meterd tariff quote`` prices from a request written by hand, equals the
ledger to the cent, is finalized once and never changes; a late record lands on the
next invoice as an adjustment naming its period; a record beyond the maximum lateness
is quarantined, released and billed once; credit notes correct an invoice.
"""

from __future__ import annotations

import json
import sqlite3
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from collector.billing.quarantine import quarantine_records
from collector.billing.service import Conflict, Invoice, NotFound
from collector.ledger.outbox import OutboxEvent
from collector.ledger.postgres_store import PostgresLedger
from collector.ledger.service import Outcome
from collector.ledger.sqlite_store import SqliteLedger
from collector.ledger.store import InvoiceQuery, LedgerStore
from collector.ledger.verify import verify_ledger
from collector.webhooks.state import outbox_after
from common.cli import main
from tests.billing.conftest import World
from tests.billing.scenario import (
    GB,
    PRICEBOOK,
    Traffic,
    at,
    berlin_april,
    berlin_march,
    berlin_march_request,
    kolkata_request,
    kolkata_week,
    newyork_period,
    newyork_request,
    record,
)

APRIL_3 = at("2026-04-03T12:00:00+02:00")
MAY_3 = at("2026-05-03T12:00:00+02:00")
JUNE_3 = at("2026-06-03T12:00:00+02:00")


async def post(world: World, traffic: Traffic) -> None:
    """Each record arrives a minute after its window ends, in a batch of its own."""
    for r in traffic.records:
        outcomes = await world.service.post([r], r.end_us + 60_000_000)
        assert outcomes == {r.id: Outcome.ACCEPTED}


def tariff_quote(request: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
                 ) -> dict[str, Any]:
    path = tmp_path / "quote.json"
    path.write_text(json.dumps(request))
    capsys.readouterr()
    assert main(["tariff", "quote", str(PRICEBOOK), "--input", str(path)]) == 0
    result: dict[str, Any] = json.loads(capsys.readouterr().out)
    return result


def priced_part(document: dict[str, Any]) -> dict[str, Any]:
    """What an invoice shares with a quote: lines (as price or plan and amount), subtotal,
    discounts, taxes and the priced total."""
    return {
        "lines": sorted((line.get("price") or line.get("plan"), line["amount"])
                        for line in document["lines"]),
        "subtotal": document["subtotal"],
        "discounts": document["discounts"],
        "taxes": document["taxes"],
        "total": document.get("quote_total", document["total"]),
    }


def quote_part(quote: dict[str, Any]) -> dict[str, Any]:
    return priced_part({**quote, "quote_total": quote["total"]})


async def events(world: World, kind: str) -> list[dict[str, Any]]:
    found: list[OutboxEvent] = []
    for store in world.ledger.stores:
        found += await outbox_after(store, 0, 10_000)
    return [json.loads(e.data) for e in found if e.event_type == kind]


async def invoices(world: World, account: str) -> list[Invoice]:
    return await world.billing.invoices(InvoiceQuery(account_id=account, status="finalized"))


async def assert_ledger_equals_invoices(world: World) -> None:
    report = await verify_ledger(list(world.ledger.stores))
    assert report.ok, report.problems
    for account in ("berlin", "newyork", "kolkata"):
        billed = sum((i.total for i in await invoices(world, account)), Decimal(0))
        credited = sum(
            (n.stored.total for n in await world.billing.credit_notes(account_id=account)),
            Decimal(0),
        )
        assert await world.receivable(account) == billed - credited, account


def graduated_egress(gb: Decimal) -> Decimal:
    """The example price book's egress by hand: 1000 GB free, then 0.01 up to 20000."""
    amount = max(gb - 1000, Decimal(0)) * Decimal("0.01")
    return amount.quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN)


def burstable(rates: list[Decimal]) -> Decimal:
    """bw95 by hand: drop the top 5 % (rounded down) of the samples, bill the highest
    left above 100 Mbit/s at 0.40."""
    ordered = sorted(rates)
    kept = ordered[len(ordered) - 1 - len(ordered) * 5 // 100]
    return (max(kept - 100, Decimal(0)) * Decimal("0.40")).quantize(Decimal("0.01"))


async def test_a_month_of_three_accounts(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    march, newyork, kolkata = berlin_march(), newyork_period(), kolkata_week()
    for traffic in (march, newyork, kolkata):
        await post(world, traffic)

    drafts = await world.billing.close(APRIL_3, actor="test")
    by_account: dict[str, list[Invoice]] = {}
    for draft in drafts:
        by_account.setdefault(draft.account_id, []).append(draft)
    assert {a: len(d) for a, d in by_account.items()} == {"berlin": 1, "newyork": 1, "kolkata": 4}
    assert all(d.status == "draft" and d.number is None for d in drafts)

    # Every invoice is what `meterd tariff quote` prices from the same facts.
    for draft, request in (
        (by_account["berlin"][0], berlin_march_request(march)),
        (by_account["newyork"][0], newyork_request(newyork)),
        (by_account["kolkata"][0], kolkata_request(kolkata)),
    ):
        assert priced_part(draft.document) == quote_part(tariff_quote(request, tmp_path, capsys))
        # ... and so is the request the invoice keeps beside it.
        stored = json.loads(draft.stored.quote_request)
        assert quote_part(tariff_quote(stored, tmp_path, capsys)) == priced_part(draft.document)
    berlin = by_account["berlin"][0].document
    assert berlin["period"] == {"start": "2026-03-01T00:00:00+01:00",
                                "end": "2026-04-01T00:00:00+02:00",
                                "time_zone": "Europe/Berlin"}
    bundle = [line for line in berlin["lines"] if line.get("plan") == "vps-s-bundle"]
    assert {line["intervals"] for line in bundle} == {"360/743"}  # 15 days of 743 hours
    assert [line["kind"] for line in berlin["lines"]][-1] == "minimum"
    assert by_account["kolkata"][1].document["total"] == "11.76"  # two capped hourly servers

    finalized = await world.billing.finalize_drafts(APRIL_3, actor="test")
    assert len(finalized) == 6
    assert all(f.created for f in finalized)
    numbers = sorted(f.invoice.number or "" for f in finalized)
    # One series per shard, each 1, 2, 3, ... without gaps.
    if len(world.ledger.stores) == 1:
        assert numbers == [f"INV-0-{n:06d}" for n in range(1, 7)]
    else:
        assert numbers == ["INV-0-000001", "INV-0-000002", "INV-0-000003", "INV-0-000004",
                           "INV-0-000005", "INV-1-000001"]
    await assert_ledger_equals_invoices(world)
    assert len(await events(world, "invoice.finalized")) == 6

    # Finalizing the same period again gives the same single invoice and posts nothing.
    berlin_invoice = next(f.invoice for f in finalized if f.invoice.account_id == "berlin")
    store = world.ledger.for_account("berlin")
    chain = [link.hash async for link in store.chain("berlin")]
    again = await world.billing.finalize("berlin", at("2026-03-15T00:00:00+01:00"), MAY_3,
                                         actor="test")
    assert not again.created
    assert again.invoice.stored == berlin_invoice.stored
    assert [link.hash async for link in store.chain("berlin")] == chain
    assert len(await invoices(world, "berlin")) == 1
    assert await world.billing.close(APRIL_3, actor="test", account_ids=["berlin"]) == []

    # A late record of March: rated against March's counter, carried by April's invoice.
    late = [
        record("host-berlin", "net.tx_bytes", 500 * GB, at("2026-03-25T10:00:00+01:00")),
        record("host-berlin", "net.tx_bytes", 450 * GB, at("2026-03-25T10:05:00+01:00")),
    ]
    await world.service.post(late, at("2026-04-05T08:00:00+02:00"))
    [late_event] = await events(world, "usage.late")
    assert late_event["records"] == 2
    assert late_event["period"]["start"] == "2026-03-01T00:00:00+01:00"
    assert late_event["billed_in_period"]["start"] == "2026-04-01T00:00:00+02:00"
    assert berlin_invoice.document == (await world.billing.invoice(berlin_invoice.invoice_id)
                                       ).document
    april = berlin_april()
    await post(world, april)
    [april_draft] = await world.billing.close(MAY_3, actor="test", account_ids=["berlin"])
    adjustments = {
        line["kind"]: line for line in april_draft.document["adjustments"]["lines"]
    }
    march_gb = march.total("net.tx_bytes") / GB
    assert adjustments["late_usage"]["price"] == "egress"
    assert Decimal(adjustments["late_usage"]["amount"]) == (
        graduated_egress(march_gb + 950) - graduated_egress(march_gb)
    ) == Decimal("0.78")
    rates = [Decimal(r) for r in march.rates_mbit()]
    late_rates = [Decimal(r) for r in Traffic(tuple(late)).rates_mbit()]
    assert Decimal(adjustments["remeasured"]["amount"]) == (
        burstable([*rates, *late_rates]) - burstable(rates)
    ) > 0
    for line in adjustments.values():
        assert line["origin_period"]["start"] == "2026-03-01T00:00:00+01:00"
    assert "welcome10" not in {d["coupon"] for d in april_draft.document["discounts"]}
    [april_final] = await world.billing.finalize_drafts(MAY_3, actor="test",
                                                        account_ids=["berlin"])
    assert april_final.invoice.document["adjustments"] == april_draft.document["adjustments"]
    [adjusted] = await events(world, "invoice.adjusted")
    assert adjusted["number"] == berlin_invoice.number
    await assert_ledger_equals_invoices(world)

    # Beyond the maximum lateness: quarantined with its reason, then released, billed once.
    stale = record("host-berlin", "net.tx_bytes", 80 * GB, at("2026-03-28T10:00:00+01:00"))
    reason = "window ended more than 30 days ago (the maximum lateness)"
    assert await quarantine_records(world.service, [stale], {stale.id: reason}, MAY_3) == {
        stale.id: Outcome.ACCEPTED
    }
    assert await quarantine_records(world.service, [stale], {stale.id: reason}, MAY_3) == {
        stale.id: Outcome.DUPLICATE
    }
    [held] = await world.billing.quarantined()
    assert (held.record, held.account_id, held.reason) == (stale, "berlin", reason)
    assert await world.receivable("berlin") == sum(
        (i.total for i in await invoices(world, "berlin")), Decimal(0)
    )
    released = await world.billing.release([stale.id], MAY_3 + 1, actor="test")
    assert (released.accepted, released.duplicate) == (1, 0)
    assert await world.billing.quarantined() == []
    with pytest.raises(NotFound):
        await world.billing.release([stale.id], MAY_3 + 2, actor="test")
    assert await world.service.post([stale], MAY_3 + 3) == {stale.id: Outcome.DUPLICATE}
    [may] = await world.billing.close(JUNE_3, actor="test", account_ids=["berlin"])
    [carried] = [line for line in may.document["adjustments"]["lines"]
                 if line["kind"] == "late_usage"]
    before = march_gb + 950
    assert Decimal(carried["amount"]) == graduated_egress(before + 80) - graduated_egress(before)
    assert carried["origin_period"]["start"] == "2026-03-01T00:00:00+01:00"
    await world.billing.finalize_drafts(JUNE_3, actor="test", account_ids=["berlin"])
    await assert_ledger_equals_invoices(world)

    # Credit notes correct an invoice; they never exceed it.
    note = await world.billing.credit(
        berlin_invoice.number or "", reason="outage on 20 March", amount=Decimal("10.00"),
        now_us=JUNE_3, actor="test",
    )
    assert note.document["total"] == "11.90"  # 10.00 plus 19 % VAT
    rest = await world.billing.credit(berlin_invoice.number or "", reason="goodwill",
                                      amount=None, now_us=JUNE_3, actor="test")
    assert Decimal(rest.document["total"]) == berlin_invoice.total - Decimal("11.90")
    with pytest.raises(Conflict):
        await world.billing.credit(berlin_invoice.number or "", reason="again", amount=None,
                                   now_us=JUNE_3, actor="test")
    assert len(await events(world, "invoice.credited")) == 2
    await assert_ledger_equals_invoices(world)
    audit = await world.ledger.control.audit_rows(from_us=0, to_us=2**62, after_seq=0,
                                                  limit=None)
    actions = {row.action for row in audit}
    assert {"invoice.close", "invoice.finalize", "invoice.credit", "quarantine.release"} <= actions


async def _raw(store: LedgerStore, sql: str) -> None:
    if isinstance(store, SqliteLedger):
        conn = sqlite3.connect(store.path)
        try:
            conn.execute(sql)
        finally:
            conn.close()
    else:
        assert isinstance(store, PostgresLedger)
        conn2 = await asyncpg.connect(store.dsn)
        try:
            await conn2.execute(sql)
        finally:
            await conn2.close()


async def test_a_finalized_invoice_never_changes(world1: World) -> None:
    world = world1
    await post(world, kolkata_week())
    # finalize_drafts finalizes what close stored: nothing yet
    assert await world.billing.finalize_drafts(APRIL_3, actor="test", account_ids=["kolkata"]) == []
    await world.billing.close(APRIL_3, actor="test", account_ids=["kolkata"])
    done = await world.billing.finalize_drafts(APRIL_3, actor="test", account_ids=["kolkata"])
    invoice = done[0].invoice
    store = world.ledger.for_account("kolkata")
    refusal = (sqlite3.IntegrityError, asyncpg.InsufficientPrivilegeError)
    for sql in (
        f"UPDATE invoices SET total = 0 WHERE invoice_id = '{invoice.invoice_id}'",
        f"UPDATE invoices SET status = 'draft', number = NULL"
        f" WHERE invoice_id = '{invoice.invoice_id}'",
        f"DELETE FROM invoices WHERE invoice_id = '{invoice.invoice_id}'",
        "DELETE FROM period_postings",
        "UPDATE number_series SET last = last - 1",
    ):
        with pytest.raises(refusal, match="meterd"):
            await _raw(store, sql)
    if isinstance(store, PostgresLedger):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await _raw(store, "TRUNCATE invoices")
    assert (await world.billing.invoice(invoice.number or "")).stored == invoice.stored
    # A later close leaves it alone, and a period before it cannot be finalized now.
    assert all(d.invoice_id != invoice.invoice_id
               for d in await world.billing.close(MAY_3, actor="test"))
    with pytest.raises(Conflict, match="before its first finalized invoice"):
        await world.billing.finalize("kolkata", at("2026-02-24T00:00:00+05:30"), MAY_3,
                                     actor="test")
    assert (await verify_ledger(list(world.ledger.stores))).ok


async def test_verify_finds_an_invoice_changed_behind_its_back(world1: World) -> None:
    world = world1
    await post(world, kolkata_week())
    await world.billing.close(APRIL_3, actor="test", account_ids=["kolkata"])
    [done, *_] = await world.billing.finalize_drafts(APRIL_3, actor="test",
                                                     account_ids=["kolkata"])
    store = world.ledger.for_account("kolkata")
    document = dict(done.invoice.document, total="0.01")
    text = json.dumps(document).replace("'", "''")
    sql = f"UPDATE invoices SET document = '{text}' WHERE invoice_id = '{done.invoice.invoice_id}'"
    if isinstance(store, SqliteLedger):
        conn = sqlite3.connect(store.path)
        conn.execute("DROP TRIGGER invoices_finalized_no_update")
        conn.execute(sql)
        conn.commit()
        conn.close()
    else:
        assert isinstance(store, PostgresLedger)
        conn2 = await asyncpg.connect(store.dsn)
        await conn2.execute("SET session_replication_role = replica")
        await conn2.execute(sql)
        await conn2.close()
    report = await verify_ledger(list(world.ledger.stores))
    assert any("does not match its digest" in p for p in report.problems), report.problems
    assert any("the ledger holds" in p for p in report.problems), report.problems


async def test_periods_are_finalized_in_order_and_after_their_grace(world1: World) -> None:
    world = world1
    await post(world, berlin_march())
    with pytest.raises(Conflict, match="can be finalized from 2026-04-03T00:00:00\\+02:00"):
        await world.billing.finalize("berlin", at("2026-03-20T00:00:00+01:00"),
                                     at("2026-04-02T23:00:00+02:00"), actor="test")
    with pytest.raises(Conflict, match="finalize that period first"):
        await world.billing.finalize("berlin", at("2026-04-20T00:00:00+02:00"), JUNE_3,
                                     actor="test")
    assert await world.billing.invoices(InvoiceQuery()) == []
