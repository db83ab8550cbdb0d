"""The first usage of a period, posted by two collectors at once, is counted whole."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import asyncpg

from collector.ledger.postgres_store import PostgresLedger
from collector.ledger.verify import verify_ledger
from tests.ledger.helpers import T0, receivable, record, service
from tests.pg import Databases


async def test_concurrent_first_batches_of_a_period_add_up_on_one_counter(
    pg_databases: Databases,
) -> None:
    dsn = await pg_databases.create()
    first = await PostgresLedger.open(dsn, name="c1")
    second = await PostgresLedger.open(dsn, name="c2")
    try:
        svc1, svc2 = service([first]), service([second])
        # 40 different one-record batches of 1 GB egress (0.013 EUR each), all of the
        # same account, price and period, none of whose counter exists yet; posted at
        # once through two collectors, so many transactions rate the period's first usage
        # at the same time.
        batches = [[record(quantity="1000000000", seq=i)] for i in range(40)]
        await asyncio.gather(
            *(svc.post(b, T0) for i, b in enumerate(batches) for svc in [(svc1, svc2)[i % 2]])
        )
        conn = await asyncpg.connect(dsn)
        try:
            counted = await conn.fetchval(
                "SELECT quantity FROM counters WHERE account_id = 'acme' AND price_id = 'egress'"
            )
        finally:
            await conn.close()
        assert counted == Decimal(40 * 10**9)
        # The postings telescope to the rounded amount of the whole: 40 * 0.013 = 0.52.
        assert await receivable(svc1, "acme") == Decimal("0.52")
        report = await verify_ledger([first])
        assert report.ok, report.problems
    finally:
        await first.close()
        await second.close()
