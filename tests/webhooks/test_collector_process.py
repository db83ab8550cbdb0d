"""The collector daemon runs the delivery worker: usage over mTLS crosses a balance
threshold, the event reaches a receiver signed, and the daemon stops cleanly."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc

from collector.config import load_collector_config
from collector.ledger.service import ShardedLedger
from collector.ledger.sharding import ShardMap
from collector.ledger.sqlite_store import SqliteLedger
from collector.webhooks.service import WebhookService
from common.proto import meterd_pb2 as pb
from common.proto import meterd_pb2_grpc as pb_grpc
from common.tls import grpc_channel_credentials
from common.wire import to_proto
from tests.harness import CollectorProcess, collector_config
from tests.ledger.helpers import record
from tests.webhooks.helpers import Receiver, eventually

WEBHOOKS = """
[webhooks]
poll_interval_seconds = "0.05"
backoff_base_seconds = "0.01"
backoff_cap_seconds = "0.05"
"""


async def test_the_collector_delivers_threshold_events(tmp_path: Path, pki_dir: Path) -> None:
    config = collector_config(tmp_path, pki_dir, extra=WEBHOOKS)
    text = config.read_text().replace(
        '[accounts.acme]\ncurrency = "eur"\n',
        '[accounts.acme]\ncurrency = "eur"\nbalance_thresholds = ["0.01", "0.02"]\n',
    )
    config.write_text(text)
    cfg = load_collector_config(config)
    receiver = await Receiver().start()
    ledger = ShardedLedger([await SqliteLedger.open(cfg.path(cfg.raw.ledger.sqlite_path))],
                           ShardMap.even(1))
    try:
        svc = WebhookService(ledger, cfg.raw.webhooks, cfg.path(cfg.raw.webhooks.secrets_key_file))
        created = await svc.create(receiver.url, event_types=["balance.*"], actor="test")
    finally:
        await ledger.close()

    collector = CollectorProcess(config)
    await asyncio.to_thread(collector.start)
    try:
        creds = grpc_channel_credentials(
            pki_dir / "agents" / "host-a.pem", pki_dir / "agents" / "host-a.key",
            pki_dir / "ca.pem",
        )
        async with grpc.aio.secure_channel(collector.target, creds) as channel:
            recent = time.time_ns() // 1000 - 600_000_000
            records = [record(quantity="1000000000", seq=n, at_us=recent + n * 10_000_000)
                       for n in range(2)]
            reply = await pb_grpc.IngestStub(channel).Push(
                pb.PushRequest(records=[to_proto(r) for r in records], agent_version="t"),
                timeout=10,
            )
        assert {a.outcome for a in reply.acks} == {pb.ACCEPTED}

        async def received_both() -> bool:
            return len(receiver.requests) >= 2

        await eventually(received_both, "both threshold events delivered by the collector")
    finally:
        code = await asyncio.to_thread(collector.stop)
        await receiver.stop()
    assert code == 0
    bodies = receiver.verified(created.secret)
    assert [(b["type"], b["account_id"], b["data"]["threshold"]) for b in bodies] == [
        ("balance.threshold_crossed", "acme", "0.01"),
        ("balance.threshold_crossed", "acme", "0.02"),
    ]
    assert '"collector_stopped"' in collector.log.read_text()
