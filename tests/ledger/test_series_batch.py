"""Records in column form (:class:`common.records.SeriesBatch`, what the collector builds
from an agent's batch) take the ledger's column paths: one routing lookup per window
and series, the COPY text put together per series, pricing, rating and period
attribution read from the columns. Each gives exactly what the same records give one
by one, and a batch posted whole leaves the ledger the records leave."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
from hypothesis import given, settings
from hypothesis import strategies as st

from collector.billing.attribution import attribute_usage
from collector.ledger.postgres_store import (
    COPY_MIN_RECORDS,
    PostgresLedger,
    _batch_copy_text,
    _copy_text,
)
from collector.ledger.posting import price_usage, rate_usage
from collector.ledger.service import Outcome
from collector.ledger.store import Counter
from collector.ledger.verify import verify_ledger
from collector.routing import Assignment, Router
from common.ids import new_id
from common.records import SeriesBatch, UsageRecord, build_series_batch, to_us
from tests.ledger.helpers import T0, prices, router, service
from tests.pg import Databases

OCTOBER = to_us(datetime(2026, 10, 20, 8, 0, tzinfo=UTC))
DECEMBER = to_us(datetime(2026, 12, 1, 0, 0, tzinfo=UTC))
STARTS = (OCTOBER, T0, T0 + 10_000_000, DECEMBER)
UNITS = {"net.tx_bytes": "bytes", "cpu.seconds": "seconds", "disk.read_bytes": "bytes"}
LABELS: tuple[dict[str, str], ...] = (
    {}, {"cgroup": "/vm/1"}, {"cgroup": "/vm/2"}, {"path": "C:\\disk", "cgroup": "/vm/1"},
)
# Plain decimal text as agents send it, canonical or not (trailing zeros).
QUANTITIES = ("0", "1", "1.50", "0.000", "12.340", "1000000000", "999999.999999")


def make_batch(host: str, table: Sequence[tuple[str, str, dict[str, str]]],
               rows: Sequence[tuple[int, str, int, int]]) -> SeriesBatch:
    batch = build_series_batch(
        host,
        [str(uuid.uuid4()) for _ in rows],  # in no particular order
        [k for k, _, _, _ in rows],
        table,
        [q for _, q, _, _ in rows],
        [s for _, _, s, _ in rows],
        [s + 10_000_000 for _, _, s, _ in rows],
        [n for _, _, _, n in rows],
    )
    assert batch is not None
    return batch


@st.composite
def batches(draw: st.DrawFn, host: str = "host-a", max_size: int = 40) -> SeriesBatch:
    metrics = st.sampled_from(sorted(UNITS))
    table = draw(st.lists(
        st.tuples(metrics, st.sampled_from(LABELS)).map(lambda m: (m[0], UNITS[m[0]], m[1])),
        min_size=1, max_size=4,
    ))
    rows = draw(st.lists(
        st.tuples(
            st.integers(0, len(table) - 1), st.sampled_from(QUANTITIES),
            st.sampled_from(STARTS), st.integers(0, 2**63 - 1),
        ),
        min_size=1, max_size=max_size,
    ))
    return make_batch(host, table, rows)


def by_id(records: Sequence[UsageRecord]) -> list[UsageRecord]:
    return sorted(records, key=lambda r: r.id)


@given(batches(), st.sampled_from(["acme", "tab\there", "back\\slash"]))
def test_the_copy_text_of_a_batch_is_that_of_its_records(batch: SeriesBatch, account: str) -> None:
    entry = new_id()
    assert _batch_copy_text(batch, account, entry, T0) == _copy_text(
        by_id(list(batch)), account, entry, T0
    )


@given(batches())
def test_a_batch_is_priced_and_rated_as_its_records_are(batch: SeriesBatch) -> None:
    records = list(batch)
    assert price_usage("acme", batch, prices()) == price_usage("acme", records, prices())
    counters = {
        key: Counter(quantity=key.period_start_us % 7 * 1000, amount=key.period_start_us % 3)
        for key in price_usage("acme", records, prices()).keys
    }
    rated = [
        rate_usage(entry_id="e", account_id="acme", records=form, prices=prices(),
                   counters=counters, now_us=T0)
        for form in (batch, records)
    ]
    assert rated[0] == rated[1]


class Recorded:
    """A transaction that notes what the attribution writes, with given finalized periods."""

    def __init__(self, finalized: list[int]) -> None:
        self.finalized = finalized
        self.calls: list[tuple[Any, ...]] = []

    async def lock_account(self, account_id: str) -> None:
        self.calls.append(("lock_account", account_id))

    async def finalized_periods(self, account_id: str, from_us: int) -> list[int]:
        # Finalizing locks the chain head first: asked without it, the answer could
        # change before the usage commits, and the usage land in a finalized period.
        assert ("lock_account", account_id) in self.calls
        self.calls.append(("finalized_periods", account_id, from_us))
        return [p for p in self.finalized if p >= from_us]

    async def insert_period_postings(self, rows: Sequence[object]) -> None:
        self.calls.append(("insert_period_postings", list(rows)))

    async def emit(self, kind: str, account_id: str, data: object) -> None:
        self.calls.append(("emit", kind, account_id, data))


@settings(max_examples=50)
@given(batches(), st.sampled_from([[], [to_us(datetime(2026, 10, 1, tzinfo=UTC))]]))
async def test_a_batch_is_attributed_to_periods_as_its_records_are(
    batch: SeriesBatch, finalized: list[int]
) -> None:
    """With October finalized, October's records are late: billed in November, each
    carried with its own period, and told in a usage.late event."""
    records = list(batch)
    keys = price_usage("acme", records, prices()).keys
    after = {key: Counter(quantity=1, amount=key.period_start_us % 5 + 1) for key in keys}
    seen = []
    for form in (batch, records):
        tx = Recorded(finalized)
        await attribute_usage(
            tx,  # type: ignore[arg-type]
            prices(), account_id="acme", entry_id="e", priced=keys, before={}, after=after,
            records=form, now_us=T0,
        )
        seen.append(tx.calls)
    assert seen[0] == seen[1]


# Assignments of host-a that may name a cgroup of LABELS and start at one of STARTS.
assignments = st.lists(
    st.builds(
        Assignment, st.just("host-a"), st.sampled_from(["acme", "initech", "globex"]),
        st.sampled_from((0, *STARTS)), st.sampled_from((STARTS[1], STARTS[3], 2**62)),
        st.sampled_from(["", "/vm/1", "/vm/2"]),
    ).filter(lambda a: a.start_us < a.end_us),
    max_size=4,
)


@settings(max_examples=200)
@given(batches(), assignments)
def test_a_batch_goes_whole_exactly_when_its_records_have_one_account(
    batch: SeriesBatch, extra: list[Assignment]
) -> None:
    """The lookups over every window start and label set of a batch decide as the
    records' own accounts do, whatever assignments cover which cgroups and when."""
    rt = Router(extra)
    owners = {rt.account_for(r) for r in batch}
    expected = next(iter(owners)) if len(owners) == 1 else None
    assert service([], rt)._one_account(batch) == expected
    assert rt.accounts_at("host-a", set(batch.starts_us), batch.labels) >= owners


def test_a_batch_goes_whole_only_to_the_one_account_that_holds_all_of_it() -> None:
    table = [("net.tx_bytes", "bytes", {"cgroup": "/vm/1"}),
             ("net.tx_bytes", "bytes", {"cgroup": "/vm/2"})]
    batch = make_batch("host-a", table, [(0, "1", T0, 1), (1, "1", T0, 2)])
    whole = service([], router())
    assert whole._one_account(batch) == "acme"
    split = service([], router(Assignment("host-a", "initech", cgroup="/vm/2")))
    assert split._one_account(batch) is None  # routed record by record
    later = service([], router(Assignment("host-a", "initech", start_us=T0 + 1, cgroup="/vm/1")))
    assert later._one_account(batch) == "acme"
    unassigned = make_batch("host-z", table, [(0, "1", T0, 1)])
    assert whole._one_account(unassigned) is None


async def ledger_rows(dsn: str) -> dict[str, list[tuple[Any, ...]]]:
    conn = await asyncpg.connect(dsn)
    try:
        return {
            "records": [tuple(r) for r in await conn.fetch(
                "SELECT record_id, account_id, host_id, metric, unit, quantity::text, start_us,"
                " end_us, seq, labels::text FROM records ORDER BY record_id")],
            "postings": [tuple(r) for r in await conn.fetch(
                "SELECT j.account_id, j.records_digest, p.ledger_account, p.currency,"
                " p.amount::text FROM postings p JOIN journal j USING (entry_id)"
                " ORDER BY 1, 2, 3, 4")],
            "counters": [tuple(r) for r in await conn.fetch(
                "SELECT account_id, price_id, period_start_us, quantity::text, amount::text"
                " FROM counters ORDER BY 1, 2, 3")],
            "period_postings": [tuple(r) for r in await conn.fetch(
                "SELECT account_id, price_id, period_start_us, origin_start_us, amount::text"
                " FROM period_postings ORDER BY 1, 2, 3, 4, 5")],
            "held": [tuple(r) for r in await conn.fetch(
                "SELECT record_id, host_id, record FROM held ORDER BY 1")],
        }
    finally:
        await conn.close()


async def test_a_batch_posted_whole_leaves_the_ledger_its_records_leave(
    pg_databases: Databases,
) -> None:
    """The same records, once as a batch and once as records, each into a ledger of
    its own: big enough for the COPY, spread over windows, series and label sets, then
    again (every record a duplicate), then a batch of an unassigned host (held)."""
    table = [(m, UNITS[m], labels) for m in sorted(UNITS) for labels in LABELS]
    rows = [
        (i % len(table), QUANTITIES[i % len(QUANTITIES)], STARTS[1 + i % 3], i)
        for i in range(COPY_MIN_RECORDS + 37)
    ]
    batch = make_batch("host-a", table, rows)
    stray = make_batch("host-z", table, rows[:5])
    seen = []
    for form in (batch, list(batch)):
        dsn = await pg_databases.create()
        store = await PostgresLedger.open(dsn)
        try:
            svc = service([store])
            outcomes = await svc.post(form, T0)
            assert outcomes == dict.fromkeys(batch.ids, Outcome.ACCEPTED)
            again = await svc.post(form, T0 + 1)
            assert again == dict.fromkeys(batch.ids, Outcome.DUPLICATE)
            held = await svc.post(stray if form is batch else list(stray), T0)
            assert held == dict.fromkeys(stray.ids, Outcome.HELD)
            report = await verify_ledger([store], svc.prices)
            assert report.ok, report.problems
            seen.append(await ledger_rows(dsn))
        finally:
            await store.close()
    assert len(seen[0]["records"]) == len(rows)
    assert seen[0] == seen[1]
