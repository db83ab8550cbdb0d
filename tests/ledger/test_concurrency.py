"""Two collectors posting the same records at the same moment: each is posted once."""

from __future__ import annotations

import asyncio
from decimal import Decimal

from collector.ledger.postgres_store import PostgresLedger
from collector.ledger.service import Outcome
from collector.ledger.verify import verify_ledger
from tests.ledger.helpers import T0, receivable, record, service
from tests.pg import Databases


async def test_same_records_through_two_collectors_post_once(pg_databases: Databases) -> None:
    dsn = await pg_databases.create()
    first = await PostgresLedger.open(dsn, name="c1")
    second = await PostgresLedger.open(dsn, name="c2")
    try:
        svc1, svc2 = service([first]), service([second])
        batches = [
            [record(quantity="1000000000", seq=i * 10 + j) for j in range(10)] for i in range(20)
        ]
        results = await asyncio.gather(*(svc.post(b, T0) for b in batches for svc in (svc1, svc2)))
        per_record: dict[str, list[Outcome]] = {}
        for outcome in results:
            for record_id, o in outcome.items():
                per_record.setdefault(record_id, []).append(o)
        assert len(per_record) == 200
        for outcomes in per_record.values():
            assert sorted(o.value for o in outcomes) == ["accepted", "duplicate"]
        assert await receivable(svc1, "acme") == Decimal("2.60")  # 200 GB * 0.013
        report = await verify_ledger([first])
        assert report.ok, report.problems
    finally:
        await first.close()
        await second.close()
