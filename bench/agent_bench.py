"""Agent benchmark: memory and CPU of a real ``meterd agent run``, and spool throughput.

Run from the repository root::

    .venv/bin/python -m bench.agent_bench            # about 6 minutes
    .venv/bin/python -m bench.agent_bench --help     # longer runs, fewer parts
    .venv/bin/python -m bench.agent_bench --meterd /opt/meterd/bin/meterd   # as packaged

In one run it prints:

1. **RSS** of a real agent process (the ``meterd`` console script, which checks the
   configuration and certificates and then becomes the long-running agent process
   by ``exec``, same pid: ``agent/__main__.py``) shipping over mTLS to a real
   collector process (embedded SQLite ledger, started as ``tests/harness.py`` starts
   it), sampled every half second after a warm-up; the figure held against the
   target is the largest sample. The agent ships to a live collector, not to
   nothing: the shipper's work (read a batch, the gRPC call, delete on ack, status
   writes) is part of what the agent costs its host. ``--meterd`` runs another
   installation's console script (the Debian package's, or a virtualenv with only
   the runtime dependencies) instead of this virtualenv's.
2. **CPU at a real 10 s interval**, host metrics plus 20 cgroups of a fake cgroupfs
   tree laid out as the kernel lays it out (``[cgroups] root/patterns`` point at
   it), shipping at its default cadence (``[shipping] interval_seconds``), measured
   directly for ``--real-seconds`` (default 120 s: 12 cycles, 2 shipments). Then,
   for a per-cycle figure that a short run can measure precisely, the agent samples
   at a short interval (0.25 s) for many cycles, shipping every ``10 s / 0.25 s``
   times faster too, so a cycle carries the same share of a shipment as at 10 s;
   then SIGHUP makes it sample hourly and its idle CPU rate is measured. CPU at a
   10 s interval, extrapolated, is ``cpu_per_cycle / 10 s + idle_rate``, as % of
   one core.
3. **Spool throughput**: records written and committed per second through
   ``Spool.append`` (each call one transaction with the sampler state, as the agent
   calls it once per cycle), next to raw ``sqlite3`` inserts of the same rows into the
   same table with the same PRAGMAs (WAL, synchronous=FULL) and the same rows per
   transaction, in the same run, alternating; printed as a ratio.
4. If ``prometheus-node-exporter`` is installed, the same RSS and CPU figures for it
   (run by hand on a free loopback port, scraped at the same short interval, then
   idle, then every 10 s for ``--real-seconds``), and ours as ratios to it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from bench.support import (
    machine,
    make_pki,
    meterd_exe,
    mib,
    process_cpu_ns,
    rss_bytes,
    stop_process,
    uss_bytes,
)

HOST = "bench-host"
TARGET_INTERVAL_S = 10.0
TARGET_RSS = 40 * 10**6  # 40 MB, the stricter reading (38.1 MiB)
TARGET_CPU_PERCENT = 0.2
TARGET_SPOOL_RATIO = 0.5
NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"


# -- a cgroupfs tree as the kernel lays it out -----------------------------------------


def _cpu_stat(usage_usec: int) -> str:
    user = usage_usec * 2 // 3
    return (
        f"usage_usec {usage_usec}\nuser_usec {user}\nsystem_usec {usage_usec - user}\n"
        "nice_usec 0\ncore_sched.force_idle_usec 0\nnr_periods 0\nnr_throttled 0\n"
        "throttled_usec 0\nnr_bursts 0\nburst_usec 0\n"
    )


def _write_cgroup(root: Path, relative: str, usage_usec: int, memory: int,
                  io: dict[str, tuple[int, int]]) -> None:
    path = root / relative
    path.mkdir(parents=True, exist_ok=True)
    (path / "cgroup.procs").write_text("")
    (path / "cgroup.controllers").write_text("cpu io memory pids\n")
    (path / "cgroup.subtree_control").write_text("")
    (path / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    (path / "cpu.pressure").write_text(
        "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
        "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
    )
    (path / "memory.stat").write_text("anon 0\nfile 0\nkernel 0\n")
    (path / "memory.max").write_text("max\n")
    (path / "pids.current").write_text("3\n")
    (path / "cpu.stat").write_text(_cpu_stat(usage_usec))
    (path / "memory.current").write_text(f"{memory}\n")
    (path / "io.stat").write_text("".join(
        f"{dev} rbytes={r} wbytes={w} rios={r // 4096} wios={w // 4096} dbytes=0 dios=0\n"
        for dev, (r, w) in io.items()
    ))


def build_cgroupfs(root: Path, tenants: int) -> list[str]:
    """A cgroup v2 tree with ``tenants`` metered cgroups (about 60% VMs under
    machine.slice, the rest docker scopes under system.slice) and the usual
    unmetered system services around them; the patterns that select the tenants."""
    root.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    (root / "cgroup.subtree_control").write_text("cpu io memory pids\n")
    (root / "cpu.stat").write_text(_cpu_stat(9_900_000_000))
    for slice_ in ("init.scope", "machine.slice", "system.slice", "user.slice"):
        _write_cgroup(root, slice_, 50_000_000, 10**9, {})
    for service in ("sshd.service", "systemd-journald.service", "cron.service",
                    "containerd.service", "libvirtd.service"):
        _write_cgroup(root, f"system.slice/{service}", 1_000_000, 50 * 2**20, {"8:0": (4096, 0)})
    vms = tenants * 3 // 5
    for i in range(vms):
        _write_cgroup(root, f"machine.slice/machine-qemu\\x2d{i + 1}\\x2dvm{i:02d}.scope",
                      (i + 1) * 7_000_000_123, (i + 1) * 2**30,
                      {"8:0": (i * 10**9, i * 2 * 10**9), "253:0": (i * 4096, 0)})
    for i in range(tenants - vms):
        _write_cgroup(root, f"system.slice/docker-{i:064x}.scope", (i + 1) * 123_456_789,
                      (i + 1) * 256 * 2**20, {"8:16": (i * 10**6, i * 5 * 10**6)})
    return ["machine.slice/*", "system.slice/docker-*.scope"]


# -- configuration --------------------------------------------------------------------


def collector_toml(workdir: Path, pki_dir: Path) -> Path:
    from tests.harness import collector_config

    return collector_config(
        workdir, pki_dir, assignments=f'[[assignments]]\nhost = "{HOST}"\naccount = "acme"\n'
    )


def agent_toml(path: Path, *, port: int, interval: str, pki_dir: Path, cgroup_root: Path,
               patterns: Sequence[str], ship_interval: str | None = None) -> Path:
    """The agent's configuration; the shipping cadence is the default unless given."""
    shipping = ""
    if ship_interval is not None:
        shipping = f'\n[shipping]\ninterval_seconds = "{ship_interval}"\n'
    path.write_text(f"""\
collector = "127.0.0.1:{port}"
server_name = "localhost"
interval_seconds = "{interval}"
spool_path = "spool.db"
{shipping}
[tls]
cert = "{pki_dir}/agents/{HOST}.pem"
key = "{pki_dir}/agents/{HOST}.key"
ca = "{pki_dir}/ca.pem"

[cgroups]
root = "{cgroup_root}"
patterns = {json.dumps(list(patterns))}
""")
    return path


# -- measuring a process ----------------------------------------------------------------


@dataclass
class Window:
    seconds: float
    cpu_s: float
    rss: list[int]
    events: int  # sampling cycles or scrapes in the window


def measure(pid: int, seconds: float, every: float | None = None,
            tick: Callable[[], None] | None = None) -> Window:
    """CPU time and RSS samples of ``pid`` over ``seconds``; ``tick`` runs every ``every``
    seconds on a fixed schedule (a scrape), counted as events."""
    rss: list[int] = []
    events = 0
    start = time.monotonic()
    cpu0 = process_cpu_ns(pid)
    next_rss = start
    next_tick = start
    end = start + seconds
    while True:
        now = time.monotonic()
        if now >= end:
            break
        if tick is not None and every is not None and now >= next_tick:
            tick()
            events += 1
            next_tick += every
        if now >= next_rss:
            rss.append(rss_bytes(pid))
            next_rss += 0.5
        wake = min(end, next_rss, next_tick if tick is not None else end)
        time.sleep(max(0.0, wake - time.monotonic()))
    cpu1 = process_cpu_ns(pid)
    return Window(time.monotonic() - start, (cpu1 - cpu0) / 1e9, rss, events)


@dataclass
class CpuFigures:
    per_event_ms: float
    idle_percent: float
    at_target_percent: float
    events: int
    rss_max: int
    rss_median: int
    real_percent: float | None = None  # measured at a real 10 s interval, when asked


def cpu_figures(busy: Window, idle: Window, events: int) -> CpuFigures:
    idle_rate = idle.cpu_s / idle.seconds
    per_event = max(0.0, busy.cpu_s - idle_rate * busy.seconds) / max(events, 1)
    rss = busy.rss + idle.rss
    return CpuFigures(
        per_event_ms=per_event * 1e3,
        idle_percent=idle_rate * 100,
        at_target_percent=(per_event / TARGET_INTERVAL_S + idle_rate) * 100,
        events=events,
        rss_max=max(rss),
        rss_median=int(statistics.median(rss)),
    )


def read_next_seq(spool: Path) -> int:
    db = sqlite3.connect(f"file:{spool}?mode=ro", uri=True, timeout=10)
    try:
        row = db.execute("SELECT state FROM sampler_state WHERE id = 1").fetchone()
    except sqlite3.OperationalError:  # the agent has not created its tables yet
        return 0
    finally:
        db.close()
    return 0 if row is None else int(json.loads(row[0])["next_seq"])


# -- the agent -------------------------------------------------------------------------


@dataclass
class AgentResult:
    cpu: CpuFigures
    records_per_cycle: float
    uss: int | None
    real_percent: float | None
    real_cycles: float | None
    exit_status: int | None


def bench_agent(args: argparse.Namespace, workdir: Path, pki_dir: Path, cgroup_root: Path,
                patterns: Sequence[str]) -> AgentResult:
    from tests.harness import CollectorProcess

    collector = CollectorProcess(collector_toml(workdir / "collector", pki_dir))
    collector.start()
    agent_dir = workdir / "agent"
    agent_dir.mkdir()
    config = agent_dir / "agent.toml"

    def configure(interval: float, ship_interval: str | None = None) -> None:
        agent_toml(config, port=collector.grpc_port, interval=f"{interval:g}", pki_dir=pki_dir,
                   cgroup_root=cgroup_root, patterns=patterns, ship_interval=ship_interval)

    def reconfigure(interval: float, ship_interval: str | None = None) -> None:
        """SIGHUP applies a new configuration between cycles (a sleeping agent wakes
        for it); wait until the agent has taken a sample under it."""
        configure(interval, ship_interval)
        seq = read_next_seq(spool)
        agent.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while read_next_seq(spool) == seq and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)

    real = args.real_seconds > 0
    configure(TARGET_INTERVAL_S if real else args.interval)
    log = (agent_dir / "agent.log").open("wb")
    agent = subprocess.Popen([args.meterd, "agent", "run", "--config", str(config)],
                             cwd=agent_dir, stdout=log, stderr=log)
    spool = agent_dir / "spool.db"
    try:
        deadline = time.monotonic() + 60
        while not spool.exists() or read_next_seq(spool) == 0:
            if agent.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"agent did not start: {(agent_dir / 'agent.log').read_text()}")
            time.sleep(0.1)
        print(f"  warming up for {args.warmup:g} s ...", flush=True)
        time.sleep(args.warmup)
        rss: list[int] = []
        real_percent = real_cycles = None
        if real:
            print(f"  measuring at a real {TARGET_INTERVAL_S:g} s interval for "
                  f"{args.real_seconds:g} s ...", flush=True)
            seq_a = read_next_seq(spool)
            window = measure(agent.pid, args.real_seconds)
            real_records = read_next_seq(spool) - seq_a
            real_percent = window.cpu_s / window.seconds * 100
            rss.extend(window.rss)
        # The short interval ships as many cycles' records per shipment as the default
        # cadence does at 10 s, so a cycle carries the same share of a shipment.
        speedup = TARGET_INTERVAL_S / args.interval
        reconfigure(args.interval, f"{float(AgentConfig().shipping.interval_seconds) / speedup:g}")
        seq0 = read_next_seq(spool)
        busy = measure(agent.pid, args.seconds)
        seq1 = read_next_seq(spool)
        cycles = round(busy.seconds / args.interval)
        per_cycle = (seq1 - seq0) / max(cycles, 1)
        if real:
            real_cycles = real_records / max(per_cycle, 1)
        reconfigure(3600)
        seq2 = read_next_seq(spool)
        idle = measure(agent.pid, args.idle_seconds)
        if read_next_seq(spool) != seq2:
            print("  warning: the agent sampled during the idle window", file=sys.stderr)
        busy.rss.extend(rss)
        uss = uss_bytes(agent.pid)
        status = stop_process(agent)
    finally:
        stop_process(agent)
        log.close()
        collector.stop()
    return AgentResult(cpu_figures(busy, idle, cycles), per_cycle, uss, real_percent,
                       real_cycles, status)


def interpreter_of(meterd: str) -> str:
    """The Python interpreter of the installation that ``meterd`` belongs to."""
    beside = Path(meterd).parent / "python3"
    return str(beside) if beside.exists() else sys.executable


def import_floor(python: str) -> int:
    """RSS of a Python process that has imported what the long-running agent process
    imports (``agent/__main__.py``), and nothing else: the floor under any agent,
    before it samples, spools or ships anything."""
    code = (
        "import agent.__main__ as entry\n"
        "entry.load_runtime()\n"
        "import common.logs\n"
        "import re\n"
        "status = open('/proc/self/status').read()\n"
        "print(int(re.search(r'VmRSS:\\s+(\\d+)', status).group(1)) * 1024)\n"
    )
    env = {**os.environ, "GRPC_SSL_CIPHER_SUITES": "PSK-AES128-CBC-SHA"}
    out = subprocess.run([python, "-P", "-c", code], capture_output=True, text=True,
                         check=True, timeout=60, env=env, cwd="/")
    return int(out.stdout.strip())


def breakdown(config: Path, cycles: int) -> tuple[float, float, list[Any], dict[str, object]]:
    """In this process: CPU ms of ``Sampler.sample`` and of ``Spool.append`` per cycle,
    with the agent's own configuration; and one cycle's records and state."""
    from agent.config import load_agent_config
    from agent.daemon import build_sampler
    from agent.spool import Spool

    cfg = load_agent_config(config)
    sampler = build_sampler(cfg, HOST, None)
    spool = Spool(config.parent / "breakdown.db")
    sampler.sample()  # baseline
    sample_s = append_s = 0.0
    records: list[Any] = []
    for _ in range(cycles):
        t0 = time.process_time()
        records = sampler.sample()
        t1 = time.process_time()
        spool.append(records, sampler.state())
        t2 = time.process_time()
        sample_s += t1 - t0
        append_s += t2 - t1
    state = sampler.state()
    spool.close()
    sampler.close()
    return sample_s / cycles * 1e3, append_s / cycles * 1e3, records, state


# -- spool throughput --------------------------------------------------------------------


def clone_records(template: Sequence[Any], count: int) -> list[Any]:
    """``count`` records shaped like ``template`` (metrics, labels), each a new id."""
    from common.ids import new_id
    from common.records import UsageRecord

    out = []
    for i in range(count):
        t = template[i % len(template)]
        cycle = i // len(template)
        out.append(UsageRecord(id=new_id(), host_id=t.host_id, metric=t.metric,
                               quantity=t.quantity + cycle, unit=t.unit,
                               start_us=t.start_us + cycle * 10_000_000,
                               end_us=t.end_us + cycle * 10_000_000, seq=i, labels=t.labels))
    return out


def raw_sqlite(path: Path) -> sqlite3.Connection:
    from agent.spool import _SCHEMA

    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(_SCHEMA)
    return db


def bench_spool(workdir: Path, template: Sequence[Any], state: dict[str, object],
                sizes: Sequence[int], records_per_round: int, rounds: int
                ) -> list[tuple[int, float, float]]:
    """(batch size, spool records/s, raw sqlite3 records/s) per size."""
    from agent.spool import _COLUMNS, _PLACEHOLDERS, Spool, labels_text, record_size

    results = []
    state_text = json.dumps(state, sort_keys=True)
    for size in sizes:
        appends = max(1, records_per_round // size)
        records = clone_records(template, appends * size * rounds)
        rows = [(r.id, r.host_id, r.metric, r.unit, labels_text(r.labels), r.quantity_text,
                 r.start_us, r.end_us, r.seq, record_size(r)) for r in records]
        spool_path, raw_path = workdir / f"spool-{size}.db", workdir / f"raw-{size}.db"
        spool = Spool(spool_path, max_bytes=2**40)
        raw = raw_sqlite(raw_path)
        spool_s = raw_s = 0.0
        insert = f"INSERT INTO records ({_COLUMNS}) VALUES ({_PLACEHOLDERS})"
        for rnd in range(rounds):
            base = rnd * appends * size
            t0 = time.perf_counter()
            for k in range(appends):
                spool.append(records[base + k * size: base + (k + 1) * size], state)
            t1 = time.perf_counter()
            for k in range(appends):
                raw.execute("BEGIN IMMEDIATE")
                raw.executemany(insert, rows[base + k * size: base + (k + 1) * size])
                raw.execute("INSERT OR REPLACE INTO sampler_state (id, state) VALUES (1, ?)",
                            (state_text,))
                raw.execute("COMMIT")
            t2 = time.perf_counter()
            spool_s += t1 - t0
            raw_s += t2 - t1
        total = appends * size * rounds
        stored = spool.stats().records
        raw_stored = raw.execute("SELECT count(*) FROM records").fetchone()[0]
        if stored != total or raw_stored != total:
            raise SystemExit(f"spool bench stored {stored} and {raw_stored} of {total} records")
        spool.close()
        raw.close()
        results.append((size, total / spool_s, total / raw_s))
    return results


# -- node exporter ---------------------------------------------------------------------


def bench_node_exporter(args: argparse.Namespace, workdir: Path) -> CpuFigures | None:
    exe = shutil.which("prometheus-node-exporter") or NODE_EXPORTER
    if not Path(exe).exists():
        return None
    from bench.support import free_port

    port = free_port()
    log = (workdir / "node-exporter.log").open("wb")
    proc = subprocess.Popen([exe, f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}/metrics"

    def scrape() -> None:
        with urllib.request.urlopen(url, timeout=10) as response:
            response.read()

    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                scrape()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    print("  node exporter did not start; skipped", file=sys.stderr)
                    return None
                time.sleep(0.1)
        warm_end = time.monotonic() + args.warmup
        while time.monotonic() < warm_end:
            scrape()
            time.sleep(args.interval)
        busy = measure(proc.pid, args.seconds, every=args.interval, tick=scrape)
        idle = measure(proc.pid, args.idle_seconds)
        figures = cpu_figures(busy, idle, busy.events)
        if args.real_seconds > 0:
            real = measure(proc.pid, args.real_seconds, every=TARGET_INTERVAL_S, tick=scrape)
            figures.real_percent = real.cpu_s / real.seconds * 100
            print(f"  node exporter at a real {TARGET_INTERVAL_S:g} s scrape interval: "
                  f"{figures.real_percent:.3f}% of one core over {real.seconds:.0f} s")
        return figures
    finally:
        stop_process(proc)
        log.close()


# -- report ----------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "meets target" if ok else "MISSES target"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--cgroups", type=int, default=20, help="metered cgroups (default 20)")
    parser.add_argument("--interval", type=Decimal, default=Decimal("0.25"),
                        help="short sampling/scrape interval for the CPU measurement (s)")
    parser.add_argument("--warmup", type=float, default=8.0, help="seconds before measuring")
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="seconds at the short interval (default 30)")
    parser.add_argument("--idle-seconds", type=float, default=20.0,
                        help="seconds measuring idle CPU (default 20)")
    parser.add_argument("--real-seconds", type=float, default=120.0,
                        help="seconds measured at a real 10 s interval (default 120; 0: skip)")
    parser.add_argument("--meterd", default=None,
                        help="the meterd console script to run (default: this virtualenv's)")
    parser.add_argument("--spool-records", type=int, default=20_000,
                        help="records per round and batch size in the spool benchmark")
    parser.add_argument("--spool-rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--no-node-exporter", action="store_true", help="skip the comparison")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    interval = float(args.interval)
    args.interval = interval
    args.meterd = args.meterd or meterd_exe()

    workdir = Path(tempfile.mkdtemp(prefix="meterd-agent-bench-"))
    try:
        print(f"meterd agent benchmark: {machine()}")
        print(f"load average before the run: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(f"work directory {workdir}")
        pki_dir = make_pki(workdir / "pki", [HOST])
        (workdir / "collector").mkdir()
        cgroup_root = workdir / "cgroup"
        patterns = build_cgroupfs(cgroup_root, args.cgroups)
        python = interpreter_of(args.meterd)
        version = subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        print(f"agent: {args.meterd} (Python {version})")
        real = (f"{TARGET_INTERVAL_S:g} s interval for {args.real_seconds:g} s, then "
                if args.real_seconds > 0 else "")
        print(f"\n[1/4] real agent process (meterd agent run) -> real collector process, "
              f"host metrics + {args.cgroups} cgroups, {real}{interval:g} s interval for "
              f"{args.seconds:g} s, then idle {args.idle_seconds:g} s")
        agent = bench_agent(args, workdir, pki_dir, cgroup_root, patterns)
        floor = import_floor(python)
        print("\n[2/4] in-process breakdown of one cycle (same configuration)")
        sample_ms, append_ms, template, state = breakdown(workdir / "agent" / "agent.toml", 40)
        print(f"\n[3/4] spool throughput vs raw sqlite3 ({args.spool_rounds} alternating rounds)")
        cycle = len(template)
        spool = bench_spool(workdir, template, state, [cycle, cycle * 10],
                            args.spool_records, args.spool_rounds)
        ne = None
        if not args.no_node_exporter:
            print(f"\n[4/4] prometheus-node-exporter, scraped every {interval:g} s for "
                  f"{args.seconds:g} s, then idle {args.idle_seconds:g} s")
            ne = bench_node_exporter(args, workdir)
            if ne is None:
                print("  prometheus-node-exporter is not installed: comparison skipped")

        c = agent.cpu
        print("\n=== results ===")
        print(f"agent RSS (steady state)       max {mib(c.rss_max)}, median {mib(c.rss_median)}"
              f"{'' if agent.uss is None else f', USS {mib(agent.uss)}'}   "
              f"= {c.rss_max / 10**6:.1f} MB   "
              f"[target <= 40 MB ({mib(TARGET_RSS)}): {verdict(c.rss_max <= TARGET_RSS)}]")
        print(f"  import floor                 {mib(floor)} (a Python process that has "
              "only imported what the agent process imports: interpreter, grpclib, ...)")
        if agent.real_percent is not None and agent.real_cycles is not None:
            print(f"agent CPU at a real 10 s interval  {agent.real_percent:.3f}% of one core "
                  f"over {args.real_seconds:g} s ({agent.real_cycles:.0f} cycles)   "
                  f"[target <= {TARGET_CPU_PERCENT}%: "
                  f"{verdict(agent.real_percent <= TARGET_CPU_PERCENT)}]")
        print(f"agent CPU per sampling cycle   {c.per_event_ms:.2f} ms "
              f"({c.events} cycles, {agent.records_per_cycle:.0f} records per cycle, "
              f"sampling + spooling + its share of shipping)")
        print(f"  of which in-process          sample {sample_ms:.2f} ms, "
              f"spool append {append_ms:.2f} ms (the rest is shipping and the event loop)")
        print(f"agent idle CPU                 {c.idle_percent:.4f}% of one core")
        print(f"agent CPU at 10 s, extrapolated {c.at_target_percent:.3f}% of one core "
              f"(= {c.per_event_ms:.2f} ms / 10 s + idle)")
        for size, ours, raw in spool:
            ratio = ours / raw
            print(f"spool append, {size:>4} rec/txn   {ours:,.0f} records/s vs raw sqlite3 "
                  f"{raw:,.0f} records/s = {ratio:.2f}   "
                  f"[target >= {TARGET_SPOOL_RATIO}: {verdict(ratio >= TARGET_SPOOL_RATIO)}]")
        if ne is not None:
            print(f"node exporter RSS              max {mib(ne.rss_max)}, "
                  f"median {mib(ne.rss_median)}")
            print(f"node exporter CPU per scrape   {ne.per_event_ms:.2f} ms, idle "
                  f"{ne.idle_percent:.4f}%, at a 10 s scrape interval "
                  f"{ne.at_target_percent:.3f}% of one core")
            real = ""
            if ne.real_percent and agent.real_percent is not None:
                ratio = agent.real_percent / ne.real_percent
                real = f", measured at a real 10 s interval {ratio:.2f}"
            print(f"ours / node exporter           RSS {c.rss_max / ne.rss_max:.2f}, "
                  f"CPU at 10 s {c.at_target_percent / ne.at_target_percent:.2f}{real}")
        if agent.exit_status != 0:
            print(f"warning: the agent exited with status {agent.exit_status}", file=sys.stderr)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
