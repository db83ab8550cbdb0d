"""A duplicate storm: every batch delivered several times, through two collectors that
share one PostgreSQL ledger.

Real agents ship through a round-robin TCP load balancer (the fault proxy with two
upstreams) that is reset now and then, so an agent's retries land on the other
collector. Every batch an agent takes from its spool is also logged by the agent
(``--batch-log``) and replayed by the test, the same bytes, to both collectors at
once, several times each. The unique record id in the database must decide which
delivery posts a record; every other one is answered ``duplicate``.

Besides :func:`~tests.reliability.reconcile.reconcile`: no record is answered
``accepted`` twice to the replayer, and the records the collectors logged as
``accepted`` are at most the records in the ledger (fewer only where a call was cut
off by a reset between its commit and its log line: its resend is a duplicate).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path

import grpc
import pytest

from common.proto import meterd_pb2 as pb
from common.proto import meterd_pb2_grpc as pb_grpc
from common.tls import grpc_channel_credentials
from tests.harness import CollectorProcess
from tests.pg import Databases
from tests.reliability.faults import (
    SOAK,
    AgentProcess,
    collector_config,
    drain,
    free_port,
    run_for,
    start_agents,
    tail,
)
from tests.reliability.proxy import FaultProxy
from tests.reliability.reconcile import read_pg_ledger, reconcile, rest_usage

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.DEADLINE_EXCEEDED}


class Replayer:
    """Sends every batch the agents logged again: ``copies`` times to each collector,
    all at once."""

    def __init__(self, agents: Sequence[AgentProcess], targets: Sequence[str], pki: Path,
                 copies: int) -> None:
        self.agents = agents
        self.copies = copies
        self.channels: list[grpc.Channel] = []
        self.stubs: dict[str, list[pb_grpc.IngestStub]] = {}
        for a in agents:
            creds = grpc_channel_credentials(pki / "agents" / f"{a.host}.pem",
                                             pki / "agents" / f"{a.host}.key", pki / "ca.pem")
            stubs = []
            for target in targets:
                channel = grpc.secure_channel(target, creds)
                self.channels.append(channel)
                stubs.append(pb_grpc.IngestStub(channel))  # type: ignore[no-untyped-call]
            self.stubs[a.host] = stubs
        self.offsets = {a.host: 0 for a in agents}
        self.outcomes: Counter[str] = Counter()
        self.deliveries: Counter[str] = Counter()
        self.accepted: Counter[str] = Counter()
        self.batches = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="replayer", daemon=True)

    def _new_batches(self, agent: AgentProcess) -> list[pb.PushRequest]:
        assert agent.batch_log is not None
        if not agent.batch_log.exists():
            return []
        with agent.batch_log.open("rb") as f:
            f.seek(self.offsets[agent.host])
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line is one write(2): whole or absent
        self.offsets[agent.host] += len(complete)
        return [pb.PushRequest.FromString(base64.b64decode(line))
                for line in complete.splitlines() if line]

    def _push(self, stub: pb_grpc.IngestStub, request: pb.PushRequest) -> pb.PushResponse:
        deadline = time.monotonic() + 30
        while True:
            future: Future[pb.PushResponse] = stub.Push.future(request, timeout=10)
            try:
                return future.result()
            except grpc.RpcError as exc:
                code = exc.code()
                if code not in RETRYABLE or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def replay_new(self) -> int:
        """Replay what was logged since the last call; the number of batches."""
        count = 0
        for a in self.agents:
            for request in self._new_batches(a):
                calls = [(stub, request) for stub in self.stubs[a.host]
                         for _ in range(self.copies)]
                futures = [stub.Push.future(req, timeout=10) for stub, req in calls]
                for (stub, req), future in zip(calls, futures, strict=True):
                    try:
                        response = future.result()
                    except grpc.RpcError:
                        response = self._push(stub, req)
                    for ack in response.acks:
                        self.outcomes[pb.Outcome.Name(ack.outcome)] += 1
                        self.deliveries[ack.id] += 1
                        self.accepted[ack.id] += ack.outcome == pb.ACCEPTED
                        if ack.outcome not in (pb.ACCEPTED, pb.DUPLICATE):
                            self.errors.append(f"{ack.id}: {ack.reason}")
                count += 1
        self.batches += count
        return count

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.replay_new()
            self._stop.wait(0.05)

    def start(self) -> Replayer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(60)

    def close(self) -> None:
        self.stop()
        for channel in self.channels:
            channel.close()
        self.channels.clear()


def accepted_in_log(collector: CollectorProcess) -> int:
    total = 0
    for line in collector.log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if event.get("event") == "batch_ingested":
                total += int(event.get("accepted", 0))
    return total


@pytest.fixture
def pg_dsn(pg_server: str) -> Iterator[str]:
    databases = Databases(pg_server)
    dsn = asyncio.run(databases.create("meterd_rel"))
    try:
        yield dsn
    finally:
        asyncio.run(databases.drop_all())


@pytest.mark.pg
def test_every_batch_delivered_several_times_through_two_collectors_posts_once(
    pg_dsn: str, tmp_path: Path, rel_pki: Path, rng: random.Random
) -> None:
    assignments = {"host-a": "acme", "host-b": "globex", "host-c": "acme"}
    collectors = []
    for name in ("one", "two"):
        workdir = tmp_path / name
        workdir.mkdir()
        collectors.append(CollectorProcess(collector_config(
            workdir, rel_pki, free_port(), assignments=assignments, shards=[pg_dsn])))
    for c in collectors:
        c.start()
    balancer = FaultProxy([("127.0.0.1", c.grpc_port) for c in collectors]).start()
    agents = [AgentProcess(tmp_path, rel_pki, h, balancer.port, rng, batch_log=True)
              for h in assignments]
    counters = [a.counters for a in agents]
    copies = rng.randint(2, 3)
    replayer = Replayer(agents, [c.target for c in collectors], rel_pki, copies)
    try:
        start_agents(agents)
        replayer.start()
        rounds = 15 if SOAK else 4
        for _ in range(rounds):
            run_for(rng.uniform(0.3, 1.0), counters, rng)
            # The balancer restarts: agents reconnect, to the other collector in turn,
            # and resend what was in flight.
            balancer.reset_connections()
        run_for(rng.uniform(0.3, 0.8), counters, rng)
        drain(agents)
        replayer.stop()
        replayer.replay_new()  # the batches logged since the replayer's last pass
        assert not replayer.errors, replayer.errors[:5]

        one, two = collectors
        ledger = reconcile(one, agents, assignments, lambda: read_pg_ledger([pg_dsn]))
        for account in sorted(set(assignments.values())):
            assert rest_usage(two, account) == rest_usage(one, account)
        records = len(ledger.records)
        # Every record was delivered 2 * copies more times by the replayer alone.
        fewest = min(replayer.deliveries[i] for i in ledger.records)
        assert fewest >= 2 * copies, fewest
        accepted = [accepted_in_log(c) for c in collectors]
        print(f"{records} records in {replayer.batches} batches, each replayed {copies} "
              f"times to each collector; replay outcomes {dict(replayer.outcomes)}; "
              f"accepted per collector {accepted}; balancer connections "
              f"{balancer.accepted}, reset {balancer.resets}")
        twice = [i for i, n in replayer.accepted.items() if n > 1]
        assert not twice, f"{len(twice)} records accepted twice, e.g. {twice[:3]}"
        assert sum(accepted) <= records, (accepted, records)
        assert all(n > 0 for n in accepted), f"one collector posted nothing: {accepted}"
        for c in collectors:
            assert c.stop() == 0, tail(c.log)
    finally:
        replayer.close()
        for a in agents:
            a.kill()
        for c in collectors:
            c.kill()
        balancer.close()
