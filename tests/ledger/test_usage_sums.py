"""A PostgreSQL shard answers usage reads (totals, the usage API, p95 and max billing, an
account's first usage) from usage sums that a trigger writes for every statement that
inserts records, not from the records themselves. The sums must be what the records
sum to, whichever path inserted them (COPY of a batch or of records, the small batch's
INSERT, a resend's duplicates), must give what the embedded ledger gives from its
records, are append-only, are checked by `meterd ledger verify`, and a ledger from
before them gets them on open."""

from __future__ import annotations

import random
from collections import defaultdict
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from collector.ledger.postgres_store import COPY_MIN_RECORDS, PostgresLedger
from collector.ledger.service import LedgerService
from collector.ledger.sqlite_store import SqliteLedger
from collector.ledger.store import LedgerStore, UsageQuery
from collector.ledger.verify import verify_ledger
from collector.routing import Assignment
from common.records import SeriesBatch, UsageRecord
from tests.ledger.helpers import T0, record, router, service
from tests.ledger.test_contract import _tamper
from tests.ledger.test_series_batch import make_batch
from tests.pg import Databases

HOUR = 3_600_000_000
EVER = (0, 2**62)


def scenario(seed: int) -> list[list[UsageRecord] | SeriesBatch]:
    """Calls as collectors make them: large batches in column form and as records (both
    COPY), small ones (INSERT), and resends overlapping what was stored."""
    rng = random.Random(seed)
    metrics = [("net.tx_bytes", "bytes"), ("cpu.seconds", "seconds"), ("disk.read_bytes", "bytes")]
    quantities = ["0", "1", "1.50", "12.340", "1000000000", "999999.999999"]
    calls: list[list[UsageRecord] | SeriesBatch] = []
    seq = 0
    for _ in range(6):
        host = rng.choice(["host-a", "host-b", "host-c"])
        size = rng.choice([3, 40, COPY_MIN_RECORDS + 30])
        start = T0 + rng.randrange(-30, 30) * HOUR
        if rng.random() < 0.5:
            table = [(m, u, {"cgroup": f"/vm/{i}"}) for i, (m, u) in enumerate(metrics)]
            rows = [
                (rng.randrange(len(table)), rng.choice(quantities),
                 start + rng.randrange(4) * 600_000_000, seq + i)
                for i in range(size)
            ]
            calls.append(make_batch(host, table, rows))
        else:
            calls.append([
                record(host, m, rng.choice(quantities), start + rng.randrange(4) * 600_000_000,
                       seq + i)
                for i, (m, _) in enumerate(rng.choice(metrics) for _ in range(size))
            ])
        seq += size
        if rng.random() < 0.5:  # a resend: part of a call stored before, part new
            earlier = list(rng.choice(calls))
            calls.append(earlier[: len(earlier) // 2] + [
                record(host, "net.tx_bytes", "7", start, seq + i) for i in range(5)
            ])
            seq += 5
    return calls


async def reads(store: LedgerStore) -> dict[str, object]:
    found: dict[str, object] = {}
    for account in ("acme", "globex"):
        found[f"usage {account}"] = await store.usage(account)
        async with store.transaction() as tx:
            per_window: dict[tuple[str, int], Decimal] = defaultdict(Decimal)
            for metric, start, quantity in await tx.record_quantities(
                account, ["cpu.seconds", "net.tx_bytes"], *EVER
            ):
                per_window[(metric, start)] += quantity
            found[f"quantities {account}"] = dict(per_window)
            found[f"first {account}"] = await tx.first_usage_us(account)
    for query in (
        UsageQuery("hour", *EVER, limit=10_000),
        UsageQuery("day", *EVER, account_id="acme", metric="net.tx_bytes"),
        UsageQuery("minute", *EVER, host_id="host-c", limit=10_000),
    ):
        found[f"series {query}"] = await store.usage_series(query)
    return found


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_usage_reads_from_sums_equal_the_embedded_ledgers_from_records(
    pg_databases: Databases, tmp_path: Path, seed: int
) -> None:
    pg = await PostgresLedger.open(await pg_databases.create())
    lite = await SqliteLedger.open(tmp_path / "ledger.db")
    try:
        services: list[LedgerService] = [
            service([s], router(Assignment("host-c", "acme"))) for s in (pg, lite)
        ]
        for call in scenario(seed):
            outcomes = [await svc.post(call, T0 + 1) for svc in services]
            assert outcomes[0] == outcomes[1]
        assert await reads(pg) == await reads(lite)
        report = await verify_ledger([pg], services[0].prices)
        assert report.ok, report.problems
        stored = await pg.usage("acme")
        assert sum(u.records for u in stored) > 0
        series = await pg.usage_series(UsageQuery("hour", *EVER))
        assert {type(u.records) for u in stored} | {type(b.records) for b in series} == {int}
    finally:
        await pg.close()
        await lite.close()


async def test_verify_finds_a_usage_sum_changed_or_removed_behind_the_ledgers_back(
    pg_databases: Databases,
) -> None:
    store = await PostgresLedger.open(await pg_databases.create())
    try:
        svc = service([store])
        await svc.post([record(quantity="5", seq=i) for i in range(COPY_MIN_RECORDS)], T0)
        await svc.post([record(metric="cpu.seconds", quantity="2", seq=900)], T0)
        assert (await verify_ledger([store], svc.prices)).ok
        await _tamper(store, "UPDATE usage_sums SET quantity = quantity + 1"
                             " WHERE metric = 'net.tx_bytes'")
        await _tamper(store, "DELETE FROM usage_sums WHERE metric = 'cpu.seconds'")
        problems = (await verify_ledger([store], svc.prices)).problems
        assert len(problems) == 2, problems
        assert any("net.tx_bytes in bytes" in p and "usage sums hold 1001 over 200 records"
                   " but its records sum to 1000 over 200 records" in p
                   for p in problems), problems
        assert any("cpu.seconds in seconds" in p and "usage sums hold nothing but its"
                   " records sum to 2 over 1 records" in p for p in problems), problems
    finally:
        await store.close()


async def test_a_ledger_from_before_usage_sums_gets_them_from_its_records(
    pg_databases: Databases,
) -> None:
    dsn = await pg_databases.create()
    store = await PostgresLedger.open(dsn)
    try:
        svc = service([store])
        await svc.post([record(quantity="3", seq=i) for i in range(COPY_MIN_RECORDS)], T0)
        await svc.post([record("host-b", "cpu.seconds", "1.5", T0 + HOUR, 1)], T0)
        before = (await store.usage("acme"), await store.usage("globex"))
    finally:
        await store.close()
    conn = await asyncpg.connect(dsn)
    try:  # the schema as it was: no sums, records indexed by account
        await conn.execute("DROP TRIGGER records_usage_sums ON records")
        await conn.execute("DROP TABLE usage_sums")
        await conn.execute("CREATE INDEX records_account ON records (account_id, metric)")
    finally:
        await conn.close()
    store = await PostgresLedger.open(dsn)
    try:
        assert (await store.usage("acme"), await store.usage("globex")) == before
        assert before[0][0].records == COPY_MIN_RECORDS
        svc = service([store])
        await svc.post([record(quantity="3", seq=COPY_MIN_RECORDS + i) for i in range(5)], T0)
        assert [u.records for u in await store.usage("acme")] == [COPY_MIN_RECORDS + 5]
        assert (await verify_ledger([store], svc.prices)).ok
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT to_regclass('records_account')") is None
        finally:
            await conn.close()
    finally:
        await store.close()
