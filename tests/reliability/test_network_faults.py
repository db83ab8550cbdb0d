"""The network misbehaves: between agents and the collector, and between the collector
and PostgreSQL, through :class:`~tests.reliability.proxy.FaultProxy`.

Each scenario ends in :func:`~tests.reliability.reconcile.reconcile`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.harness import CollectorProcess
from tests.pg import Databases
from tests.reliability.faults import (
    SOAK,
    AgentProcess,
    collector_config,
    drain,
    free_port,
    logged_since,
    run_for,
    run_until,
    start_agents,
    tail,
    wait_until,
)
from tests.reliability.proxy import FaultProxy, Mode
from tests.reliability.reconcile import (
    api_token,
    read_pg_ledger,
    read_sqlite_ledger,
    reconcile,
)


@pytest.fixture
def proxies() -> Iterator[list[FaultProxy]]:
    """Proxies a test starts; all closed at the end."""
    started: list[FaultProxy] = []
    yield started
    for p in started:
        p.close()


def test_partition_longer_than_the_spool_holds_compacts_and_loses_nothing(
    tmp_path: Path, rel_pki: Path, rng: random.Random, proxies: list[FaultProxy]
) -> None:
    """Agents cut off from the collector for longer than their spools hold at full
    resolution. The partition is a black hole (packets vanish), dropped or reset
    connections, drawn from the seed. The spools must compact (old records merged
    into coarser windows with the same totals), stay within their bound, drop
    nothing, and deliver everything once the network heals."""
    port = free_port()
    assignments = {"host-a": "acme", "host-b": "globex"}
    collector = CollectorProcess(collector_config(tmp_path, rel_pki, port,
                                                  assignments=assignments)).start()
    link = FaultProxy([("127.0.0.1", port)]).start()
    proxies.append(link)
    max_bytes = 16 * 1024
    agents = [AgentProcess(tmp_path, rel_pki, h, link.port, rng, interfaces=12,
                           spool_max_bytes=max_bytes, deadline="2")
              for h in assignments]
    counters = [a.counters for a in agents]
    mode = rng.choice([Mode.BLACKHOLE, Mode.DROP, Mode.RESET])
    try:
        start_agents(agents)
        run_for(rng.uniform(0.5, 1.0), counters, rng)
        wait_until(lambda: all(a.view().records < 40 for a in agents), 30,
                   "agents to ship through the proxy")
        up, down = link.traffic()
        assert up > 0
        assert down > 0
        link.set_mode(mode)
        produced_before = [a.view().produced for a in agents]
        # A spool of 16 KiB holds about 80 records of this agent (13 series at 10
        # samples a second: well under a second). Stay cut off until each agent has
        # sampled several times that: without compaction it could not hold them.
        capacity = max_bytes // 200
        factor = 20 if SOAK else 5

        def cut_off_long_enough() -> bool:
            return all(a.view().produced - p0 > factor * capacity
                       for a, p0 in zip(agents, produced_before, strict=True))

        run_until(cut_off_long_enough, 120, "agents to sample through the partition",
                  counters, rng)
        for a, p0 in zip(agents, produced_before, strict=True):
            view = a.view()
            during = view.produced - p0
            print(f"{a.host} during {mode.value}: {during} records sampled, {view}")
            assert view.dead_letters == 0, view
            # Compaction kept the spool within its bound and merged records: fewer
            # stored than were sampled since the cut, although none has left.
            assert view.bytes <= max_bytes, view
            assert view.records < during // 2, f"spool never compacted: {view}"
        link.pass_through()
        run_for(rng.uniform(0.5, 1.5), counters, rng)
        drain(agents)
        ledger = reconcile(collector, agents, assignments,
                           lambda: read_sqlite_ledger(tmp_path / "ledger.db"))
        # Merged records, not the originals, reached the ledger: fewer records than were
        # sampled, some spanning ten sampling intervals (0.1 s each) or more.
        produced = sum(a.view().produced for a in agents)
        assert len(ledger.records) < produced, (len(ledger.records), produced)
        widest = max(r.end_us - r.start_us for r in ledger.records.values())
        assert widest >= 1_000_000, f"no merged window in the ledger (widest {widest} us)"
        print(f"{link.accepted} connections through the proxy, {link.resets} reset; "
              f"widest window in the ledger {widest / 1e6:.1f} s")
    finally:
        for a in agents:
            a.kill()
        collector.kill()


@pytest.mark.pg
def test_collector_to_postgres_link_blackholed_dropped_and_reset_during_ingest(
    pg_server: str, tmp_path: Path, rel_pki: Path, rng: random.Random,
    proxies: list[FaultProxy],
) -> None:
    """The collector's PostgreSQL connections go through the proxy: a black hole
    longer than the agents' call deadline (a transaction whose COMMIT is in the
    network when its caller gives up, delivered later), dropped and reset
    connections, added latency, in a seeded order. The same collector process must
    recover by itself and post everything exactly once."""
    databases = Databases(pg_server)
    dsn = asyncio.run(databases.create("meterd_rel"))
    server = urlsplit(dsn)
    db_link = FaultProxy([(server.hostname or "127.0.0.1", server.port or 5432)]).start()
    proxies.append(db_link)
    user, at, _ = server.netloc.rpartition("@")
    proxied = urlunsplit(server._replace(netloc=f"{user}{at}{db_link.address}"))
    port = free_port()
    assignments = {"host-a": "acme", "host-b": "globex"}
    config = collector_config(tmp_path, rel_pki, port, assignments=assignments,
                              shards=[proxied])
    collector = CollectorProcess(config).start()
    agents = [AgentProcess(tmp_path, rel_pki, h, port, rng, deadline="2")
              for h in assignments]
    counters = [a.counters for a in agents]
    logs = [a.log for a in agents]
    faults = [Mode.BLACKHOLE, Mode.DROP, Mode.RESET, Mode.DELAY] * (3 if SOAK else 1)
    rng.shuffle(faults)
    print("faults on the PostgreSQL link:", [f.value for f in faults])
    try:
        api_token(config)
        start_agents(agents)
        for fault in faults:
            run_for(rng.uniform(0.3, 0.6), counters, rng)
            assert db_link.open_connections > 0
            if fault is Mode.BLACKHOLE:
                gave_up = logged_since("DEADLINE_EXCEEDED", *logs)
                db_link.blackhole()
                # Longer than the agents' 2 s deadline: calls give up mid-transaction.
                run_until(gave_up, 30, "an agent's call to time out", counters, rng)
                run_for(rng.uniform(0.0, 1.0), counters, rng)
            elif fault is Mode.RESET:
                told = logged_since("UNAVAILABLE", *logs)
                db_link.reset()
                run_until(told, 30, "an agent to be told the ledger is unavailable",
                          counters, rng)
            elif fault is Mode.DROP:
                told = logged_since("UNAVAILABLE", *logs)
                db_link.drop()
                run_until(told, 30, "an agent to be told the ledger is unavailable",
                          counters, rng)
            else:
                db_link.delay_by(rng.uniform(0.02, 0.1))
                run_for(rng.uniform(0.5, 1.0), counters, rng)
            db_link.pass_through()
            healed = time.monotonic()
            run_for(rng.uniform(0.2, 0.5), counters, rng)
            assert collector.proc is not None
            assert collector.proc.poll() is None, tail(collector.log)
            wait_until(lambda: all(a.view().records < 60 for a in agents), 60,
                       f"the collector to recover after {fault.value}:\n"
                       + tail(collector.log))
            print(f"{fault.value}: backlog drained {time.monotonic() - healed:.1f} s "
                  "after the link healed")
        drain(agents)
        reconcile(collector, agents, assignments, lambda: read_pg_ledger([dsn]))
        print(f"{db_link.accepted} PostgreSQL connections through the proxy, "
              f"{db_link.resets} reset")
        assert collector.stop() == 0
    finally:
        for a in agents:
            a.kill()
        collector.kill()
        asyncio.run(databases.drop_all())
