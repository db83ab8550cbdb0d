"""``ledger verify`` rebuilds each running counter from the records it counts.

Counters are kept per account, price and billing period; a metric rated by two prices
has two counters holding the same quantity. A counter changed, removed or made up
behind the ledger's back is named, on the SQLite file and on PostgreSQL.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from collector.ledger.postgres_store import PostgresLedger
from collector.ledger.service import LedgerService
from collector.ledger.sqlite_store import SqliteLedger
from collector.ledger.store import LedgerStore
from collector.ledger.verify import verify_ledger
from collector.pricing import AccountPrices, AccountTerms
from collector.rating.tariff import parse_tariff_text
from tests.ledger.helpers import T0, TARIFF, open_stores, record, service
from tests.pg import Databases

# A second price on the egress metric: each of the two keeps its own counter.
TRANSIT = """
[[prices]]
id = "transit"
product = "Transit"
currency = "eur"
metric = "net.tx_bytes"
unit = "GB"
billing_scheme = "per_unit"
unit_amount_decimal = "0.002"
recurring = { interval = "month", usage_type = "metered", aggregate_usage = "sum" }
"""

NEXT_MONTH = T0 + 30 * 86_400 * 1_000_000


@pytest.fixture(params=["sqlite", pytest.param("pg", marks=pytest.mark.pg)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LedgerStore]:
    databases = None if request.param == "sqlite" else Databases(
        request.getfixturevalue("pg_server")
    )
    [opened] = await open_stores(request.param, tmp_path, databases)
    try:
        yield opened
    finally:
        await opened.close()
        if databases is not None:
            await databases.drop_all()


async def posted(store: LedgerStore) -> LedgerService:
    svc = service([store])
    svc.prices = AccountPrices(
        parse_tariff_text(TARIFF + TRANSIT, "tariff.toml"),
        {"acme": AccountTerms("eur"), "globex": AccountTerms("eur")},
    )
    for i in range(3):
        await svc.post(
            [
                record("host-a", quantity=str(10**9 + i), seq=3 * i),
                record("host-a", metric="cpu.seconds", quantity="3600.5", seq=3 * i + 1),
                record("host-b", quantity="7", at_us=NEXT_MONTH, seq=i),
            ],
            T0 + i,
        )
    return svc


async def tamper(store: LedgerStore, sql: str) -> None:
    """Change the counters table directly, as a superuser could."""
    if isinstance(store, SqliteLedger):
        with sqlite3.connect(store.path) as conn:
            conn.execute(sql)
        return
    assert isinstance(store, PostgresLedger)
    conn = await asyncpg.connect(store.dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def test_every_counter_equals_the_records_it_counts(store: LedgerStore) -> None:
    svc = await posted(store)
    report = await verify_ledger([store], svc.prices)
    assert report.ok, report.problems
    # acme: egress, transit (same records) and cpu; globex: egress and transit.
    assert report.counters == 5


@pytest.mark.parametrize(
    ("sql", "finding"),
    [
        (
            "UPDATE counters SET quantity = quantity + 1 WHERE price_id = 'transit'"
            " AND account_id = 'acme'",
            "account acme price transit period 2026-11-01T00:00:00Z: running counter holds"
            " 3000000004 but its records sum to 3000000003",
        ),
        (
            "DELETE FROM counters WHERE price_id = 'cpu'",
            "account acme price cpu period 2026-11-01T00:00:00Z: running counter missing,"
            " its records sum to 10801.5",
        ),
        (
            "INSERT INTO counters VALUES ('globex', 'cpu', 0, 42, 0)",
            "account globex price cpu period 1970-01-01T00:00:00Z: running counter holds 42"
            " but no record counts towards it",
        ),
    ],
)
async def test_a_counter_changed_behind_the_ledgers_back_is_named(
    store: LedgerStore, sql: str, finding: str
) -> None:
    svc = await posted(store)
    await tamper(store, sql)
    report = await verify_ledger([store], svc.prices)
    assert [p.split("] ", 1)[1] for p in report.problems] == [finding]
