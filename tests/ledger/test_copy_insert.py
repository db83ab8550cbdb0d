"""Large batches go into PostgreSQL with a COPY, on the expectation that every record is
new; the unique record id still decides: a resend that overlaps stored records, and
two collectors racing with the same large batches, post every record exactly once,
and a transaction lost to a stored record leaves nothing behind."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal

import asyncpg

from collector.ledger.postgres_store import COPY_MIN_RECORDS, PostgresLedger
from collector.ledger.service import Outcome
from collector.ledger.verify import verify_ledger
from collector.routing import Assignment
from common.ids import new_id
from common.records import UsageRecord
from tests.ledger.helpers import T0, receivable, record, router, service
from tests.pg import Databases

SIZE = COPY_MIN_RECORDS + 50


def batch(first_seq: int) -> list[UsageRecord]:
    return [record(quantity="1000000000", seq=first_seq + i) for i in range(SIZE)]


async def test_a_resend_overlapping_stored_records_posts_only_the_new_ones(
    pg_databases: Databases,
) -> None:
    store = await PostgresLedger.open(await pg_databases.create())
    try:
        svc = service([store])
        first = batch(0)
        assert set((await svc.post(first, T0)).values()) == {Outcome.ACCEPTED}
        mixed = first[: SIZE // 2] + batch(SIZE)[: SIZE // 2]
        outcomes = await svc.post(mixed, T0 + 1)
        assert [outcomes[r.id] for r in mixed] == (
            [Outcome.DUPLICATE] * (SIZE // 2) + [Outcome.ACCEPTED] * (SIZE // 2)
        )
        total = SIZE + SIZE // 2
        assert await receivable(svc, "acme") == (Decimal("0.013") * total).quantize(
            Decimal("0.01")
        )
        usage = await store.usage("acme")
        assert sum(u.records for u in usage) == total
        report = await verify_ledger([store], svc.prices)
        assert report.ok, report.problems
    finally:
        await store.close()


async def test_a_shard_transaction_lost_to_a_stored_record_runs_again_whole(
    pg_databases: Databases,
) -> None:
    """acme's records are new and copied first; globex's were stored before, so their
    COPY fails the transaction, acme's entry with it. The transaction runs again: acme
    is posted once, globex's records answer duplicate, and nothing else changed."""
    store = await PostgresLedger.open(await pg_databases.create())
    try:
        svc = service([store])
        globex = [record(host="host-b", seq=i) for i in range(SIZE)]
        assert set((await svc.post(globex, T0)).values()) == {Outcome.ACCEPTED}
        before = await receivable(svc, "globex")
        acme = batch(0)
        outcomes = await svc.post(acme + globex, T0 + 1)
        assert {outcomes[r.id] for r in acme} == {Outcome.ACCEPTED}
        assert {outcomes[r.id] for r in globex} == {Outcome.DUPLICATE}
        per_record = (Decimal("0.013") * SIZE).quantize(Decimal("0.01"))
        assert await receivable(svc, "acme") == per_record
        assert await receivable(svc, "globex") == before == per_record
        assert [len([link async for link in store.chain(a)]) for a in ("acme", "globex")] == [
            1, 1
        ]
        assert sum(u.records for u in await store.usage("acme")) == SIZE
        report = await verify_ledger([store], svc.prices)
        assert report.ok, report.problems
    finally:
        await store.close()


async def test_two_collectors_racing_with_large_batches_post_each_record_once(
    pg_databases: Databases,
) -> None:
    dsn = await pg_databases.create()
    first = await PostgresLedger.open(dsn, name="c1")
    second = await PostgresLedger.open(dsn, name="c2")
    try:
        svc1, svc2 = service([first]), service([second])
        batches = [batch(n * SIZE) for n in range(4)]
        results = await asyncio.gather(*(s.post(b, T0) for b in batches for s in (svc1, svc2)))
        per_record: dict[str, list[str]] = {}
        for outcome in results:
            for record_id, o in outcome.items():
                per_record.setdefault(record_id, []).append(o.value)
        assert len(per_record) == 4 * SIZE
        assert all(sorted(o) == ["accepted", "duplicate"] for o in per_record.values())
        expected = (Decimal("0.013") * 4 * SIZE).quantize(Decimal("0.01"))
        assert await receivable(svc1, "acme") == expected
        report = await verify_ledger([first], svc1.prices)
        assert report.ok, report.problems
    finally:
        await first.close()
        await second.close()


async def test_text_that_copy_escapes_is_stored_exactly(pg_databases: Databases) -> None:
    """Tabs, newlines and backslashes in an account id, and backslash sequences and quotes
    in labels (which refuse control characters), survive the COPY, and the INSERT that
    sends each column as one newline-joined text (a batch too small for the COPY)."""
    account = "odd\taccount\\with\nbreaks"
    labels = {"path": 'C:\\disk\\t"1"\\n\\\\', "ünï": "cödé"}
    store = await PostgresLedger.open(await pg_databases.create())
    try:
        svc = service([store], router(Assignment("host-q", account)))
        records = [
            UsageRecord(
                id=new_id(), host_id="host-q", metric="net.tx_bytes", quantity=Decimal("0.5"),
                unit="bytes", start_us=T0, end_us=T0 + 1, seq=i, labels=labels,
            )
            for i in range(SIZE + 3)
        ]
        assert set((await svc.post(records[:SIZE], T0)).values()) == {Outcome.ACCEPTED}
        assert set((await svc.post(records[SIZE:], T0)).values()) == {Outcome.ACCEPTED}
        conn = await asyncpg.connect(store.dsn)
        try:
            rows = await conn.fetch("SELECT account_id, labels::text, quantity FROM records")
        finally:
            await conn.close()
        assert len(rows) == SIZE + 3
        assert {(r[0], r[2]) for r in rows} == {(account, Decimal("0.5"))}
        assert {json.loads(r[1]) == labels for r in rows} == {True}
    finally:
        await store.close()
