"""The first usage of a period, posted by two collectors at once, is counted whole."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import asyncpg
import pytest

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


async def test_a_usage_entry_locks_its_counters_before_its_chain_head(
    pg_databases: Databases,
) -> None:
    """Counters, then the chain head, the order of every posting transaction, also when
    one statement takes both: with the head held elsewhere, a posting waits for it
    holding its counters, never the other way round."""
    dsn = await pg_databases.create()
    ledger = await PostgresLedger.open(dsn, name="c1")
    holder = await asyncpg.connect(dsn)
    probe = await asyncpg.connect(dsn)
    try:
        svc = service([ledger])
        await svc.post([record(quantity="1000000000", seq=1)], T0)  # the head and counter exist
        holder_tx = holder.transaction()
        await holder_tx.start()
        await holder.execute("SELECT 1 FROM chain_heads WHERE account_id = 'acme' FOR UPDATE")
        posting = asyncio.create_task(svc.post([record(quantity="2000000000", seq=2)], T0))
        # The posting's transaction now waits for the head...
        for _ in range(200):
            waiting = await probe.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query LIKE '%chain_heads%' AND pid <> pg_backend_pid()"
            )
            if waiting:
                break
            await asyncio.sleep(0.02)
        assert waiting == 1
        # ... with the counter it touches locked already.
        await probe.execute("SET lock_timeout = '100ms'")
        with pytest.raises(asyncpg.exceptions.LockNotAvailableError):
            await probe.fetchval(
                "SELECT 1 FROM counters WHERE account_id = 'acme' AND price_id = 'egress'"
                " FOR UPDATE"
            )
        await holder_tx.rollback()
        await asyncio.wait_for(posting, 10)
        assert await receivable(svc, "acme") == Decimal("0.04")  # 3 GB at 0.013, rounded
        assert (await verify_ledger([ledger])).ok
    finally:
        await holder.close()
        await probe.close()
        await ledger.close()
