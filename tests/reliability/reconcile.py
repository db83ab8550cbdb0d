"""The reconciliation every reliability scenario ends with, and reading the ledger.

:func:`reconcile` proves, for every agent: ledger totals per host, metric and labels,
and per account and metric through the REST API, equal the sampled totals exactly;
the ids the collector acknowledged are exactly the ids in the ledger (nothing
acknowledged missing, nothing posted that no agent sent, nothing held); the spools are
empty with no dead letters; and ``meterd ledger verify`` exits 0. The ledger is read
with plain SQL, not through the stores under test.
"""

from __future__ import annotations

import asyncio
import sqlite3
import urllib.error
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import asyncpg

from tests.harness import CollectorProcess, meterd
from tests.reliability.faults import AgentProcess, Key, canonical_labels


@dataclass(frozen=True)
class LedgerRow:
    account: str
    host: str
    metric: str
    labels: str
    quantity: Decimal


@dataclass(frozen=True)
class LedgerView:
    records: dict[str, LedgerRow]
    held: dict[str, str]  # record id -> host


def read_sqlite_ledger(path: Path) -> LedgerView:
    db = sqlite3.connect(path, timeout=30)
    try:
        rows = db.execute(
            "SELECT record_id, account_id, host_id, metric, labels, quantity FROM records"
        ).fetchall()
        held = db.execute("SELECT record_id, host_id FROM held").fetchall()
    finally:
        db.close()
    return LedgerView(
        {r[0]: LedgerRow(r[1], r[2], r[3], canonical_labels(r[4]), Decimal(r[5])) for r in rows},
        {r[0]: r[1] for r in held},
    )


def read_pg_ledger(dsns: Sequence[str]) -> LedgerView:
    async def read() -> LedgerView:
        records: dict[str, LedgerRow] = {}
        held: dict[str, str] = {}
        for dsn in dsns:
            conn = await asyncpg.connect(dsn)
            try:
                for r in await conn.fetch(
                    "SELECT record_id, account_id, host_id, metric, labels::text,"
                    " quantity::text FROM records"
                ):
                    assert r[0] not in records, f"record {r[0]} on two shards"
                    records[r[0]] = LedgerRow(r[1], r[2], r[3], canonical_labels(r[4]),
                                              Decimal(r[5]))
                for r in await conn.fetch("SELECT record_id, host_id FROM held"):
                    held[r[0]] = r[1]
            finally:
                await conn.close()
        return LedgerView(records, held)

    return asyncio.run(read())


def rest_usage(collector: CollectorProcess, account: str) -> dict[str, Decimal]:
    try:
        report = collector.get(f"/v1/accounts/{account}/usage")
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"usage of {account}: HTTP {exc.code}") from None
    return {u["metric"]: Decimal(u["quantity"]) for u in report["usage"]}


def reconcile(
    collector: CollectorProcess,
    agents: Sequence[AgentProcess],
    assignments: Mapping[str, str],
    read_ledger: Callable[[], LedgerView],
) -> LedgerView:
    """The end of every scenario; the collector is running and the agents are stopped
    with empty spools. Returns the ledger it read."""
    sampled: dict[Key, Decimal] = {}
    for a in agents:
        sampled.update(a.counters.sampled())
        view = a.view()
        assert view.records == 0, f"agent {a.host}: {view}"
        assert view.dead_letters == 0, f"agent {a.host}: {view}"

    # Per account and metric, as billing sees it: the REST API of the running collector.
    want_rest: dict[str, dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    for (host, metric, _), q in sampled.items():
        want_rest[assignments[host]][metric] += q
    for account, want in sorted(want_rest.items()):
        got = rest_usage(collector, account)
        assert got == dict(want), f"account {account}: ledger {got} != sampled {dict(want)}"

    ledger = read_ledger()
    hosts = {a.host for a in agents}
    ours = {i: r for i, r in ledger.records.items() if r.host in hosts}
    got_totals: dict[Key, Decimal] = defaultdict(Decimal)
    for r in ours.values():
        got_totals[(r.host, r.metric, r.labels)] += r.quantity
        assert r.account == assignments[r.host], f"{r} billed to the wrong account"
    diff = {
        k: (got_totals.get(k, Decimal(0)), v)
        for k, v in sampled.items()
        if got_totals.get(k, Decimal(0)) != v
    }
    extra = set(got_totals) - set(sampled)
    assert not diff, f"(ledger, sampled) differ: {diff}"
    assert not extra, f"series in the ledger that were never sampled: {extra}"

    acked: set[str] = set()
    for a in agents:
        acked |= a.acked()
    missing = acked - set(ours)
    assert not missing, f"{len(missing)} acknowledged records missing from the ledger"
    unacked = set(ours) - acked
    assert not unacked, f"{len(unacked)} ledger records that no agent had acknowledged"
    held = {i: h for i, h in ledger.held.items() if h in hosts}
    assert not held, f"{len(held)} records still held"

    verify = meterd("ledger", "verify", "--config", str(collector.config))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "clean" in verify.stdout, verify.stdout
    return ledger
