"""Agents whose clocks are hours off: one three hours ahead, one three hours behind.

The agents are the real agent processes with their wall clock moved by Debian's
libfaketime (``LD_PRELOAD``; the monotonic clock is left alone, as on a host whose
time of day is simply wrong). Everything they stamp (record windows, the send time
the collector measures skew from) and every certificate check they make uses the
wrong time. The certificates were issued two days earlier (``meterd pki`` run under
libfaketime too), as a real fleet's would have been, so TLS is not what fails.

The collector's policy (``[ingest]`` in ``collector/config.py``): a record whose
window ends more than ``future_tolerance_seconds`` (300) after the collector's clock
is rejected with that reason; a window in the past is accepted while it is younger
than ``max_lateness_days``. So every record of the agent ahead is refused (and
dead-lettered by the agent with the reason), every record of the agent behind is
posted with the windows it stamped, and the reconciliation accounts for exactly that:
ledger plus dead letters equal what was sampled. The collector measures the skew of
both (collector clock minus the agent's send time), logs it per batch, returns it to
the agent (which keeps it for ``meterd agent status``) and reports it in fleet health.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.harness import ROOT, CollectorProcess
from tests.reliability.faults import (
    AgentProcess,
    collector_config,
    drain,
    faketime_env,
    free_port,
    run_until,
    start_agents,
)
from tests.reliability.reconcile import read_sqlite_ledger, reconcile, rest_get

HOUR_US = 3_600 * 1_000_000
OFFSETS = {"host-a": ("+3h", -3 * HOUR_US), "host-b": ("-3h", 3 * HOUR_US)}  # skew seen
# Skew is measured at receipt against a send time stamped just before: a few seconds
# at most on a loaded machine; the offsets are three hours.
SLACK_US = 60 * 1_000_000
REFUSED = re.compile(r"window ends \d+ s after the collector's clock \(tolerance 300 s\)")


def pki_issued_days_ago(root: Path) -> Path:
    """A CA, a collector certificate and agent certificates made two days ago."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **faketime_env("-2d")}
    pki = root / "pki"
    for args in (["init", str(pki)],
                 ["issue-server", str(pki), "localhost", "--ip", "127.0.0.1"],
                 *(["issue-agent", str(pki), host] for host in OFFSETS)):
        made = subprocess.run([sys.executable, "-m", "common.cli", "pki", *args], env=env,
                              capture_output=True, text=True, check=False, timeout=60)
        assert made.returncode == 0, made.stderr
    return pki


def logged_skews(collector: CollectorProcess) -> dict[str, list[int]]:
    skews: dict[str, list[int]] = {}
    for line in collector.log.read_text().splitlines():
        if '"batch_ingested"' in line:
            event = json.loads(line)
            skews.setdefault(event["host"], []).append(int(event["skew_ms"]) * 1000)
    return skews


def test_agents_hours_off_are_measured_and_their_records_follow_the_policy(
    tmp_path: Path, rng: random.Random
) -> None:
    pki = pki_issued_days_ago(tmp_path)
    port = free_port()
    assignments = {"host-a": "acme", "host-b": "globex"}
    collector = CollectorProcess(collector_config(tmp_path, pki, port,
                                                  assignments=assignments)).start()
    agents = [AgentProcess(tmp_path, pki, h, port, rng, env=faketime_env(OFFSETS[h][0]))
              for h in assignments]
    ahead, behind = agents
    counters = [a.counters for a in agents]
    try:
        start_agents(agents)
        run_until(lambda: len(ahead.dead_letters()) > 10 and len(behind.acked()) > 10,
                  60, "records of both agents to be answered", counters, rng)
        drain(agents)

        # The policy, record by record: all of the agent ahead refused with the
        # reason, all of the agent behind posted; together exactly what was sampled.
        ledger = reconcile(collector, agents, assignments,
                           lambda: read_sqlite_ledger(tmp_path / "ledger.db"),
                           refused=REFUSED)
        assert not [r for r in ledger.records.values() if r.host == "host-a"]
        assert not behind.dead_letters()
        posted = [r for r in ledger.records.values() if r.host == "host-b"]
        assert posted
        # Posted with the windows the agent stamped: three hours in the past.
        now_us = time.time_ns() // 1000
        assert all(now_us - r.end_us > 3 * HOUR_US - 10 * SLACK_US for r in posted)

        # Measured and reported: per batch in the collector's log, to the agent (what
        # `meterd agent status` shows), and in fleet health.
        skews = logged_skews(collector)
        for a in agents:
            expected = OFFSETS[a.host][1]
            assert skews[a.host], f"no batch of {a.host} logged"
            assert all(abs(s - expected) < SLACK_US for s in skews[a.host]), skews[a.host]
            told = a.meta("clock_skew_us")
            assert told is not None, f"{a.host} keeps no skew for its status"
            assert abs(int(told) - expected) < SLACK_US, told
            health = rest_get(collector, f"/v1/fleet/agents/{a.host}")
            assert abs(health["clock_skew_ms"] * 1000 - expected) < SLACK_US, health
            assert health["status"] == "skewed", health
        print({h: f"{v[-1] / HOUR_US:+.3f} h" for h, v in skews.items()},
              f"refused: {len(ahead.dead_letters())}, posted: {len(posted)}")
        assert collector.stop() == 0
    finally:
        for a in agents:
            a.kill()
        collector.kill()
