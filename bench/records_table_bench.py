"""What each part of the PostgreSQL records table costs an ingested record.

Run from the repository root (PostgreSQL reachable as ``--pg``, a role that may create
databases)::

    .venv/bin/python -m bench.records_table_bench          # about a minute

The rows are the ledger's own: batches of the ingest benchmark's simulated hypervisor
agents (:mod:`bench.ingest_bench`), checked by :func:`common.records.build_records` and
written as the collector writes them, with :func:`_copy_text` (COPY's text format), one
COPY and one transaction per account batch. Each variant of the table is filled from
empty on one connection; the figure is the CPU time of that connection's PostgreSQL
backend per row, so what the client does costs nothing here. The baseline, measured in
the same run, is the same rows into the ledger's columns with no key and no index.
Variants run in turn, ``--rounds`` times, so a busy neighbour slows every variant
alike; each prints its least and its median cost (on a shared machine the least is the
steadier figure: a neighbour only ever adds time), and its ratio to the baseline's least.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections.abc import Sequence

import asyncpg

from bench.ingest_bench import Host, make_batch, messages_of
from bench.support import machine, process_cpu_ns
from collector.ledger.postgres_store import _RECORD_COLUMNS, SCHEMA, _copy_text
from common.ids import new_id
from common.records import UsageRecord, build_records

# The ledger's records table, as created (collector.ledger.postgres_store.SCHEMA): its
# key, and no other index (the usage reads use the usage sums).
LEDGER_DDL = SCHEMA[SCHEMA.index("CREATE TABLE IF NOT EXISTS records"):
                    SCHEMA.index("-- Usage sums:")]
# ... and the usage sums its trigger writes for each COPY.
SUMS_DDL = SCHEMA[SCHEMA.index("CREATE TABLE IF NOT EXISTS usage_sums"):
                  SCHEMA.index("-- No index on entry_id")]

_COLUMNS = """record_id TEXT{c}{pk}, account_id TEXT{c} NOT NULL, entry_id TEXT NOT NULL,
host_id TEXT{c} NOT NULL, metric TEXT{c} NOT NULL, unit TEXT{c} NOT NULL,
quantity NUMERIC NOT NULL, start_us BIGINT NOT NULL, end_us BIGINT NOT NULL,
seq BIGINT NOT NULL, labels {labels} NOT NULL, received_us BIGINT NOT NULL"""
_C = ' COLLATE "C"'


def _table(*, collate: bool, pk: bool, labels: str = "JSONB") -> str:
    return _COLUMNS.format(c=_C if collate else "", pk=" PRIMARY KEY" if pk else "",
                           labels=labels)


# name -> (columns, indexes). The first is the baseline; "ledger" is the table as created.
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "no key, no index (baseline)": (_table(collate=False, pk=False), ()),
    "key on record_id": (_table(collate=False, pk=True), ()),
    "key + (account_id, metric)": (_table(collate=False, pk=True), ("(account_id, metric)",)),
    'the same, COLLATE "C"': (_table(collate=True, pk=True), ("(account_id, metric)",)),
    'the same, labels TEXT': (_table(collate=True, pk=True, labels="TEXT"),
                              ("(account_id, metric)",)),
    'key, COLLATE "C", no account index': (_table(collate=True, pk=True), ()),
    "ledger (as created)": ("", ()),
    "ledger, with its usage sums": ("sums", ()),
}


def ledger_rows(agents: int, batches: int, batch: int, seed: int) -> list[bytes]:
    """COPY data of every account batch, as the collector writes it."""
    rng = random.Random(seed)
    start_us = time.time_ns() // 1000 - 6 * 3600 * 1_000_000
    hosts = [Host(f"agent-{i:03d}", f"acct-{i:03d}") for i in range(agents)]
    out = []
    for _ in range(batches):
        for h in hosts:
            messages = messages_of(make_batch(h, batch, start_us, rng))
            records: list[UsageRecord] | None = build_records(
                [m.id for m in messages], [m.host_id for m in messages],
                [m.metric for m in messages], [m.quantity for m in messages],
                [m.unit for m in messages], [m.start_us for m in messages],
                [m.end_us for m in messages], [m.seq for m in messages],
                [m.labels for m in messages],
            )
            assert records is not None
            records.sort(key=lambda r: r.id)
            out.append(_copy_text(records, h.account, new_id(), start_us))
    return out


async def fill(conn: asyncpg.Connection, backend: int, name: str,
               chunks: Sequence[bytes]) -> float:
    """Backend CPU microseconds per row for filling variant ``name`` from empty."""
    columns, indexes = VARIANTS[name]
    await conn.execute("DROP TABLE IF EXISTS records, usage_sums")
    if columns == "sums":
        await conn.execute(LEDGER_DDL + SUMS_DDL)
    elif columns:
        await conn.execute(f"CREATE TABLE records ({columns})")
    else:
        await conn.execute(LEDGER_DDL)
    for index in indexes:
        await conn.execute(f"CREATE INDEX ON records {index}")
    await conn.execute("CHECKPOINT")
    before = process_cpu_ns(backend)
    for data in chunks:
        async with conn.transaction():
            await conn.copy_to_table("records", source=memoryview(data),
                                     columns=_RECORD_COLUMNS, format="text")
    rows: int = await conn.fetchval("SELECT count(*) FROM records")
    if columns == "sums":
        summed = await conn.fetchval("SELECT sum(records) FROM usage_sums")
        if summed != rows:
            raise SystemExit(f"{name}: {summed} of {rows} rows summed")
    if rows != sum(c.count(b"\n") for c in chunks):
        raise SystemExit(f"{name}: {rows} rows stored")
    return (process_cpu_ns(backend) - before) / 1000 / rows


async def run(args: argparse.Namespace) -> None:
    print(f"meterd records-table benchmark: {machine()}")
    chunks = ledger_rows(args.agents, args.batches, args.batch, args.seed)
    print(f"{len(chunks)} account batches of {args.batch} records, {args.rounds} rounds,"
          f" database collation: {f'ICU {args.icu}' if args.icu else 'the server default'}")
    database = f"meterd_bench_{new_id().replace('-', '')[-12:]}"
    admin = await asyncpg.connect(args.pg)
    locale = (f" TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE '{args.icu}'"
              if args.icu else "")
    await admin.execute(f'CREATE DATABASE "{database}"{locale}')
    try:
        conn = await asyncpg.connect(f"{args.pg.rpartition('/')[0]}/{database}")
        try:
            backend = await conn.fetchval("SELECT pg_backend_pid()")
            costs: dict[str, list[float]] = {name: [] for name in VARIANTS}
            for _ in range(args.rounds):
                for name in VARIANTS:
                    costs[name].append(await fill(conn, backend, name, chunks))
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()
    base = min(costs[next(iter(VARIANTS))])
    print(f"\nbackend CPU per row, us: least, median over {args.rounds} rounds")
    print(f"{'variant':<36} {'least':>6} {'median':>7} {'x baseline':>11}")
    for name, values in costs.items():
        least = min(values)
        print(f"{name:<36} {least:>6.2f} {statistics.median(values):>7.2f}"
              f" {least / base:>10.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="admin DSN of the PostgreSQL server (creates and drops a database)")
    parser.add_argument("--agents", type=int, default=32)
    parser.add_argument("--batches", type=int, default=3, help="batches per agent")
    parser.add_argument("--batch", type=int, default=1000, help="records per batch")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--icu", metavar="LOCALE",
                        help="create the database with this ICU locale (en-US, say) as its"
                        " collation, as a server set up for a language would be")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
