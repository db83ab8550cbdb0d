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
import json
import re
import sqlite3
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg

from tests.harness import CollectorProcess, meterd
from tests.reliability.faults import AgentProcess, DeadLetterRow, Key, canonical_labels


@dataclass(frozen=True)
class LedgerRow:
    account: str
    host: str
    metric: str
    labels: str
    quantity: Decimal
    start_us: int
    end_us: int


@dataclass(frozen=True)
class LedgerView:
    records: dict[str, LedgerRow]
    held: dict[str, str]  # record id -> host


def read_sqlite_ledger(path: Path) -> LedgerView:
    db = sqlite3.connect(path, timeout=30)
    try:
        rows = db.execute(
            "SELECT record_id, account_id, host_id, metric, labels, quantity, start_us, end_us"
            " FROM records"
        ).fetchall()
        held = db.execute("SELECT record_id, host_id FROM held").fetchall()
    finally:
        db.close()
    return LedgerView(
        {r[0]: LedgerRow(r[1], r[2], r[3], canonical_labels(r[4]), Decimal(r[5]), r[6], r[7])
         for r in rows},
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
                    " quantity::text, start_us, end_us FROM records"
                ):
                    assert r[0] not in records, f"record {r[0]} on two shards"
                    records[r[0]] = LedgerRow(r[1], r[2], r[3], canonical_labels(r[4]),
                                              Decimal(r[5]), r[6], r[7])
                for r in await conn.fetch("SELECT record_id, host_id FROM held"):
                    held[r[0]] = r[1]
            finally:
                await conn.close()
        return LedgerView(records, held)

    return asyncio.run(read())


_TOKENS: dict[str, str] = {}


def api_token(config: Path) -> str:
    """An operator token for the collector configured by ``config`` (made once)."""
    key = str(config.resolve())
    if key not in _TOKENS:
        made = meterd("token", "create", "--config", str(config), "--name", "reliability",
                      "--role", "operator")
        assert made.returncode == 0, made.stdout + made.stderr
        _TOKENS[key] = made.stdout.strip().splitlines()[-1]
    return _TOKENS[key]


def rest_get(collector: CollectorProcess, path: str) -> Any:
    """GET ``path`` from the collector's REST API, authenticated."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{collector.api_port}{path}",
        headers={"Authorization": f"Bearer {api_token(collector.config)}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (loopback)
        return json.load(response)


def rest_usage(collector: CollectorProcess, account: str) -> dict[str, Decimal]:
    try:
        report = rest_get(collector, f"/v1/accounts/{account}/usage")
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"usage of {account}: HTTP {exc.code}") from None
    return {u["metric"]: Decimal(u["quantity"]) for u in report["usage"]}


def reconcile(
    collector: CollectorProcess,
    agents: Sequence[AgentProcess],
    assignments: Mapping[str, str],
    read_ledger: Callable[[], LedgerView],
    *,
    refused: re.Pattern[str] | None = None,
) -> LedgerView:
    """The end of every scenario; the collector is running and the agents are stopped
    with empty spools. ``refused`` matches the reasons the collector's policy may give
    for refusing a record in this scenario (None: it may refuse nothing). Returns the
    ledger it read."""
    sampled: dict[Key, Decimal] = {}
    dead: list[DeadLetterRow] = []
    for a in agents:
        sampled.update(a.counters.sampled())
        view = a.view()
        assert view.records == 0, f"agent {a.host}: {view}"
        dead += a.dead_letters()
    if refused is None:
        assert not dead, f"records refused: {[(d.key, d.reason) for d in dead[:5]]}"
    for d in dead:
        assert refused is not None
        assert refused.search(d.reason), f"refused for an unexpected reason: {d}"
    dead_totals: dict[Key, Decimal] = defaultdict(Decimal)
    for d in dead:
        dead_totals[d.key] += d.quantity
    # What the ledger must hold: everything sampled that was not refused.
    owed = {k: v - dead_totals.get(k, Decimal(0)) for k, v in sampled.items()}
    assert set(dead_totals) <= set(sampled), "dead letters of series never sampled"

    ledger = read_ledger()
    hosts = {a.host for a in agents}
    ours = {i: r for i, r in ledger.records.items() if r.host in hosts}
    got_totals: dict[Key, Decimal] = defaultdict(Decimal)
    for r in ours.values():
        got_totals[(r.host, r.metric, r.labels)] += r.quantity
        assert r.account == assignments[r.host], f"{r} billed to the wrong account"
    diff = {
        k: (got_totals.get(k, Decimal(0)), v, dead_totals.get(k, Decimal(0)))
        for k, v in owed.items()
        if got_totals.get(k, Decimal(0)) != v
    }
    extra = set(got_totals) - set(sampled)
    assert not diff, f"(ledger, sampled - refused, refused) differ: {diff}"
    assert not extra, f"series in the ledger that were never sampled: {extra}"
    both = {d.id for d in dead} & set(ours)
    assert not both, f"{len(both)} records both refused and in the ledger"

    # Per account and metric, as billing sees it: the REST API of the running collector.
    want_rest: dict[str, dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    for (host, metric, labels), q in owed.items():
        if (host, metric, labels) in got_totals:  # a series wholly refused has no row
            want_rest[assignments[host]][metric] += q
    for account, want in sorted(want_rest.items()):
        got = rest_usage(collector, account)
        assert got == dict(want), f"account {account}: ledger {got} != sampled {dict(want)}"

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
