"""Collector processes on one ingest address: refused unless each asks to share it.

gRPC sets SO_REUSEPORT by default: without ``[ingest] share_port`` a second collector
(another ledger, an old configuration) would bind the same address and silently take
half the agents' connections. With it, collectors of one ledger each take a share, one
per core, and the ledger still counts every record once.
"""

from __future__ import annotations

import json
import time
from decimal import Decimal
from pathlib import Path

import pytest

from agent.transport import CollectorLink
from common.ids import new_id
from common.proto import meterd_pb2 as pb
from common.records import UsageRecord
from common.wire import to_proto
from tests.e2e.test_end_to_end import link
from tests.harness import CollectorProcess
from tests.pg import Databases
from tests.reliability.faults import collector_config, free_port


def record(seq: int) -> UsageRecord:
    end = time.time_ns() // 1000 - 1_000_000
    return UsageRecord(id=new_id(), host_id="host-a", metric="cpu.seconds",
                       quantity=Decimal(1), unit="seconds", start_us=end - 10_000_000, end_us=end,
                       seq=seq)


def ingested(collector: CollectorProcess) -> int:
    """Records this process answered ``accepted``, from its log."""
    total = 0
    for line in collector.log.read_text().splitlines():
        if line.startswith("{") and '"batch_ingested"' in line:
            total += int(json.loads(line).get("accepted", 0))
    return total


def test_a_second_collector_on_a_busy_address_refuses_to_start(
    tmp_path: Path, pki_dir: Path
) -> None:
    port = free_port()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = CollectorProcess(
        collector_config(tmp_path / "a", pki_dir, port, assignments={"host-a": "acme"})
    ).start()
    try:
        second = CollectorProcess(
            collector_config(tmp_path / "b", pki_dir, port, assignments={"host-a": "acme"})
        )
        with pytest.raises(RuntimeError, match="collector exited") as info:
            second.start()
        message = str(info.value)
        assert f"ingest.listen: cannot listen on '127.0.0.1:{port}'" in message
        assert "share_port = true" in message
        assert "Traceback" not in message
        assert first.get("/healthz")["status"] == "ok"  # the first one goes on
    finally:
        first.kill()


@pytest.mark.pg
async def test_collectors_that_share_an_address_split_the_agents_and_count_once(
    tmp_path: Path, pki_dir: Path, pg_databases: Databases
) -> None:
    pg_dsn = await pg_databases.create("meterd_port")
    port = free_port()
    collectors = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        config = collector_config(tmp_path / name, pki_dir, port, assignments={"host-a": "acme"},
                                  shards=[pg_dsn], ingest_extra="share_port = true")
        collectors.append(CollectorProcess(config).start())
    try:
        records = [record(seq) for seq in range(1, 41)]
        for rec in records:  # one connection each: the kernel spreads connections
            ch: CollectorLink = link(pki_dir, "host-a", f"127.0.0.1:{port}")
            try:
                response = await ch.push(pb.PushRequest(records=[to_proto(rec)]), 10)
            finally:
                await ch.close()
            assert [a.outcome for a in response.acks] == [pb.ACCEPTED]
        # The same records again, through whichever process: each was posted once.
        ch = link(pki_dir, "host-a", f"127.0.0.1:{port}")
        try:
            again = await ch.push(pb.PushRequest(records=[to_proto(r) for r in records]), 10)
        finally:
            await ch.close()
        assert {a.outcome for a in again.acks} == {pb.DUPLICATE}
        shares = [ingested(c) for c in collectors]
        assert sum(shares) == 40
        assert min(shares) > 0, shares  # both took connections (1 in 2^39 to fail by chance)
        usage = collectors[0].get("/v1/accounts/acme/usage")["usage"]
        assert [(u["metric"], u["quantity"], u["records"]) for u in usage] == [
            ("cpu.seconds", "40", 40)
        ]
    finally:
        for collector in collectors:
            collector.kill()
