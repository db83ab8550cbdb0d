"""Ingest benchmark: simulated agents over real mTLS gRPC to a real collector on PostgreSQL.

Run from the repository root (PostgreSQL reachable as ``--pg``, a role that may create
databases)::

    .venv/bin/python -m bench.ingest_bench            # about 2 minutes
    .venv/bin/python -m bench.ingest_bench --help     # bigger runs, fewer parts

In one run:

1. **Throughput, one shard, then four shards** (four databases on the same server).
   ``--agents`` simulated agents, each a ``grpc.aio`` channel with its own agent
   certificate from a PKI made in a temporary folder, send ``--batch``-record batches
   back to back (each waits for its previous acknowledgement, as the real shipper
   does) to a real ``meterd collector run`` process. Throughput is records from the
   first send to the last acknowledgement (which the collector sends after the
   batch's shard transaction committed); latency is per call. Requests are encoded
   before the clock starts, so the clients cost little of the two cores. Every
   acknowledgement is checked: each record must come back ``ACCEPTED``.
2. **The ceiling**: a raw ``COPY`` (asyncpg ``copy_records_to_table``) of the same
   rows, the ledger's record columns, into an unindexed table, on one connection and
   on two; our throughput is printed as a fraction of the faster.
3. **A naive path, for context**: one ``INSERT`` per record (a round trip each) into a
   table shaped like the ledger's record table, one transaction per batch.
4. **Latency at an offered load** (``--offered``, default 10,000 records/s) on one
   shard: ``--latency-agents`` agents each send a ``--latency-batch``-record batch
   on a fixed schedule, whether or not earlier calls have been answered, so a slow
   collector shows as latency, not as a lower offered rate. Latency is measured from
   the scheduled send time to the acknowledgement.

Each phase also prints the CPU time the collector process, the PostgreSQL server
processes and this client process used, in cores (CPU seconds per second of wall time).
Databases are created fresh and dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from common.tls import restrict_grpc_to_tls13

restrict_grpc_to_tls13()  # before anything imports grpc

import asyncpg  # noqa: E402
import grpc  # noqa: E402

from bench.support import (  # noqa: E402
    machine,
    make_pki,
    percentile,
    postgres_pids,
    tree_cpu_ns,
)
from common.ids import new_id  # noqa: E402
from common.proto import meterd_pb2 as pb  # noqa: E402
from common.records import build_record  # noqa: E402
from common.tls import grpc_channel_credentials  # noqa: E402
from common.wire import column_messages, to_columns, to_proto  # noqa: E402

TARGET_RATE = 50_000
TARGET_FRACTION = 0.30
TARGET_P99_MS = 100.0
PUSH = "/meterd.v1.Ingest/Push"

TARIFF = """
[[prices]]
id = "cpu"
product = "Compute"
currency = "eur"
metric = "cpu.seconds"
unit = "hour"
billing_scheme = "per_unit"
unit_amount_decimal = "0.0125"
recurring = { interval = "month", usage_type = "metered", aggregate_usage = "sum" }

[[prices]]
id = "ram"
product = "Memory"
currency = "eur"
metric = "mem.used_byte_seconds"
unit = "GiB-hour"
billing_scheme = "per_unit"
unit_amount_decimal = "0.004"
recurring = { interval = "month", usage_type = "metered", aggregate_usage = "sum" }

[[prices]]
id = "egress"
product = "Bandwidth"
currency = "eur"
metric = "net.tx_bytes"
unit = "GB"
billing_scheme = "per_unit"
unit_amount_decimal = "0.013"
recurring = { interval = "month", usage_type = "metered", aggregate_usage = "sum" }
"""

# One sampling cycle of a hypervisor's agent: per VM cgroup, CPU, memory and disk I/O;
# per interface, traffic. Three of the seven metrics are priced.
SERIES: tuple[tuple[str, str, str, str], ...] = (
    ("cpu.seconds", "seconds", "cgroup", "machine.slice/vm-{i}.scope"),
    ("mem.used_byte_seconds", "byte_seconds", "cgroup", "machine.slice/vm-{i}.scope"),
    ("disk.read_bytes", "bytes", "cgroup", "machine.slice/vm-{i}.scope"),
    ("disk.write_bytes", "bytes", "cgroup", "machine.slice/vm-{i}.scope"),
    ("net.rx_bytes", "bytes", "interface", "tap{i}"),
    ("net.tx_bytes", "bytes", "interface", "tap{i}"),
    ("host.uptime_seconds", "seconds", "", ""),
)


def quantity(metric: str, rng: random.Random) -> str:
    if metric == "cpu.seconds":
        return f"{rng.randrange(0, 20_000_000) / 1_000_000:.6f}".rstrip("0").rstrip(".") or "0"
    if metric == "mem.used_byte_seconds":
        return str(rng.randrange(2**30, 64 * 2**30) * 10)
    if metric == "host.uptime_seconds":
        return "10"
    return str(rng.randrange(0, 10**9))


@dataclass
class Host:
    host: str
    account: str
    seq: int = 0
    cycle: int = 0
    epoch: str = field(default_factory=new_id)  # the agent's spool: its sequence epoch


def make_batch(h: Host, count: int, start_us: int, rng: random.Random,
               form: str = "columns") -> bytes:
    """One encoded PushRequest of ``count`` records of host ``h``, continuing its cycles:
    in column form, as the agent sends it, or with ``form="rows"`` one message per record."""
    records = []
    for _ in range(count):
        metric, unit, label, value = SERIES[h.seq % len(SERIES)]
        vm = (h.seq // len(SERIES)) % 16
        window = start_us + h.cycle * 10_000_000
        records.append(build_record(
            new_id(), h.host, metric, quantity(metric, rng), unit, window,
            window + 10_000_000, h.seq, {label: value.format(i=vm)} if label else {},
        ))
        h.seq += 1
        if h.seq % (len(SERIES) * 16) == 0:
            h.cycle += 1
    request = pb.PushRequest(agent_version="bench", sent_at_us=time.time_ns() // 1000,
                             seq_epoch=h.epoch, seq_epoch_start=0)
    if form == "rows":
        request.records.extend(map(to_proto, records))
    else:
        request.columns.CopyFrom(to_columns(records))
    return request.SerializeToString()


def messages_of(payload: bytes) -> Sequence[pb.UsageRecord]:
    """The record messages of an encoded PushRequest, in either form."""
    request = pb.PushRequest.FromString(payload)
    if request.HasField("columns"):
        return column_messages(request.columns)[0]
    return request.records


# -- the collector ---------------------------------------------------------------------


def collector_toml(workdir: Path, pki_dir: Path, dsns: Sequence[str],
                   hosts: Sequence[Host], ledger: Sequence[str] = ()) -> Path:
    from collector.ledger.sharding import SLOTS

    (workdir / "tariff.toml").write_text(TARIFF)
    shards = []
    for i, dsn in enumerate(dsns):
        lo, hi = i * SLOTS // len(dsns), (i + 1) * SLOTS // len(dsns) - 1
        shards.append(f'[[ledger.shards]]\ndsn = "{dsn}"\nslots = ["{lo}-{hi}"]\n')
    accounts = "".join(f'[accounts.{h.account}]\ncurrency = "eur"\n\n' for h in hosts)
    assignments = "".join(
        f'[[assignments]]\nhost = "{h.host}"\naccount = "{h.account}"\n\n' for h in hosts
    )
    settings = "".join(f"{setting}\n" for setting in ledger)
    path = workdir / "collector.toml"
    path.write_text(f"""\
tariff = "tariff.toml"

[tls]
cert = "{pki_dir}/servers/localhost.pem"
key = "{pki_dir}/servers/localhost.key"
ca = "{pki_dir}/ca.pem"

[ingest]
listen = "127.0.0.1:0"

[api]
listen = "127.0.0.1:0"

[ledger]
{settings}{"".join(shards)}
{accounts}{assignments}""")
    return path


# -- agents ----------------------------------------------------------------------------


@dataclass
class Client:
    host: Host
    channel: grpc.aio.Channel
    push: Callable[..., Awaitable[bytes]]


def open_client(pki_dir: Path, h: Host, target: str) -> Client:
    creds = grpc_channel_credentials(pki_dir / "agents" / f"{h.host}.pem",
                                     pki_dir / "agents" / f"{h.host}.key",
                                     pki_dir / "ca.pem")
    channel = grpc.aio.secure_channel(
        target, creds, options=[("grpc.max_send_message_length", 16 * 2**20),
                                ("grpc.ssl_target_name_override", "localhost")])
    push = channel.unary_unary(PUSH, request_serializer=None, response_deserializer=None)
    return Client(h, channel, push)


@dataclass
class Outcome:
    records: int = 0
    rejected: list[str] = field(default_factory=list)
    busy_retries: int = 0
    latencies: list[float] = field(default_factory=list)
    started: list[float] = field(default_factory=list)  # when each call was due or sent


async def send(client: Client, payload: bytes, count: int, out: Outcome,
               since: float | None = None) -> None:
    """One batch; retried after the delay when the collector is busy (counted)."""
    started = time.perf_counter() if since is None else since
    while True:
        try:
            raw = await client.push(payload, timeout=120)
            break
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            out.busy_retries += 1
            await asyncio.sleep(0.05)
    out.latencies.append(time.perf_counter() - started)
    out.started.append(started)
    response = pb.PushResponse.FromString(raw)
    accepted = sum(1 for a in response.acks if a.outcome == pb.ACCEPTED)
    if accepted != count:
        out.rejected.extend(f"{a.outcome}:{a.reason}" for a in response.acks
                            if a.outcome != pb.ACCEPTED)
        if len(response.acks) != count:
            out.rejected.append(f"{count - len(response.acks)} records not acknowledged")
    out.records += accepted


@dataclass
class Cpu:
    pids: dict[str, list[int]]
    start: dict[str, int] = field(default_factory=dict)
    wall: float = 0.0

    def begin(self) -> None:
        self.pids["postgres"] = postgres_pids()  # pools open backends as they go
        self.start = {k: tree_cpu_ns(v) for k, v in self.pids.items()}
        self.start["clients"] = process_cpu_ns_self()
        self.wall = time.perf_counter()

    def end(self) -> dict[str, float]:
        wall = time.perf_counter() - self.wall
        used = {k: (tree_cpu_ns(v) - self.start[k]) / 1e9 / wall for k, v in self.pids.items()}
        used["clients"] = (process_cpu_ns_self() - self.start["clients"]) / 1e9 / wall
        return used


def process_cpu_ns_self() -> int:
    return time.process_time_ns()


@dataclass
class Phase:
    name: str
    records: int
    seconds: float
    latencies: list[float]
    cpu: dict[str, float]
    busy_retries: int
    offered: float | None = None
    started: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.records / self.seconds

    def describe(self) -> str:
        p50, p99 = percentile(self.latencies, 0.5), percentile(self.latencies, 0.99)
        cpu = ", ".join(f"{k} {v:.2f} ({v * self.seconds / self.records * 1e6:.1f} us/record)"
                        for k, v in self.cpu.items())
        retries = f", {self.busy_retries} busy retries" if self.busy_retries else ""
        return (f"{self.rate:,.0f} records/s ({self.records:,} in {self.seconds:.1f} s), "
                f"ack p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, "
                f"max {max(self.latencies) * 1e3:.1f} ms{retries}; cores used: {cpu}"
                + self.slow_seconds())

    def slow_seconds(self) -> str:
        """Whether the calls over the latency target cluster in time (stalls) or not."""
        if not self.started:
            return ""
        t0 = min(self.started)
        slow = {int(s - t0) for s, lat in zip(self.started, self.latencies, strict=True)
                if lat * 1e3 >= TARGET_P99_MS}
        total = int(max(self.started) - t0) + 1
        return (f"; calls of {TARGET_P99_MS:g} ms or more fell in {len(slow)} of "
                f"{total} one-second intervals")


def check(out: Outcome, expected: int, name: str) -> None:
    if out.rejected or out.records != expected:
        raise SystemExit(f"{name}: {out.records} of {expected} accepted; "
                         f"first problems: {out.rejected[:5]}")


async def warm_up(clients: Sequence[Client], start_us: int, rng: random.Random) -> None:
    """Two rounds of small concurrent batches: TLS handshakes, pool connections,
    prepared statements."""
    for _ in range(2):
        out = Outcome()
        await asyncio.gather(*(send(c, make_batch(c.host, 10, start_us, rng), 10, out)
                               for c in clients))
        check(out, 10 * len(clients), "warm-up")


async def closed_loop(name: str, clients: Sequence[Client], batches: dict[str, list[bytes]],
                      batch: int, cpu: Cpu) -> Phase:
    out = Outcome()

    async def agent(client: Client) -> None:
        for payload in batches[client.host.host]:
            await send(client, payload, batch, out)

    expected = sum(len(b) for b in batches.values()) * batch
    cpu.begin()
    t0 = time.perf_counter()
    await asyncio.gather(*(agent(c) for c in clients))
    seconds = time.perf_counter() - t0
    used = cpu.end()
    check(out, expected, name)
    return Phase(name, out.records, seconds, out.latencies, used, out.busy_retries)


async def open_loop(name: str, clients: Sequence[Client], batches: dict[str, list[bytes]],
                    batch: int, offered: float, cpu: Cpu) -> Phase:
    """Each client sends its batches on a fixed schedule; all together ``offered``
    records per second, spread evenly in time."""
    out = Outcome()
    period = len(clients) * batch / offered  # seconds between one client's batches
    tasks: list[asyncio.Task[None]] = []

    async def agent(index: int, client: Client, t0: float) -> None:
        due = t0 + period * index / len(clients)
        for payload in batches[client.host.host]:
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(client, payload, batch, out, since=due)))
            due += period

    expected = sum(len(b) for b in batches.values()) * batch
    cpu.begin()
    t0 = time.perf_counter()
    await asyncio.gather(*(agent(i, c, t0) for i, c in enumerate(clients)))
    await asyncio.gather(*tasks)
    seconds = time.perf_counter() - t0
    used = cpu.end()
    check(out, expected, name)
    return Phase(name, out.records, seconds, out.latencies, used, out.busy_retries, offered,
                 out.started)


# -- PostgreSQL helpers -------------------------------------------------------------------


class Databases:
    def __init__(self, admin_dsn: str) -> None:
        self.admin_dsn = admin_dsn
        self.created: list[str] = []

    async def create(self) -> str:
        name = f"meterd_bench_{new_id().replace('-', '')[-12:]}"
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        self.created.append(name)
        base, _, _ = self.admin_dsn.rpartition("/")
        return f"{base}/{name}"

    async def drop_all(self) -> None:
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            for name in self.created:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


COLUMNS = ("record_id", "account_id", "entry_id", "host_id", "metric", "unit", "quantity",
           "start_us", "end_us", "seq", "labels", "received_us")


def rows_of(payloads: Sequence[bytes], account_of: dict[str, str]) -> list[list[tuple[Any, ...]]]:
    """The ledger rows of each batch: what the collector stores for its records."""
    now = time.time_ns() // 1000
    out = []
    for payload in payloads:
        entry = new_id()
        rows = []
        for r in messages_of(payload):
            rows.append((r.id, account_of[r.host_id], entry, r.host_id, r.metric, r.unit,
                         Decimal(r.quantity), r.start_us, r.end_us, r.seq,
                         json.dumps(dict(r.labels), sort_keys=True), now))
        out.append(rows)
    return out


async def copy_ceiling(dsn: str, batches: Sequence[Sequence[tuple[Any, ...]]],
                       connections: int, chunk: int) -> float:
    """Rows per second of COPY into an unindexed table over ``connections`` connections."""
    rows = [r for b in batches for r in b]
    conns = [await asyncpg.connect(dsn) for _ in range(connections)]
    try:
        table = f"copy_{connections}"
        await conns[0].execute(
            f"CREATE TABLE {table} (record_id text, account_id text, entry_id text,"
            " host_id text, metric text, unit text, quantity numeric, start_us bigint,"
            " end_us bigint, seq bigint, labels jsonb, received_us bigint)"
        )
        parts = [rows[i::connections] for i in range(connections)]

        async def copy(conn: asyncpg.Connection, part: list[tuple[Any, ...]]) -> None:
            for i in range(0, len(part), chunk):
                await conn.copy_records_to_table(table, records=part[i:i + chunk],
                                                 columns=COLUMNS)

        t0 = time.perf_counter()
        await asyncio.gather(*(copy(c, p) for c, p in zip(conns, parts, strict=True)))
        seconds = time.perf_counter() - t0
        count = await conns[0].fetchval(f"SELECT count(*) FROM {table}")
        if count != len(rows):
            raise SystemExit(f"COPY stored {count} of {len(rows)} rows")
        return len(rows) / seconds
    finally:
        for c in conns:
            await c.close()


async def naive_inserts(dsn: str, batches: Sequence[Sequence[tuple[Any, ...]]],
                        connections: int) -> float:
    """Records per second of one INSERT per record into a table shaped like the
    ledger's records table, one transaction per batch, ``connections`` at a time."""
    from collector.ledger.postgres_store import SCHEMA

    records_ddl = SCHEMA[:SCHEMA.index("CREATE TABLE IF NOT EXISTS held")]
    pool = await asyncpg.create_pool(dsn, min_size=connections, max_size=connections)
    try:
        await pool.execute(records_ddl)
        sql = f"INSERT INTO records VALUES ({', '.join(f'${i}' for i in range(1, 13))})"
        queue = list(batches)

        async def worker() -> None:
            async with pool.acquire() as conn:
                statement = await conn.prepare(sql)
                while queue:
                    batch = queue.pop()
                    async with conn.transaction():
                        for row in batch:
                            await statement.fetch(*row)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        seconds = time.perf_counter() - t0
        return sum(len(b) for b in batches) / seconds
    finally:
        await pool.close()


# -- the run ---------------------------------------------------------------------------


async def with_collector(args: argparse.Namespace, workdir: Path, pki_dir: Path,
                         dsns: Sequence[str], hosts: Sequence[Host],
                         body: Callable[[Sequence[Client], Cpu], Awaitable[list[Phase]]],
                         processes: int = 1) -> list[Phase]:
    """Run ``body`` against ``processes`` collector processes on the same ledger; agent
    ``i`` talks to collector ``i mod processes``, as behind a TCP load balancer."""
    from tests.harness import CollectorProcess

    procs: list[CollectorProcess] = []
    clients: list[Client] = []
    try:
        for i in range(processes):
            folder = workdir if processes == 1 else workdir / f"collector-{i}"
            await asyncio.to_thread(folder.mkdir, parents=True)
            procs.append(CollectorProcess(
                collector_toml(folder, pki_dir, dsns, hosts, args.ledger)))
            procs[-1].start(timeout=60)
        clients = [open_client(pki_dir, h, procs[i % processes].target)
                   for i, h in enumerate(hosts)]
        cpu = Cpu({"collector": [p.proc.pid for p in procs if p.proc is not None],
                   "postgres": []})
        return await body(clients, cpu)
    finally:
        for c in clients:
            await c.channel.close(grace=None)
        for p in procs:
            p.stop()


def encode_batches(hosts: Sequence[Host], per_host: int, batch: int, start_us: int,
                   rng: random.Random, form: str = "columns") -> dict[str, list[bytes]]:
    return {h.host: [make_batch(h, batch, start_us, rng, form) for _ in range(per_host)]
            for h in hosts}


PHASES = ("throughput", "paced", "sharded", "two", "ceiling")


async def run(args: argparse.Namespace) -> int:
    phases_wanted = set(args.phases.split(","))
    if not phases_wanted <= set(PHASES):
        raise SystemExit(f"--phases: choose from {','.join(PHASES)}")
    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="meterd-ingest-bench-"))
    databases = Databases(args.pg)
    print(f"meterd ingest benchmark: {machine()}")
    print(f"load average before the run: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"PostgreSQL {args.pg.rpartition('@')[2]}; work directory {workdir}")
    hosts = [Host(f"agent-{i:03d}", f"acct-{i:03d}") for i in range(args.agents)]
    lat_hosts = [Host(f"paced-{i:03d}", f"paced-acct-{i:03d}")
                 for i in range(args.latency_agents)]
    pki_dir = make_pki(workdir / "pki", [h.host for h in hosts + lat_hosts])
    per_host = max(1, args.records // (args.agents * args.batch))
    # Windows start far enough back that every record ends before the collector's now.
    start_us = time.time_ns() // 1000 - 6 * 3600 * 1_000_000
    phases: list[Phase] = []
    ceiling = naive = None
    try:
        t = time.perf_counter()
        one = encode_batches(hosts, per_host, args.batch, start_us, rng, args.form)
        lat_per_host = max(1, round(args.latency_seconds * args.offered
                                    / (args.latency_agents * args.latency_batch)))
        paced = (encode_batches(lat_hosts, lat_per_host, args.latency_batch, start_us, rng,
                                 args.form)
                 if "paced" in phases_wanted else {})
        print(f"encoded {sum(map(len, one.values())) * args.batch:,} + "
              f"{sum(map(len, paced.values())) * args.latency_batch:,} records "
              f"({'column form' if args.form == 'columns' else 'a message per record'})"
              f" in {time.perf_counter() - t:.1f} s")

        # -- one shard: throughput, then the paced latency run ------------------------
        if phases_wanted & {"throughput", "paced"}:
            dsn1 = await databases.create()

            async def one_shard(clients: Sequence[Client], cpu: Cpu) -> list[Phase]:
                out = []
                await warm_up(clients, start_us, rng)
                if "throughput" in phases_wanted:
                    print(f"\n[throughput] 1 shard: {args.agents} agents x {per_host} batches"
                          f" of {args.batch} records, back to back", flush=True)
                    out.append(await closed_loop(
                        "1 shard", [c for c in clients if c.host in hosts], one, args.batch,
                        cpu))
                    print(f"  {out[-1].describe()}", flush=True)
                if "paced" in phases_wanted:
                    print(f"\n[paced] 1 shard: offered {args.offered:,.0f} records/s from "
                          f"{args.latency_agents} agents, batches of {args.latency_batch}, "
                          f"for about {args.latency_seconds:g} s", flush=True)
                    out.append(await open_loop(
                        "1 shard paced", [c for c in clients if c.host in lat_hosts], paced,
                        args.latency_batch, args.offered, cpu))
                    print(f"  {out[-1].describe()}", flush=True)
                return out

            phases += await with_collector(
                args, workdir / "one-shard", pki_dir, [dsn1],
                hosts + (lat_hosts if "paced" in phases_wanted else []), one_shard)

        # -- four shards -------------------------------------------------------------
        if "sharded" in phases_wanted and args.shards > 1:
            four = encode_batches(hosts, per_host, args.batch, start_us, rng, args.form)
            dsns = [await databases.create() for _ in range(args.shards)]

            async def sharded(clients: Sequence[Client], cpu: Cpu) -> list[Phase]:
                await warm_up(clients, start_us, rng)
                print(f"\n[sharded] {args.shards} shards (databases on the same server): "
                      f"{args.agents} agents x {per_host} batches of {args.batch}", flush=True)
                c = await closed_loop(f"{args.shards} shards", clients, four, args.batch, cpu)
                print(f"  {c.describe()}", flush=True)
                return [c]

            phases += await with_collector(args, workdir / "four-shards", pki_dir, dsns,
                                           hosts, sharded)

        # -- two collector processes, one shard -----------------------------------------
        if "two" in phases_wanted:
            more = encode_batches(hosts, per_host, args.batch, start_us, rng, args.form)
            dsn2 = await databases.create()

            async def two(clients: Sequence[Client], cpu: Cpu) -> list[Phase]:
                await warm_up(clients, start_us, rng)
                print(f"\n[two] 2 collector processes on 1 shard, agents split between them:"
                      f" {args.agents} agents x {per_host} batches of {args.batch}", flush=True)
                c = await closed_loop("2 collectors", clients, more, args.batch, cpu)
                print(f"  {c.describe()}", flush=True)
                return [c]

            phases += await with_collector(args, workdir / "two-collectors", pki_dir, [dsn2],
                                           hosts, two, processes=2)

        # -- the ceiling and the naive path ----------------------------------------------
        if "ceiling" in phases_wanted:
            account_of = {h.host: h.account for h in hosts}
            rows = rows_of([p for b in one.values() for p in b], account_of)
            dsn_raw = await databases.create()
            print(f"\n[ceiling] raw COPY of the same {sum(map(len, rows)):,} rows into an "
                  "unindexed table", flush=True)
            copy1 = await copy_ceiling(dsn_raw, rows, 1, args.copy_chunk)
            copy2 = await copy_ceiling(dsn_raw, rows, 2, args.copy_chunk)
            ceiling = max(copy1, copy2)
            print(f"  1 connection {copy1:,.0f} rows/s, 2 connections {copy2:,.0f} rows/s")
            naive_batches = rows[: max(1, args.naive_records // args.batch)]
            print(f"\n[naive] one INSERT per record, {sum(map(len, naive_batches)):,} records,"
                  f" {args.naive_connections} connections", flush=True)
            naive = await naive_inserts(dsn_raw, naive_batches, args.naive_connections)
            print(f"  {naive:,.0f} records/s")
    finally:
        await databases.drop_all()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    print("\n=== results ===")
    for p in phases:
        if p.offered is None:
            met = "met" if p.rate >= TARGET_RATE else "MISSED"
            line = (f"{p.name:<16} {p.rate:>9,.0f} records/s send->ack after commit   "
                    f"[target >= {TARGET_RATE:,}: {met}]")
            if ceiling is not None:
                fraction = p.rate / ceiling
                ok = "met" if fraction >= TARGET_FRACTION else "MISSED"
                line += (f"\n{'':<16} = {fraction:.2f} of raw COPY   "
                         f"[target >= {TARGET_FRACTION}: {ok}]")
            print(line)
            print(f"{'':<16} ack p50 {percentile(p.latencies, 0.5) * 1e3:.1f} ms, "
                  f"p99 {percentile(p.latencies, 0.99) * 1e3:.1f} ms "
                  f"(batches of {args.batch}, {args.agents} agents back to back)")
    for p in phases:
        if p.offered is not None:
            p99 = percentile(p.latencies, 0.99) * 1e3
            print(f"{p.name:<16} offered {p.offered:,.0f} records/s, carried {p.rate:,.0f}: "
                  f"ack p50 {percentile(p.latencies, 0.5) * 1e3:.1f} ms, p99 {p99:.1f} ms   "
                  f"[target p99 < {TARGET_P99_MS:g} ms: "
                  f"{'met' if p99 < TARGET_P99_MS else 'MISSED'}]")
    if ceiling is not None and naive is not None:
        print(f"{'raw COPY':<16} {ceiling:>9,.0f} rows/s (ceiling: best of 1 and 2 connections)")
        print(f"{'naive INSERTs':<16} {naive:>9,.0f} records/s (one INSERT per record, "
              "context only)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="admin DSN of the PostgreSQL server (creates and drops databases)")
    parser.add_argument("--agents", type=int, default=32, help="concurrent agents")
    parser.add_argument("--batch", type=int, default=1000,
                        help="records per batch (the agent's default batch_max_records)")
    # 32 agents x 32 batches: the first calls' start and the last ones' finish (fewer
    # agents left, so fewer calls to share a transaction) weigh little in the figure.
    parser.add_argument("--records", type=int, default=1_024_000,
                        help="records per throughput phase (default 1,024,000)")
    parser.add_argument("--shards", type=int, default=4, help="shards in the second phase")
    parser.add_argument("--offered", type=float, default=10_000.0,
                        help="offered records/s in the latency phase")
    parser.add_argument("--latency-agents", type=int, default=100)
    parser.add_argument("--latency-batch", type=int, default=100)
    parser.add_argument("--latency-seconds", type=float, default=20.0)
    parser.add_argument("--copy-chunk", type=int, default=10_000, help="rows per COPY")
    parser.add_argument("--naive-records", type=int, default=20_000)
    parser.add_argument("--naive-connections", type=int, default=10)
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"comma-separated subset of {','.join(PHASES)} (default: all)")
    parser.add_argument("--form", choices=("columns", "rows"), default="columns",
                        help="how agents send records: in column form, as the agent does"
                        " (default), or one message per record, as agents before it did")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--ledger", action="append", default=[], metavar="SETTING",
                        help="a line for the collector's [ledger] table, e.g."
                             " ingest_transactions=2 (repeatable)")
    args = parser.parse_args(argv)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
