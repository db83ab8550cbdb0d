"""balance.threshold_crossed for the entries billing posts: a rounding difference and an
invoice at finalize, a credit note; each in the transaction that posts it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from collector.ledger.outbox import BALANCE_THRESHOLD_CROSSED
from collector.ledger.store import InvoiceQuery
from collector.webhooks.state import outbox_after
from tests.billing.conftest import World, open_world
from tests.billing.scenario import at, record
from tests.billing.test_compose import CPU
from tests.pg import Databases

IPV4 = """
[[prices]]
id = "ipv4"
product = "IPv4 address"
currency = "eur"
unit_amount_decimal = "1.00"
recurring = { interval = "month", usage_type = "licensed" }
"""


@pytest.fixture(params=["sqlite", "pg"])
async def world(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[World]:
    """acme: CPU usage (1000 h free, then 0.0036 EUR/h) and an IPv4 add-on at 1.00 EUR a
    month, with receivable thresholds at 0.01 and 0.50 EUR."""
    databases: Databases | None = None
    ledger = 'sqlite_path = "ledger.db"'
    if request.param == "pg":
        databases = Databases(request.getfixturevalue("pg_server"))
        ledger = f'[[ledger.shards]]\ndsn = "{await databases.create()}"'
    (tmp_path / "tariff.toml").write_text(CPU + IPV4)
    path = tmp_path / "collector.toml"
    path.write_text(
        f'tariff = "tariff.toml"\n\n[ledger]\n{ledger}\n\n[accounts.acme]\ncurrency = "eur"\n'
        'prices = ["cpu"]\nbalance_thresholds = ["0.01", "0.50"]\n\n'
        '[[accounts.acme.addons]]\nprice = "ipv4"\n\n'
        '[[assignments]]\nhost = "host-a"\naccount = "acme"\n'
    )
    opened = await open_world(path)
    try:
        yield opened
    finally:
        await opened.ledger.close()
        if databases is not None:
            await databases.drop_all()


async def crossings(world: World) -> list[tuple[str, str, str, str, str]]:
    events = await outbox_after(world.ledger.for_account("acme"), 0, 100)
    return [
        (d["threshold"], d["direction"], d["balance_before"], d["balance"], d["entry_id"])
        for d in (json.loads(e.data) for e in events if e.event_type == BALANCE_THRESHOLD_CROSSED)
    ]


async def test_finalizing_and_crediting_emit_the_thresholds_they_cross(world: World) -> None:
    start = at("2026-03-02T00:00:00+00:00")
    # 1000 h free, then 5000 s at 0.0036 EUR/h: 0.005 exactly, posted as 0.00 (half even).
    for n, quantity in enumerate([1_000_000, 1_000_000, 1_000_000, 600_000, 5_000]):
        cpu = record("host-a", "cpu.seconds", quantity, start + n * 3_600_000_000)
        await world.service.post([cpu], cpu.end_us)
    assert await world.receivable("acme") == 0
    assert await crossings(world) == []

    done = await world.billing.finalize("acme", start, at("2026-04-03T00:00:00+00:00"),
                                        actor="test")
    stored = done.invoice.stored
    assert done.invoice.document["total"] == "1.01"
    assert stored.rounding_entry_id
    # The rounding entry (+0.01) crosses 0.01; the invoice entry (+1.00, the add-on) 0.50.
    assert await crossings(world) == [
        ("0.01", "up", "0.00", "0.01", stored.rounding_entry_id),
        ("0.50", "up", "0.01", "1.01", stored.entry_id),
    ]

    note = await world.billing.credit(done.invoice.number or "", reason="goodwill",
                                      amount=None, now_us=at("2026-04-04T00:00:00+00:00"),
                                      actor="test")
    assert await world.receivable("acme") == 0
    assert (await crossings(world))[2:] == [
        ("0.50", "down", "1.01", "0.00", note.stored.entry_id),
        ("0.01", "down", "1.01", "0.00", note.stored.entry_id),
    ]
    # Finalizing again changes nothing and emits nothing.
    again = await world.billing.finalize("acme", start, at("2026-04-05T00:00:00+00:00"),
                                         actor="test")
    assert not again.created
    assert len(await crossings(world)) == 4
    assert len(await world.billing.invoices(InvoiceQuery(account_id="acme"))) == 1
