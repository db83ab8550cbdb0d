"""Sequence numbers end to end: a spool that compacted during an outage ships with no
gap; a record lost from the spool is reported as a gap; a new spool is a new epoch.

Real spool files, the real shipper over mTLS, a real collector process checking every
second with no grace, and ``meterd collector gaps``.
"""

from __future__ import annotations

import json
import sqlite3
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

from agent.shipper import Shipper, ShipperSettings
from agent.spool import Spool
from common.ids import new_id
from common.records import UsageRecord
from tests.e2e.test_end_to_end import link
from tests.harness import CollectorProcess, collector_config, meterd

SERIES = ("net.tx_bytes", "net.rx_bytes", "disk.read_bytes", "cpu.seconds")


def cycles(first_seq: int, count: int, start_us: int) -> list[list[UsageRecord]]:
    """``count`` sampling cycles of four series, seqs counting up as the sampler's do."""
    out, seq = [], first_seq
    for c in range(count):
        window = start_us + c * 10_000_000
        batch = []
        for metric in SERIES:
            batch.append(UsageRecord(
                id=new_id(), host_id="host-a", metric=metric, quantity=Decimal(c + 1),
                unit="seconds" if metric == "cpu.seconds" else "bytes",
                start_us=window, end_us=window + 10_000_000, seq=seq,
            ))
            seq += 1
        out.append(batch)
    return out


async def ship(spool: Spool, pki: Path, target: str) -> None:
    channel = link(pki, "host-a", target)
    try:
        await Shipper(spool, channel, ShipperSettings(batch_max_records=50), "test").drain()
    finally:
        await channel.close()


def gaps(config: Path) -> tuple[int, dict[str, Any]]:
    """``meterd collector gaps --json``: exit code and host-a's epochs by epoch id."""
    result = meterd("collector", "gaps", "--config", str(config), "--json")
    views = {v["epoch"]: v for v in json.loads(result.stdout) if v["host"] == "host-a"}
    return result.returncode, views


def wait_for_log(collector: CollectorProcess, text: str) -> None:
    deadline = time.monotonic() + 30
    while text not in collector.log.read_text():
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{collector.log.read_text()}"
        time.sleep(0.2)


async def test_compaction_retires_seqs_a_lost_record_is_a_gap_a_new_spool_an_epoch(
    tmp_path: Path, pki_dir: Path
) -> None:
    config = collector_config(tmp_path, pki_dir)
    config.write_text(config.read_text().replace(
        "[ingest]\n",
        "[ingest]\nsequence_gap_grace_seconds = 0\nsequence_check_interval_seconds = 1\n",
    ))
    start_us = time.time_ns() // 1000 - 3_600_000_000
    # An outage: 100 cycles (400 records) into a spool bounded far below their size.
    spool = Spool(tmp_path / "spool.db", max_bytes=16_000)
    for batch in cycles(0, 100, start_us):
        spool.append(batch)
    assert spool.stats().records < 100
    assert spool.has_retired_seqs
    epoch, epoch_start = spool.seq_epoch
    assert epoch_start == 0

    with CollectorProcess(config) as collector:
        await ship(spool, pki_dir, collector.target)
        assert not spool.has_retired_seqs
        wait_for_log(collector, '"sequence_epoch_started"')
        code, views = gaps(config)
        assert code == 0, views
        assert (views[epoch]["watermark"], views[epoch]["missing"]) == (400, 0)

        # A record is lost from the spool behind its back; the ones after it arrive.
        for batch in cycles(400, 5, start_us + 1_000_000_000):
            spool.append(batch)
        with sqlite3.connect(spool.path) as db:
            db.execute("DELETE FROM records WHERE seq = 407")
        await ship(spool, pki_dir, collector.target)
        wait_for_log(collector, '"sequence_gap_detected"')
        code, views = gaps(config)
        assert code == 1
        assert [(g["first"], g["last"]) for g in views[epoch]["gaps"]] == [(407, 407)]

        # The spool is lost: the new one starts a new epoch at seq 0, with no gap.
        spool.close()
        fresh = Spool(tmp_path / "spool-2.db")
        for batch in cycles(0, 3, start_us + 2_000_000_000):
            fresh.append(batch)
        await ship(fresh, pki_dir, collector.target)
        new_epoch = fresh.seq_epoch[0]
        fresh.close()
        code, views = gaps(config)
        assert (views[new_epoch]["watermark"], views[new_epoch]["missing"]) == (12, 0)
        assert views[new_epoch]["gaps"] == []
        assert len(views[epoch]["gaps"]) == 1
    verify = meterd("ledger", "verify", "--config", str(config))
    assert verify.returncode == 0, verify.stdout + verify.stderr
