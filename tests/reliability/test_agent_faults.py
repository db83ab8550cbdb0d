"""The agent's worst days: kill -9 at any moment, a collector that is away, a full spool.

Each scenario ends in :func:`~tests.reliability.faults.reconcile`: ledger totals equal
the counters' advance exactly, acknowledged ids equal ledger ids, verify is clean.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from tests.harness import CollectorProcess
from tests.reliability.faults import (
    SOAK,
    AgentProcess,
    collector_config,
    drain,
    free_port,
    run_for,
    start_agents,
    tail,
    wait_until,
)
from tests.reliability.reconcile import read_sqlite_ledger, reconcile


def test_agent_killed_at_random_points_loses_and_doubles_nothing(
    tmp_path: Path, rel_pki: Path, rng: random.Random
) -> None:
    port = free_port()
    assignments = {"host-a": "acme"}
    collector = CollectorProcess(collector_config(tmp_path, rel_pki, port,
                                                  assignments=assignments)).start()
    # Small batches: several calls per sampling cycle, so kills land in shipping too.
    agent = AgentProcess(tmp_path, rel_pki, "host-a", port, rng, interfaces=6,
                         batch_max_records=3)
    try:
        start_agents([agent])
        kills = 40 if SOAK else 8
        left_in_flight = 0
        for _ in range(kills):
            # Alive from under startup (~1 s of imports) to a few cycles of sampling
            # and shipping; the counters keep moving while it is up and while it is down.
            run_for(rng.uniform(0.1, 2.0), [agent.counters], rng)
            agent.kill()
            left_in_flight += agent.view().in_flight > 0
            run_for(rng.uniform(0.0, 0.3), [agent.counters], rng)
            agent.start()
        run_for(0.5, [agent.counters], rng)
        print(f"{kills} kills, {left_in_flight} of them with a batch in flight")
        drain([agent])
        ledger = reconcile(collector, [agent], assignments,
                           lambda: read_sqlite_ledger(tmp_path / "ledger.db"))
        assert ledger.records, "nothing reached the ledger"
    finally:
        agent.kill()
        collector.kill()


def test_agent_stopped_with_sigterm_while_sampling_loses_nothing(
    tmp_path: Path, rel_pki: Path, rng: random.Random
) -> None:
    """SIGTERM (systemctl stop, package upgrade) at random moments, with a source slow
    enough (80 ms a read, at a 100 ms interval) that most land while a sample is being
    taken: the agent must finish or discard that sample whole, never half."""
    port = free_port()
    assignments = {"host-a": "acme"}
    collector = CollectorProcess(collector_config(tmp_path, rel_pki, port,
                                                  assignments=assignments)).start()
    agent = AgentProcess(tmp_path, rel_pki, "host-a", port, rng, read_seconds=0.08)
    try:
        start_agents([agent])
        stops = 30 if SOAK else 5
        for _ in range(stops):
            run_for(rng.uniform(0.2, 1.0), [agent.counters], rng)
            code = agent.stop()
            assert code == 0, tail(agent.log)
            agent.start(wait_ready=True)
        run_for(0.5, [agent.counters], rng)
        drain([agent])
        reconcile(collector, [agent], assignments,
                  lambda: read_sqlite_ledger(tmp_path / "ledger.db"))
    finally:
        agent.kill()
        collector.kill()


def test_collector_down_for_a_while_then_back_drains_the_backlog(
    tmp_path: Path, rel_pki: Path, rng: random.Random
) -> None:
    port = free_port()
    assignments = {"host-a": "acme", "host-b": "globex"}
    collector = CollectorProcess(collector_config(tmp_path, rel_pki, port,
                                                  assignments=assignments)).start()
    agents = [AgentProcess(tmp_path, rel_pki, h, port, rng) for h in assignments]
    counters = [a.counters for a in agents]
    try:
        start_agents(agents)
        outages = 3 if SOAK else 1
        for _ in range(outages):
            run_for(rng.uniform(0.5, 1.5), counters, rng)
            assert collector.stop() == 0, tail(collector.log)
            backlog_before = [a.view().records for a in agents]
            run_for(rng.uniform(20, 40) if SOAK else rng.uniform(2, 4), counters, rng)
            backlog = [a.view().records for a in agents]
            # While it is away the agents keep sampling into their spools.
            assert all(b > max(20, b0) for b, b0 in zip(backlog, backlog_before, strict=True)), (
                backlog_before, backlog)
            collector.start()
            run_for(rng.uniform(0.5, 1.5), counters, rng)
            wait_until(lambda: all(a.view().records < 50 for a in agents), 60,
                       "the backlog to drain")
        drain(agents)
        reconcile(collector, agents, assignments,
                  lambda: read_sqlite_ledger(tmp_path / "ledger.db"))
    finally:
        for a in agents:
            a.kill()
        collector.kill()


def test_full_spool_compacts_without_losing_usage(
    tmp_path: Path, rel_pki: Path, rng: random.Random
) -> None:
    port = free_port()
    assignments = {"host-a": "acme"}
    config = collector_config(tmp_path, rel_pki, port, assignments=assignments)
    max_bytes = 16 * 1024
    agent = AgentProcess(tmp_path, rel_pki, "host-a", port, rng, interfaces=12,
                         spool_max_bytes=max_bytes)
    collector = CollectorProcess(config)
    try:
        # The collector is not there: everything the agent samples stays in its spool.
        start_agents([agent])
        kills = 0
        deadline = time.monotonic() + (300 if SOAK else 60)
        # Until the spool has been compacted over and over (it holds about a hundred
        # records), with a kill -9 now and then while it is full.
        target = 10_000 if SOAK else 1_000
        while (view := agent.view()).produced < target:
            assert time.monotonic() < deadline, f"sampled too slowly to fill the spool: {view}"
            run_for(rng.uniform(0.3, 1.0), [agent.counters], rng)
            if rng.random() < 0.3:
                agent.kill()
                kills += 1
                agent.start(wait_ready=True)
            view = agent.view()
            assert view.dead_letters == 0, view
            # Compaction keeps the spool within its bound: there is always an older
            # run of the same series to merge (only the one batch in flight is not).
            assert view.bytes <= max_bytes, view
        produced = view.produced
        assert view.records < produced // 5, f"spool never compacted: {view}"
        print(f"spool: {view}, {kills} kills while full")
        collector.start()
        run_for(rng.uniform(0.5, 1.5), [agent.counters], rng)
        drain([agent])
        ledger = reconcile(collector, [agent], assignments,
                           lambda: read_sqlite_ledger(tmp_path / "ledger.db"))
        # The merged records, not the originals, are what reached the ledger.
        assert len(ledger.records) < produced, (len(ledger.records), produced)
    finally:
        agent.kill()
        collector.kill()
