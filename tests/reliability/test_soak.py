"""A bounded soak: a steady offered load, and the memory of collector and agents stays flat.

Two real agents sample 13 series every 0.1 s each and ship them, and a load generator
in the test offers batches of another host's records at a fixed rate, all over mTLS
to one collector on the embedded ledger. Every process's resident set size is read
from ``/proc/<pid>/status`` (``VmRSS``) twice a second.

This is a memory-growth check, not a timing threshold: the run is split into a
warm-up (the first 40%: imports done, pools, caches and gRPC buffers filled to their
working size) and the rest; the median RSS of the last fifth of the run must not
exceed the median of the warm-up's second half by more than 5% plus 8 MiB.

Why that tolerance: what may legitimately still grow after the warm-up is bounded
and small: SQLite's page cache (its default bound is 2 MiB per connection), the
Python allocator's arenas settling (a few MiB of fragmentation, never returned to
the OS), and gRPC's per-connection buffers (fixed per connection; connections do not
accumulate). Measured runs drift by less than 1 MiB. The 5% covers proportional
noise of those on a larger resident set. A leak, by contrast: between the middles
of the two windows (0.6 of the run) about 16,000 records arrive in the default 12 s
run, so a leak of one kilobyte per record grows the collector by about 16 MiB, past
the 12 MiB the tolerance gives its 85 MiB, and fails it. An agent handles only its
own 130 records a second, so in the default run its check catches gross leaks only
(some 150 KiB per sampling cycle); ``METERD_SOAK=1`` runs ten minutes instead, which
finds leaks fifty times slower (3 KiB a cycle for an agent, 20 bytes a record for the
collector).
"""

from __future__ import annotations

import random
import statistics
import threading
import time
import uuid
from pathlib import Path

import grpc

from common.proto import meterd_pb2 as pb
from common.proto import meterd_pb2_grpc as pb_grpc
from common.tls import grpc_channel_credentials
from tests.harness import CollectorProcess
from tests.reliability.faults import (
    SOAK,
    AgentProcess,
    collector_config,
    free_port,
    run_for,
    start_agents,
)
from tests.reliability.reconcile import read_sqlite_ledger

DURATION = 600.0 if SOAK else 12.0
OFFERED_PER_SECOND = 2000  # records of host-c, in batches of a tenth of that
WARM_UP = 0.4
TOLERANCE = 0.05
SLACK_KIB = 8 * 1024


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


class Load:
    """Offers batches of host-c's records, ten a second, until stopped."""

    def __init__(self, target: str, pki: Path, rng: random.Random) -> None:
        creds = grpc_channel_credentials(pki / "agents" / "host-c.pem",
                                         pki / "agents" / "host-c.key", pki / "ca.pem")
        self.channel = grpc.secure_channel(target, creds)
        self.stub = pb_grpc.IngestStub(self.channel)  # type: ignore[no-untyped-call]
        self.rng = rng
        self.sent: dict[str, int] = {}  # metric -> total quantity
        self.ids: set[str] = set()
        self.errors = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, name="load", daemon=True)

    def batch(self, seq: int) -> pb.PushRequest:
        now = time.time_ns() // 1000
        records = []
        for i in range(OFFERED_PER_SECOND // 10):
            quantity = self.rng.randrange(0, 10**9)
            records.append(pb.UsageRecord(
                id=str(uuid.UUID(int=self.rng.getrandbits(128), version=4)), host_id="host-c",
                metric="net.tx_bytes", unit="bytes", quantity=str(quantity),
                start_us=now - 100_000, end_us=now, seq=seq * (OFFERED_PER_SECOND // 10) + i,
                labels={"interface": f"eth{i % 8}"}))
        return pb.PushRequest(records=records, sent_at_us=now)

    def run(self) -> None:
        seq = 0
        next_at = time.monotonic()
        while not self.stop.is_set():
            request = self.batch(seq)
            seq += 1
            while True:  # like an agent: the same batch until it is answered
                try:
                    response = self.stub.Push(request, timeout=10)
                    break
                except grpc.RpcError:
                    self.errors += 1
                    if self.stop.wait(0.2):
                        return
            for record, ack in zip(request.records, response.acks, strict=True):
                assert ack.outcome in (pb.ACCEPTED, pb.DUPLICATE), ack
                if ack.id not in self.ids:
                    self.ids.add(ack.id)
                    self.sent["net.tx_bytes"] = self.sent.get("net.tx_bytes", 0) + int(
                        record.quantity)
            next_at += 0.1
            self.stop.wait(max(0.0, next_at - time.monotonic()))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        self.channel.close()


def flat(name: str, samples: list[tuple[float, int]]) -> str:
    """'' if the RSS samples (time, KiB) stay flat after the warm-up, else why not."""
    warm = [kib for t, kib in samples if WARM_UP / 2 <= t < WARM_UP]
    end = [kib for t, kib in samples if t >= 0.8]
    assert len(warm) >= 3, (name, len(warm))
    assert len(end) >= 3, (name, len(end))
    plateau, final = statistics.median(warm), statistics.median(end)
    limit = plateau * (1 + TOLERANCE) + SLACK_KIB
    print(f"{name}: warm-up {plateau / 1024:.1f} MiB, end {final / 1024:.1f} MiB "
          f"(limit {limit / 1024:.1f} MiB), peak {max(k for _, k in samples) / 1024:.1f} MiB")
    return "" if final <= limit else f"{name} grew from {plateau} KiB to {final} KiB"


def test_memory_stays_flat_under_a_steady_load(
    tmp_path: Path, rel_pki: Path, rng: random.Random
) -> None:
    port = free_port()
    assignments = {"host-a": "acme", "host-b": "globex"}
    collector = CollectorProcess(collector_config(
        tmp_path, rel_pki, port, assignments={**assignments, "host-c": "initech"})).start()
    agents = [AgentProcess(tmp_path, rel_pki, h, port, rng, interfaces=12) for h in assignments]
    load = Load(collector.target, rel_pki, rng)
    samples: dict[str, list[tuple[float, int]]] = {"collector": [], "host-a": [], "host-b": []}
    try:
        start_agents(agents)
        load.thread.start()
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < DURATION:
            run_for(0.5, [a.counters for a in agents], rng)
            for name, proc in [("collector", collector.proc),
                               *((a.host, a.proc) for a in agents)]:
                assert proc is not None
                assert proc.poll() is None, f"{name} exited"
                samples[name].append((elapsed / DURATION, rss_kib(proc.pid)))
        load.close()
        problems = [p for name, s in samples.items() if (p := flat(name, s))]
        print(f"{DURATION:.0f} s; load generator: {len(load.ids)} records, "
              f"{load.errors} retried calls")
        assert not problems, problems

        # And what the load generator offered was posted, once. (The money under faults
        # is the scenarios' business; `ledger verify` over this many records would
        # double the run.)
        ledger = read_sqlite_ledger(tmp_path / "ledger.db")
        loaded = [r for r in ledger.records.values() if r.host == "host-c"]
        assert {i for i, r in ledger.records.items() if r.host == "host-c"} == load.ids
        assert sum(r.quantity for r in loaded) == load.sent["net.tx_bytes"]
    finally:
        load.close()
        for a in agents:
            a.kill()
        collector.kill()
