"""A collector that starts appends the audit rows a stopped billing command left staged
on an account's shard (collector.audit), each once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from collector.audit import AuditLog
from collector.ledger.postgres_store import PostgresLedger
from collector.ledger.service import ShardedLedger
from collector.ledger.sharding import ShardMap
from tests.harness import CollectorProcess
from tests.pg import Databases
from tests.reliability.faults import collector_config, free_port


@pytest.mark.pg
async def test_a_starting_collector_appends_rows_left_staged(
    tmp_path: Path, pki_dir: Path, pg_databases: Databases
) -> None:
    dsns = [await pg_databases.create("meterd_audit") for _ in range(2)]
    stores = [await PostgresLedger.open(dsn, name=f"shard{i}") for i, dsn in enumerate(dsns)]
    ledger = ShardedLedger(stores, ShardMap.even(2))
    audit = AuditLog.for_ledger(ledger)
    try:  # a credit note's transaction committed; its command stopped before the relay
        async with stores[1].transaction() as tx:
            await audit.stage(stores[1], tx, "cli:ops", "invoice.credit", "invoice/INV-9",
                              {"left_to_credit": "20"}, {"credit_note": "CN-1-000001"})
    finally:
        for s in stores:
            await s.close()

    for attempt in range(2):  # a second start finds nothing left to append
        workdir = tmp_path / f"start-{attempt}"
        workdir.mkdir()
        collector = CollectorProcess(
            collector_config(workdir, pki_dir, free_port(), assignments={}, shards=dsns)
        ).start()
        try:
            lines = [json.loads(line) for line in collector.log.read_text().splitlines()
                     if line.startswith("{")]
        finally:
            collector.stop()
        relayed = [line["rows"] for line in lines if line.get("event") == "audit_rows_relayed"]
        assert relayed == ([1] if attempt == 0 else [])

    control = await PostgresLedger.open(dsns[0], name="shard0")
    try:
        rows = await control.audit_rows(from_us=0, to_us=2**62, after_seq=0, limit=None)
    finally:
        await control.close()
    assert [(r.seq, r.action, r.target, r.after) for r in rows] == [
        (1, "invoice.credit", "invoice/INV-9", '{"credit_note":"CN-1-000001"}')
    ]
