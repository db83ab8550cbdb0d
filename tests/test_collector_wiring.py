"""How the collector daemon wires the REST API: the billing service is built at start-up
(a billing mistake stops it, or refuses a reload, naming file and key), and webhook
changes made through the API wake the delivery worker at once."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from common.proto import meterd_pb2 as pb
from common.proto import meterd_pb2_grpc as pb_grpc
from common.tls import grpc_channel_credentials
from common.wire import to_proto
from tests.harness import CollectorProcess, collector_config, make_api_token, meterd
from tests.ledger.helpers import record
from tests.webhooks.helpers import Receiver, eventually

NO_SUCH_PLAN = '[accounts.acme]\ncurrency = "eur"\n\n[[accounts.acme.plans]]\nplan = "gold"\n'
DAY_US = 86_400_000_000


def with_unknown_plan(config: Path) -> str:
    text = config.read_text()
    assert '[accounts.acme]\ncurrency = "eur"\n' in text
    return text.replace('[accounts.acme]\ncurrency = "eur"\n', NO_SUCH_PLAN)


def test_billing_settings_the_tariff_contradicts_stop_start_up_with_one_line(
    tmp_path: Path, pki_dir: Path
) -> None:
    config = collector_config(tmp_path, pki_dir)
    config.write_text(with_unknown_plan(config))
    ready = tmp_path / "ready.json"
    done = meterd("collector", "run", "--config", str(config), "--ready-file", str(ready),
                  timeout=60)
    assert done.returncode == 1, done.stderr
    assert not ready.exists()
    assert done.stderr.strip().splitlines()[-1] == (
        f"meterd: error: {config}: accounts.acme.plans[0].plan: no plan 'gold' in the tariff"
    )
    assert "Traceback" not in done.stderr


def test_a_reload_with_such_billing_settings_is_refused(tmp_path: Path, pki_dir: Path) -> None:
    config = collector_config(tmp_path, pki_dir)
    with CollectorProcess(config) as collector:
        assert collector.proc is not None
        config.write_text(with_unknown_plan(config))
        collector.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30  # only keeps a broken run from hanging
        while '"reload_refused"' not in collector.log.read_text():
            assert time.monotonic() < deadline, collector.log.read_text()[-2000:]
            time.sleep(0.05)
        refused = [json.loads(line) for line in collector.log.read_text().splitlines()
                   if '"reload_refused"' in line]
        assert "no plan 'gold' in the tariff" in refused[0]["error"]
        # The billing service in force is still the one it started with.
        preview = collector.get("/v1/accounts/acme/invoice-preview")
        assert preview["status"] == "draft"
    assert collector.proc.returncode == 0


def logged(collector: CollectorProcess, event: str, times: int) -> list[dict[str, Any]]:
    """The collector's log lines of ``event``, once there are ``times`` of them."""
    deadline = time.monotonic() + 30  # only keeps a broken run from hanging
    while True:
        lines = [json.loads(line) for line in collector.log.read_text().splitlines()
                 if f'"{event}"' in line]
        if len(lines) >= times:
            return lines
        assert time.monotonic() < deadline, collector.log.read_text()[-2000:]
        time.sleep(0.05)


def test_a_reload_takes_new_ingest_settings_and_warns_of_storage_changes(
    tmp_path: Path, pki_dir: Path
) -> None:
    config = collector_config(tmp_path, pki_dir)
    text = config.read_text()
    with CollectorProcess(config) as collector:
        assert collector.proc is not None
        config.write_text(text.replace('sqlite_path = "ledger.db"',
                                       'sqlite_path = "ledger.db"\ningest_group_records = 500'))
        collector.proc.send_signal(signal.SIGHUP)
        logged(collector, "configuration_reloaded", 1)
        assert '"reload_ledger_ignored"' not in collector.log.read_text()
        config.write_text(text.replace('sqlite_path = "ledger.db"', 'sqlite_path = "other.db"'))
        collector.proc.send_signal(signal.SIGHUP)
        logged(collector, "configuration_reloaded", 2)
        [ignored] = logged(collector, "reload_ledger_ignored", 1)
        assert ignored["reason"] == "ledger storage changes need a restart"
    assert collector.proc.returncode == 0


async def quarantine_one(collector: CollectorProcess, pki_dir: Path) -> None:
    """Ingest a record older than the maximum lateness: a usage.quarantined event."""
    creds = grpc_channel_credentials(
        pki_dir / "agents" / "host-a.pem", pki_dir / "agents" / "host-a.key",
        pki_dir / "ca.pem",
    )
    old = time.time_ns() // 1000 - 100 * DAY_US
    async with grpc.aio.secure_channel(collector.target, creds) as channel:
        reply = await pb_grpc.IngestStub(channel).Push(
            pb.PushRequest(records=[to_proto(record(at_us=old))], agent_version="t"),
            timeout=10,
        )
    assert [a.outcome for a in reply.acks] == [pb.ACCEPTED]


async def test_webhook_changes_through_the_api_are_delivered_at_once(
    tmp_path: Path, pki_dir: Path
) -> None:
    # The worker polls once at start and then not for an hour: only a wake-up delivers.
    config = collector_config(tmp_path, pki_dir,
                              extra='[webhooks]\npoll_interval_seconds = "3600"\n')
    receiver = await Receiver().start()
    collector = CollectorProcess(config)
    await asyncio.to_thread(collector.start)
    try:
        await quarantine_one(collector, pki_dir)
        token = await asyncio.to_thread(make_api_token, config)
        headers = {"Authorization": f"Bearer {token}"}
        base = f"http://127.0.0.1:{collector.api_port}"
        async with aiohttp.ClientSession(headers=headers) as http:

            async def post(path: str, body: dict[str, Any]) -> Any:
                async with http.post(base + path, json=body) as response:
                    assert response.status in (200, 201), await response.text()
                    return await response.json()

            created = await post("/v1/webhooks", {"url": receiver.url, "from_start": True})
            subscription = created["subscription"]["id"]

            async def delivered(count: int) -> bool:
                return len(receiver.requests) >= count

            await eventually(lambda: delivered(1), "the event delivered after the subscribe")
            replayed = await post(f"/v1/webhooks/{subscription}/replay", {"from_sequence": 1})
            assert replayed == {"queued": 1}
            await eventually(lambda: delivered(2), "the event delivered again after replay")
    finally:
        code = await asyncio.to_thread(collector.stop)
        await receiver.stop()
    assert code == 0
    bodies = receiver.verified(created["secret"])
    assert [b["type"] for b in bodies] == ["usage.quarantined", "usage.quarantined"]
    assert bodies[0]["id"] == bodies[1]["id"]
