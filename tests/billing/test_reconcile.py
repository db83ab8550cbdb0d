"""The ledger equals the invoice to the minor unit, a rounding difference included."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest

from collector.ledger.verify import verify_ledger
from tests.billing.conftest import World, open_world
from tests.billing.scenario import at, record
from tests.billing.test_compose import CPU
from tests.pg import Databases

APRIL_3 = at("2026-04-03T00:00:00+00:00")


@pytest.fixture(params=["sqlite", "pg"])
async def cpu_world(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[World]:
    databases: Databases | None = None
    ledger = 'sqlite_path = "ledger.db"'
    if request.param == "pg":
        databases = Databases(request.getfixturevalue("pg_server"))
        ledger = f'[[ledger.shards]]\ndsn = "{await databases.create()}"'
    (tmp_path / "tariff.toml").write_text(CPU)
    path = tmp_path / "collector.toml"
    path.write_text(
        f'tariff = "tariff.toml"\n\n[ledger]\n{ledger}\n\n[accounts.acme]\ncurrency = "eur"\n'
        'prices = ["cpu"]\n\n[[assignments]]\nhost = "host-a"\naccount = "acme"\n'
    )
    world = await open_world(path)
    try:
        yield world
    finally:
        await world.ledger.close()
        if databases is not None:
            await databases.drop_all()


async def test_a_rounding_difference_is_posted_and_the_ledger_equals_the_invoice(
    cpu_world: World,
) -> None:
    start = at("2026-03-02T00:00:00+00:00")
    seconds = [1_000_000, 1_000_000, 1_000_000, 600_000, 5_000]  # 1000 h + 5000 s
    for n, quantity in enumerate(seconds):
        cpu = record("host-a", "cpu.seconds", quantity, start + n * 3_600_000_000)
        await cpu_world.service.post([cpu], cpu.end_us)
    assert await cpu_world.receivable("acme") == 0  # 0.005 exactly: half-even, 0.00
    result = await cpu_world.billing.finalize("acme", start, APRIL_3, actor="test")
    invoice = result.invoice
    assert invoice.document["total"] == "0.01"
    assert invoice.document["ledger"] == {
        "posted_with_usage": "0.00", "rounding": "0.01", "posted_at_finalize": "0.00"
    }
    assert invoice.stored.rounding_entry_id
    balances = await cpu_world.ledger.for_account("acme").balances("acme")
    assert balances[("rounding", "eur")] == Decimal("-0.01")
    assert await cpu_world.receivable("acme") == invoice.total
    report = await verify_ledger(list(cpu_world.ledger.stores))
    assert report.ok, report.problems
