"""The embedded ledger under ingest with REST API reads running alongside.

Run from the repository root::

    .venv/bin/python -m bench.sqlite_reads_bench            # about a minute
    .venv/bin/python -m bench.sqlite_reads_bench --help

In process, on a real SQLite file in a temporary folder: ``LedgerService.post`` of
``--batches`` batches of ``--batch`` records (one host, one account, two priced
metrics), back to back, timed from the first post to the last commit. Three ways:

1. **ingest alone**;
2. **with reads, read connection**: ``--readers`` coroutines read in a loop what the
   dashboard's account view reads (balances, usage per hour, the first journal page,
   the revenue report) through the store as it is: a read-only connection on a thread
   of its own;
3. **with reads, writer thread**: the same reads sent to the writer's connection and
   thread, between the statements of the unit of work in progress (the store's reads
   before they had a connection of their own; they could see uncommitted rows).

Each is run ``--rounds`` times, interleaved, on a fresh file; the median is printed
with the spread. Figures on a shared two-core machine are noisy: compare within one
run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from collector.ledger.service import LedgerService, ShardedLedger
from collector.ledger.sharding import ShardMap
from collector.ledger.sqlite_store import SqliteLedger, _DecimalSum
from collector.ledger.store import UsageQuery
from common.ids import new_id
from common.records import UsageRecord
from tests.ledger.helpers import T0, prices, router

MODES = ("ingest alone", "with reads, read connection", "with reads, writer thread")


class WriterThreadReads(SqliteLedger):
    """Reads on the writer's connection and thread, as the store did before."""

    async def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        def fetch() -> list[tuple[Any, ...]]:
            self.conn.create_aggregate("meterd_dsum", 1, _DecimalSum)  # type: ignore[arg-type]
            return self.conn.execute(sql, params).fetchall()

        return await self._run(fetch)


def batch(n: int, size: int) -> list[UsageRecord]:
    at = T0 + n * 10_000_000
    return [
        UsageRecord(
            id=new_id(), host_id="host-a",
            metric="net.tx_bytes" if i % 2 else "cpu.seconds",
            quantity=Decimal(1_000_000 + i), unit="bytes" if i % 2 else "seconds",
            start_us=at + i, end_us=at + i + 10_000_000, seq=n * size + i,
        )
        for i in range(size)
    ]


async def reader(store: SqliteLedger, stop: asyncio.Event, counts: list[int]) -> None:
    usage = UsageQuery(bucket="hour", from_us=0, to_us=2**62, account_id="acme", limit=1000)
    while not stop.is_set():
        await store.balances("acme")
        await store.usage_series(usage)
        await store.journal_page("acme", from_us=0, to_us=2**62, after_seq=0, limit=100)
        await store.revenue(0, 2**62)
        counts[0] += 4


async def one_run(mode: str, path: Path, batches: int, size: int, readers: int
                  ) -> tuple[float, float]:
    """Records per second posted, and reads per second answered meanwhile."""
    kind = WriterThreadReads if mode == MODES[2] else SqliteLedger
    store = await kind.open(path)
    try:
        service = LedgerService(ShardedLedger([store], ShardMap.even(1)), router(), prices())
        work = [batch(n, size) for n in range(batches)]
        await service.post(batch(batches, size), T0 + 1)  # warm up: tables and counters
        stop = asyncio.Event()
        counts = [0]
        tasks = [asyncio.create_task(reader(store, stop, counts))
                 for _ in range(readers if mode != MODES[0] else 0)]
        start = time.perf_counter()
        for records in work:
            await service.post(records, T0 + 1)
        elapsed = time.perf_counter() - start
        stop.set()
        await asyncio.gather(*tasks)
        return batches * size / elapsed, counts[0] / elapsed
    finally:
        await store.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=200, help="batches posted per run")
    parser.add_argument("--batch", type=int, default=200, help="records per batch")
    parser.add_argument("--readers", type=int, default=4, help="concurrent reading loops")
    parser.add_argument("--rounds", type=int, default=5, help="runs of each way")
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="meterd-bench-") as tmp:
        for r in range(args.rounds):
            for m, mode in enumerate(MODES):
                path = Path(tmp) / f"ledger-{r}-{m}.db"
                results[mode].append(
                    await one_run(mode, path, args.batches, args.batch, args.readers)
                )
    print(f"{args.batches} batches x {args.batch} records, {args.readers} readers,"
          f" {args.rounds} rounds (median, min-max)")
    for mode, runs in results.items():
        ingest = [r[0] for r in runs]
        reads = [r[1] for r in runs]
        line = (f"{mode:30} ingest {statistics.median(ingest):8,.0f} records/s"
                f" ({min(ingest):,.0f}-{max(ingest):,.0f})")
        if mode != MODES[0]:
            line += (f"   reads {statistics.median(reads):6,.0f}/s"
                     f" ({min(reads):,.0f}-{max(reads):,.0f})")
        print(line)


if __name__ == "__main__":
    asyncio.run(main())
