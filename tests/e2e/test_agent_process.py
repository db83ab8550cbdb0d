"""The agent as its users run it: status, dead letters, reload and stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

from agent.shipper import Shipper, ShipperSettings
from agent.spool import Spool
from common.ids import new_id
from common.records import UsageRecord
from tests.e2e.test_end_to_end import link, samples
from tests.harness import ROOT, CollectorProcess, collector_config, meterd


def agent_config(tmp_path: Path, pki: Path, port: int, interval: str = "0.5") -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f'collector = "127.0.0.1:{port}"\nserver_name = "localhost"\n'
        f'interval_seconds = "{interval}"\nspool_path = "{tmp_path}/spool.db"\n'
        f'[tls]\ncert = "{pki}/agents/host-a.pem"\nkey = "{pki}/agents/host-a.key"\n'
        f'ca = "{pki}/ca.pem"\n'
    )
    return path


async def test_a_rejected_record_is_dead_lettered_shown_in_status_and_requeued(
    tmp_path: Path, pki_dir: Path
) -> None:
    with CollectorProcess(collector_config(tmp_path, pki_dir)) as collector:
        config = agent_config(tmp_path, pki_dir, collector.grpc_port)
        future = time.time_ns() // 1000 + 7 * 86_400_000_000
        bad = UsageRecord(
            id=new_id(),
            host_id="host-a",
            metric="net.tx_bytes",
            quantity=Decimal(5),
            unit="bytes",
            start_us=future,
            end_us=future + 1,
            seq=99,
        )
        with Spool(tmp_path / "spool.db") as spool:
            spool.append([*samples("host-a", 3, 5), bad])
            ch = link(pki_dir, "host-a", collector.target)
            try:
                await Shipper(spool, ch, ShipperSettings(), "test").drain()
            finally:
                await ch.close()
            [letter] = spool.dead_letters()
            assert letter.record.id == bad.id
            assert "after the collector's clock" in letter.reason
            # The next call tells the collector how many dead letters the agent holds.
            spool.append(samples("host-a", 4, 5)[3:])
            ch = link(pki_dir, "host-a", collector.target)
            try:
                await Shipper(spool, ch, ShipperSettings(), "test").drain()
            finally:
                await ch.close()
        assert collector.get("/v1/fleet/agents/host-a")["dead_letters"] == 1
        status = meterd("agent", "status", "--config", str(config), "--json")
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        assert report["dead_letters"] == 1
        assert report["backlog_records"] == 0
        assert report["host_id"] == "host-a"
        assert report["last_ship_at"] is not None
        requeued = meterd("agent", "requeue", "--config", str(config))
        assert requeued.stdout.strip() == "requeued 1 record(s)"
        report = json.loads(meterd("agent", "status", "--config", str(config), "--json").stdout)
        assert (report["dead_letters"], report["backlog_records"]) == (0, 1)


def test_agent_reloads_on_sighup_and_ships_everything_on_sigterm(
    tmp_path: Path, pki_dir: Path
) -> None:
    with CollectorProcess(collector_config(tmp_path, pki_dir)) as collector:
        config = agent_config(tmp_path, pki_dir, collector.grpc_port)
        log_path = tmp_path / "agent.log"
        with log_path.open("wb") as log:
            agent = subprocess.Popen(
                [sys.executable, "-m", "common.cli", "agent", "run", "--config", str(config)],
                stdout=log,
                stderr=log,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        try:
            events = wait_for_event(log_path, "batch_shipped")
            assert events
            config.write_text(config.read_text().replace('"0.5"', '"0.25"'))
            agent.send_signal(signal.SIGHUP)
            [reloaded] = wait_for_event(log_path, "configuration_reloaded")
            assert reloaded["interval_s"] == "0.25"
            time.sleep(1)
        finally:
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(30) == 0
        [stopped] = wait_for_event(log_path, "agent_stopped")
        assert stopped["left_in_spool"] == 0
        assert stopped["final_sample_records"] > 0
        with Spool(tmp_path / "spool.db") as spool:
            assert spool.stats().records == 0
        usage = collector.get("/v1/accounts/acme/usage")["usage"]
        assert {"cpu.seconds", "mem.used_byte_seconds", "host.uptime_seconds"} <= {
            u["metric"] for u in usage
        }


def wait_for_event(log: Path, event: str, timeout: float = 30) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    while True:
        found = []
        for line in log.read_text().splitlines():
            if line.startswith("{"):
                data = json.loads(line)
                if data.get("event") == event:
                    found.append(data)
        if found:
            return found
        assert time.monotonic() < deadline, f"no {event} in {log.read_text()[-2000:]}"
        time.sleep(0.1)
