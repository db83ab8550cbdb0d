"""The collector's worst days: kill -9 while it commits, a PostgreSQL restart under it,
and usage of a host nobody has been assigned yet.

Each scenario ends in :func:`~tests.reliability.faults.reconcile`.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import itertools
import json
import random
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from decimal import Decimal
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.ids import new_id
from common.proto import meterd_pb2 as pb
from common.proto import meterd_pb2_grpc as pb_grpc
from common.records import UsageRecord
from common.tls import grpc_channel_credentials
from common.wire import to_proto
from tests.harness import CollectorProcess, meterd
from tests.pg import Databases, throwaway_cluster
from tests.reliability.faults import (
    HOSTS,
    SOAK,
    AgentProcess,
    PgServer,
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
from tests.reliability.proxy import FaultProxy
from tests.reliability.reconcile import (
    LedgerView,
    api_token,
    read_pg_ledger,
    read_sqlite_ledger,
    reconcile,
    rest_get,
    rest_usage,
)

ACCOUNTS = ("acme", "globex")


def resent_after_commit(collector: CollectorProcess) -> int:
    """Batches the collector answered partly ``duplicate``: their first commit's answer
    never reached the agent (a kill between commit and reply)."""
    count = 0
    for line in collector.log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            count += event.get("event") == "batch_ingested" and event.get("duplicate", 0) > 0
    return count


@pytest.fixture
def fresh_pg_database(pg_server: str) -> Iterator[str]:
    """A new database on the shared server, dropped afterwards (the server is never
    restarted by these tests)."""
    databases = Databases(pg_server)
    dsn = asyncio.run(databases.create("meterd_rel"))
    try:
        yield dsn
    finally:
        asyncio.run(databases.drop_all())


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[PgServer]:
    """A throwaway cluster of our own, which the test may stop and start."""
    with contextlib.ExitStack() as stack:
        try:
            dsn = stack.enter_context(throwaway_cluster())
        except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
            pytest.skip(f"cannot start a throwaway PostgreSQL cluster: {exc}")
        yield PgServer(dsn)


def configure(
    backend: str,
    request: pytest.FixtureRequest,
    workdir: Path,
    pki: Path,
    port: int,
    assignments: Mapping[str, str],
    ledger_extra: str = "",
) -> tuple[Path, Callable[[], LedgerView]]:
    """The collector config on ``backend`` (a fresh PostgreSQL database on the shared
    server, or a SQLite file) and how to read its ledger."""
    if backend == "postgres":
        dsn = request.getfixturevalue("fresh_pg_database")
        config = collector_config(workdir, pki, port, assignments=assignments, shards=[dsn],
                                  ledger_extra=ledger_extra)
        return config, lambda: read_pg_ledger([dsn])
    config = collector_config(workdir, pki, port, assignments=assignments,
                              ledger_extra=ledger_extra)
    return config, lambda: read_sqlite_ledger(workdir / "ledger.db")


def shared_transactions(collector: CollectorProcess) -> int:
    """Posting transactions of the running collector's life that posted more than one
    call (from its ``/metrics``)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{collector.api_port}/metrics",
        headers={"Authorization": f"Bearer {api_token(collector.config)}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (loopback)
        text = response.read().decode()
    count = alone = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "meterd_ingest_transaction_calls_count":
                count += s.value
            elif s.name == "meterd_ingest_transaction_calls_bucket" and s.labels["le"] == "1.0":
                alone += s.value
    return int(count - alone)


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.pg)])
def test_collector_killed_while_committing_posts_everything_once(
    backend: str, tmp_path: Path, rel_pki: Path, rng: random.Random,
    request: pytest.FixtureRequest,
) -> None:
    """Twenty agents on PostgreSQL (a fleet), three with many series each on SQLite
    (one host's commits are large), all reaching the collector through the fault
    proxy; the collector is killed with SIGKILL again and again while they ship,
    sometimes with the link slow or black-holed at that moment."""
    port = free_port()
    fleet = backend == "postgres" or SOAK
    hosts = HOSTS[: 20 if fleet else 3]
    assignments = {h: ACCOUNTS[i % 2] for i, h in enumerate(hosts)}
    config, read_ledger = configure(backend, request, tmp_path, rel_pki, port, assignments)

    collector = CollectorProcess(config).start()
    link = FaultProxy([("127.0.0.1", port)]).start()
    # Enough series that the collector is busy committing when a kill lands.
    agents = [AgentProcess(tmp_path, rel_pki, h, link.port, rng, interfaces=4 if fleet else 30,
                           batch_max_records=200, interval="0.2" if fleet else "0.1")
              for h in hosts]
    counters = [a.counters for a in agents]
    try:
        start_agents(agents)
        kills = 25 if SOAK else 4
        for _ in range(kills):
            # Each outage leaves a backlog: once the agents are back they all ship at
            # once, and the kill lands among their commits.
            run_for(rng.uniform(0.0, 0.4), counters, rng)
            link_fault = rng.choice(["none", "delay", "blackhole"])
            if link_fault == "delay":
                link.delay_by(rng.uniform(0.005, 0.05))
            elif link_fault == "blackhole":
                link.blackhole()  # calls in flight when the collector dies stay unanswered
            collector.kill()
            run_for(rng.uniform(0.2, 1.0), counters, rng)
            link.pass_through()
            shipping_again = logged_since('"batch_ingested"', collector.log)
            collector.start()
            run_until(shipping_again, 60, "agents to ship again", counters, rng)
        run_for(rng.uniform(0.5, 1.0), counters, rng)
        drain(agents)
        reconcile(collector, agents, assignments, read_ledger)
        cut = sum(a.log_text().count("Stream removed") for a in agents)
        print(f"{len(agents)} agents, {kills} kills; calls cut off: {cut}; batches resent "
              f"after their commit: {resent_after_commit(collector)}; connections through "
              f"the proxy: {link.accepted}")
        assert collector.stop() == 0
    finally:
        for a in agents:
            a.kill()
        collector.kill()
        link.close()


def usage_batches(
    rng: random.Random, batches: int, size: int, host: str = "host-a"
) -> list[list[UsageRecord]]:
    """Records of ``host`` from the last hour, quantities drawn from ``rng``."""
    now_us = time.time_ns() // 1000
    out = []
    for b in range(batches):
        batch = []
        for i in range(size):
            cpu = rng.random() < 0.5
            start = now_us - 3_600_000_000 + (b * size + i) * 1000
            batch.append(UsageRecord(
                id=new_id(), host_id=host,
                metric="cpu.seconds" if cpu else "net.tx_bytes",
                unit="seconds" if cpu else "bytes",
                quantity=(Decimal(rng.randrange(0, 10**5)).scaleb(-2) if cpu
                          else Decimal(rng.randrange(0, 10**9))),
                start_us=start, end_us=start + 1000, seq=b * size + i,
            ))
        out.append(batch)
    return out


async def push_with_retries(
    stub: pb_grpc.IngestStub, request: pb.PushRequest, collector: CollectorProcess
) -> pb.PushResponse:
    """Push like an agent retries: a collector that recovers answers within 15 s."""
    deadline = time.monotonic() + 15
    error = ""
    while time.monotonic() < deadline:
        try:
            response: pb.PushResponse = await stub.Push(request, timeout=10)
        except grpc.aio.AioRpcError as exc:
            error = f"{exc.code().name}: {exc.details()}"
            await asyncio.sleep(0.1)
        else:
            return response
    raise AssertionError(f"collector still refuses after 15 s: {error}\n{tail(collector.log)}")


async def cancel_then_resend(
    collector: CollectorProcess, pki: Path, batches: list[list[UsageRecord]], rng: random.Random
) -> set[str]:
    """Send each batch and cancel the call after a random moment; then send each
    batch again, retrying like an agent; the ids acknowledged."""
    creds = grpc_channel_credentials(pki / "agents" / "host-a.pem",
                                     pki / "agents" / "host-a.key", pki / "ca.pem")
    channel = grpc.aio.secure_channel(collector.target, creds)
    acked: set[str] = set()
    try:
        stub = pb_grpc.IngestStub(channel)  # type: ignore[no-untyped-call]
        requests = [pb.PushRequest(records=[to_proto(r) for r in b]) for b in batches]
        for req in requests:
            call = stub.Push(req, timeout=10)
            await asyncio.sleep(rng.uniform(0.0, 0.03))
            call.cancel()
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
                await call
        for req in requests:
            response = await push_with_retries(stub, req, collector)
            assert {a.outcome for a in response.acks} <= {pb.ACCEPTED, pb.DUPLICATE}
            acked |= {a.id for a in response.acks}
    finally:
        await channel.close(grace=None)
    return acked


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.pg)])
def test_calls_cancelled_by_their_clients_leave_the_collector_serving(
    backend: str, tmp_path: Path, rel_pki: Path, rng: random.Random,
    request: pytest.FixtureRequest,
) -> None:
    """An agent stopping or killed while its call is in flight cancels the call, and
    gRPC cancels the handler wherever it is, in the middle of a ledger transaction
    too. Cancel calls at random moments, then send every record once more: all are
    posted once and the collector still serves."""
    port = free_port()
    assignments = {"host-a": "acme"}
    config, read_ledger = configure(backend, request, tmp_path, rel_pki, port, assignments)

    collector = CollectorProcess(config).start()
    try:
        batches = usage_batches(rng, 300 if SOAK else 100, 200)
        acked = asyncio.run(cancel_then_resend(collector, rel_pki, batches, rng))
        records = [r for b in batches for r in b]
        assert acked == {r.id for r in records}
        want: dict[str, Decimal] = {}
        for r in records:
            want[r.metric] = want.get(r.metric, Decimal(0)) + r.quantity
        assert rest_usage(collector, "acme") == want
        assert set(read_ledger().records) == acked
        verify = meterd("ledger", "verify", "--config", str(config))
        assert verify.returncode == 0, verify.stdout + verify.stderr
    finally:
        collector.kill()


async def push_all(
    collector: CollectorProcess, pki: Path, batches: Mapping[str, list[list[UsageRecord]]],
    rng: random.Random,
) -> tuple[set[str], int, int]:
    """Each host pushes its batches back to back, every one until it is answered (as
    an agent does), while the collector is killed with SIGKILL and restarted three
    times (some calls fail: the kills land among them). The ids
    acknowledged, the batches answered ``duplicate`` in part (their first commit's
    answer was lost), and the posting transactions that calls shared (as far as
    ``/metrics`` was read before each kill)."""
    acked: set[str] = set()
    resent = failed = 0
    channels = []
    progress = asyncio.Event()  # set whenever a batch is acknowledged

    async def host_pushes(host: str) -> None:
        nonlocal resent, failed
        creds = grpc_channel_credentials(pki / "agents" / f"{host}.pem",
                                         pki / "agents" / f"{host}.key", pki / "ca.pem")
        channel = grpc.aio.secure_channel(collector.target, creds)
        channels.append(channel)
        stub = pb_grpc.IngestStub(channel)  # type: ignore[no-untyped-call]
        for batch in batches[host]:
            request = pb.PushRequest(records=[to_proto(r) for r in batch])
            try:
                response = await stub.Push(request, timeout=10)
            except grpc.aio.AioRpcError:  # cut off by a kill, or refused while it restarts
                failed += 1
                response = await push_with_retries(stub, request, collector)
            outcomes = [a.outcome for a in response.acks]
            assert set(outcomes) <= {pb.ACCEPTED, pb.DUPLICATE}, response
            assert [a.id for a in response.acks] == [r.id for r in batch]
            resent += pb.DUPLICATE in outcomes
            acked.update(a.id for a in response.acks)
            progress.set()

    async def killer() -> None:
        """Kills at random points around a quarter, half and three quarters of the
        records acknowledged: mid-stream however fast the machine posts."""
        total = sum(map(len, itertools.chain(*batches.values())))
        for quarter in (1, 2, 3):
            point = total * rng.uniform(quarter / 4 - 0.1, quarter / 4 + 0.1)
            while len(acked) < point:
                progress.clear()
                await progress.wait()
            await asyncio.to_thread(collector.kill)
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            await asyncio.to_thread(collector.start)

    lives: dict[int, int] = {}  # the latest count read from each collector process
    pushing = True

    async def watcher() -> None:
        """Reads the count from ``/metrics`` again and again (a kill does not wait for
        it: a scrape may wait for the posts), keeping the latest of each process."""
        while pushing:
            proc = collector.proc
            with contextlib.suppress(OSError, ValueError, http.client.HTTPException):
                count = await asyncio.to_thread(shared_transactions, collector)
                if proc is not None and collector.proc is proc and proc.poll() is None:
                    lives[proc.pid] = count
            await asyncio.sleep(0.05)

    watching = asyncio.create_task(watcher())
    try:
        await asyncio.gather(*(host_pushes(h) for h in batches), killer())
    finally:
        pushing = False
        await watching
        for channel in channels:
            await channel.close(grace=None)
    assert failed > 0  # the kills landed among calls in flight
    assert collector.proc is not None
    lives[collector.proc.pid] = await asyncio.to_thread(shared_transactions, collector)
    return acked, resent, sum(lives.values())


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.pg)])
def test_collector_killed_while_calls_share_transactions_posts_everything_once(
    backend: str, tmp_path: Path, rel_pki: Path, rng: random.Random,
    request: pytest.FixtureRequest,
) -> None:
    """Twelve hosts of three accounts push 300-record batches back to back to a
    collector that posts one transaction per shard at a time, so that calls wait and
    share it (up to three, one per account, their records in one ``COPY`` on
    PostgreSQL); it is killed with SIGKILL three times while they do. Every record is
    then in the ledger once, with its quantity, and ``ledger verify`` is clean."""
    port = free_port()
    accounts = ("acme", "globex", "initech")
    hosts = HOSTS[:12]
    assignments = {h: accounts[i % 3] for i, h in enumerate(hosts)}
    config, read_ledger = configure(backend, request, tmp_path, rel_pki, port, assignments,
                                    ledger_extra="ingest_transactions = 1")
    collector = CollectorProcess(config).start()
    try:
        batches = {h: usage_batches(rng, 40 if SOAK else 12, 300, h) for h in hosts}
        acked, resent, shared = asyncio.run(push_all(collector, rel_pki, batches, rng))
        print(f"{sum(map(len, batches.values()))} batches; resent after their commit: "
              f"{resent}; transactions shared by calls: {shared}")
        records = {r.id: r for b in batches.values() for r in itertools.chain(*b)}
        assert acked == set(records)
        ledger = read_ledger()
        assert set(ledger.records) == set(records)  # each once: the view is keyed by id
        for record_id, row in ledger.records.items():
            sent = records[record_id]
            assert (row.account, row.host, row.metric, row.quantity) == (
                assignments[sent.host_id], sent.host_id, sent.metric, sent.quantity
            )
        for account in accounts:
            want: dict[str, Decimal] = {}
            for r in records.values():
                if assignments[r.host_id] == account:
                    want[r.metric] = want.get(r.metric, Decimal(0)) + r.quantity
            assert rest_usage(collector, account) == want
        verify = meterd("ledger", "verify", "--config", str(config))
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert shared > 0  # calls shared transactions (so the kills landed among such)
    finally:
        collector.kill()


@pytest.mark.pg
def test_postgres_restarted_during_ingest_collector_recovers_by_itself(
    pg_cluster: PgServer, tmp_path: Path, rel_pki: Path, rng: random.Random
) -> None:
    dsn = asyncio.run(Databases(pg_cluster.admin_dsn).create("meterd_rel"))
    port = free_port()
    assignments = {"host-a": "acme", "host-b": "globex"}
    collector = CollectorProcess(
        collector_config(tmp_path, rel_pki, port, assignments=assignments, shards=[dsn])
    ).start()
    agents = [AgentProcess(tmp_path, rel_pki, h, port, rng) for h in assignments]
    counters = [a.counters for a in agents]
    try:
        api_token(collector.config)  # made while the database is there
        start_agents(agents)
        outages = 4 if SOAK else 2
        for n in range(outages):
            run_for(rng.uniform(0.5, 1.5), counters, rng)
            if n % 2 == 1:
                pg_cluster.restart()  # a quick restart: connections drop under it
            else:
                told = logged_since("UNAVAILABLE: ledger unavailable", *(a.log for a in agents))
                pg_cluster.stop()
                run_for(rng.uniform(1.5, 3.0), counters, rng)
                # The collector says so: agents get UNAVAILABLE and retry; the API 503.
                run_until(told, 15, "an agent to be told the ledger is unavailable",
                          counters, rng)
                with pytest.raises(urllib.error.HTTPError) as info:
                    rest_get(collector, "/v1/accounts/acme/usage")
                assert info.value.code == 503
                pg_cluster.start()
            run_for(rng.uniform(1.0, 2.0), counters, rng)
            # It recovers by itself: same process, backlog drains.
            assert collector.proc is not None
            assert collector.proc.poll() is None, tail(collector.log)
            wait_until(lambda: all(a.view().records < 60 for a in agents), 30,
                       "the collector to recover and the backlog to drain:\n"
                       + tail(collector.log))
        drain(agents)
        reconcile(collector, agents, assignments, lambda: read_pg_ledger([dsn]))
        assert collector.stop() == 0
    finally:
        for a in agents:
            a.kill()
        collector.kill()
        with contextlib.suppress(Exception):
            pg_cluster.start()


def test_unassigned_host_is_held_then_rated_after_assignment_and_sighup(
    tmp_path: Path, rel_pki: Path, rng: random.Random
) -> None:
    port = free_port()
    final = {"host-a": "acme", "host-c": "initech"}
    config = collector_config(tmp_path, rel_pki, port, assignments={"host-a": "acme"})
    collector = CollectorProcess(config).start()
    agents = [AgentProcess(tmp_path, rel_pki, h, port, rng) for h in final]
    counters = [a.counters for a in agents]
    unassigned = agents[1]
    ledger = tmp_path / "ledger.db"

    def held() -> int:
        return sum(1 for h in read_sqlite_ledger(ledger).held.values() if h == "host-c")

    try:
        start_agents(agents)
        run_for(rng.uniform(1.0, 2.0), counters, rng)
        wait_until(lambda: held() > 20, 30, "records of host-c to be held")
        # Held survives a crash of the collector.
        collector.kill()
        run_for(rng.uniform(0.2, 0.8), counters, rng)
        collector.start()
        # Held is accepted: the agent's spool drains while its host waits.
        produced = unassigned.view().produced
        run_until(lambda: unassigned.view().records < 60
                  and unassigned.view().produced > produced + 30,
                  30, "the unassigned agent's spool to drain", counters, rng)
        view = read_sqlite_ledger(ledger)
        assert not [r for r in view.records.values() if r.host == "host-c"]
        assert rest_get(collector, "/v1/accounts/initech/usage")["usage"] == []

        config.write_text(config.read_text() + '[[assignments]]\nhost = "host-c"\n'
                          'account = "initech"\n')
        assert collector.proc is not None
        collector.proc.send_signal(signal.SIGHUP)
        run_for(rng.uniform(0.5, 1.5), counters, rng)
        wait_until(lambda: held() == 0, 30, "held records to be released:\n"
                   + tail(collector.log))
        drain(agents)
        reconcile(collector, agents, final, lambda: read_sqlite_ledger(ledger))
        assert collector.stop() == 0
    finally:
        for a in agents:
            a.kill()
        collector.kill()
