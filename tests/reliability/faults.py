"""The fault harness: the kernel's counters, agent and PostgreSQL process control.

Usage is made known exactly by playing the kernel: :class:`HostCounters` writes the raw
counters a host's agent reads (``tests/reliability/agent_process.py``), advancing them
by amounts drawn from the test's seeded generator. What was sampled is then the
counters' advance from the agent's first baseline to the last value it sampled, which
the stop protocol (:func:`drain`: wait until the agent's durable state holds the final
values and its spool is empty) makes the final value the test wrote.
:mod:`tests.reliability.reconcile` compares it with the ledger.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from collector.ledger.sharding import SLOTS
from tests.harness import ROOT, dies_with_us
from tests.ledger.helpers import TARIFF

SOAK = os.environ.get("METERD_SOAK", "") == "1"

Key = tuple[str, str, str]  # host, metric, canonical labels

HOSTS = [f"host-{chr(ord('a') + i)}" for i in range(20)]  # with certificates (conftest)


def canonical_labels(labels: Mapping[str, str] | str) -> str:
    value = json.loads(labels) if isinstance(labels, str) else dict(labels)
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


# -- the kernel ------------------------------------------------------------------------


class HostCounters:
    """The raw counters of one host, advanced by the test and read by its agent.

    ``cpu.seconds`` (hundredths of a second, like USER_HZ ticks) and ``net.tx_bytes``
    per interface: both priced by the test tariff.
    """

    def __init__(self, path: Path, host: str, rng: random.Random, interfaces: int = 4) -> None:
        self.path = path
        self.host = host
        self.rng = rng
        self.series: list[tuple[str, dict[str, str]]] = [("cpu.seconds", {})] + [
            ("net.tx_bytes", {"interface": f"eth{i}"}) for i in range(interfaces)
        ]
        self.values = [
            Decimal(rng.randrange(0, 10**8)).scaleb(-2) if metric == "cpu.seconds"
            else Decimal(rng.randrange(0, 10**12))
            for metric, _ in self.series
        ]
        self.initial = list(self.values)
        self.write()

    def advance(self) -> None:
        for i, (metric, _) in enumerate(self.series):
            if metric == "cpu.seconds":
                self.values[i] += Decimal(self.rng.randrange(0, 400)).scaleb(-2)
            else:
                self.values[i] += self.rng.randrange(0, 3 * 10**8)
        self.write()

    def write(self) -> None:
        data = {
            "boot_id": "boot-1",
            "counters": [
                {"metric": m, "labels": labels, "value": str(v)}
                for (m, labels), v in zip(self.series, self.values, strict=True)
            ],
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(self.path)  # atomic: the agent reads the old or the new values

    def sampled(self) -> dict[Key, Decimal]:
        """What the agent sampled once it has read the current values."""
        return {
            (self.host, m, canonical_labels(labels)): v - v0
            for (m, labels), v, v0 in zip(self.series, self.values, self.initial, strict=True)
        }


def run_for(seconds: float, counters: Sequence[HostCounters], rng: random.Random) -> None:
    """Let hosts use resources for about ``seconds``: advance every counter at seeded
    steps (the amounts come from each host's seeded generator)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for c in counters:
            c.advance()
        time.sleep(rng.uniform(0.02, 0.12))


def run_until(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    counters: Sequence[HostCounters],
    rng: random.Random,
) -> None:
    """:func:`run_for` until ``condition`` holds; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        run_for(0.05, counters, rng)


def logged_since(text: str, *paths: Path) -> Callable[[], bool]:
    """A condition: from now on, ``text`` has been written to one of the logs."""
    offsets = [p.stat().st_size if p.exists() else 0 for p in paths]

    def logged() -> bool:
        for path, offset in zip(paths, offsets, strict=True):
            with path.open("rb") as f:
                f.seek(offset)
                if text in f.read().decode(errors="replace"):
                    return True
        return False

    return logged


# -- configuration ---------------------------------------------------------------------


def _first_slot(shard: int, shards: int) -> int:
    """The first slot :meth:`ShardMap.even` gives ``shard`` of ``shards``."""
    return -(-shard * SLOTS // shards)


def collector_config(
    workdir: Path,
    pki: Path,
    port: int,
    *,
    assignments: Mapping[str, str],
    shards: Sequence[str] = (),
    tls_extra: str = "",
    ingest_extra: str = "",
    ledger_extra: str = "",
) -> Path:
    """A collector config listening for gRPC on a fixed ``port`` (agents keep their
    address across restarts); SQLite ledger unless PostgreSQL ``shards`` are given."""
    (workdir / "tariff.toml").write_text(TARIFF)
    if shards:  # the slots split evenly, in order, as ShardMap.even splits them
        ledger = f"[ledger]\n{ledger_extra}\n" + "".join(
            f'[[ledger.shards]]\ndsn = "{dsn}"\n'
            f'slots = ["{_first_slot(i, len(shards))}-{_first_slot(i + 1, len(shards)) - 1}"]\n\n'
            for i, dsn in enumerate(shards)
        )
    else:
        ledger = f'[ledger]\nsqlite_path = "ledger.db"\n{ledger_extra}\n'
    assigned = "".join(
        f'[[assignments]]\nhost = "{h}"\naccount = "{a}"\n\n' for h, a in assignments.items()
    )
    text = f"""tariff = "tariff.toml"

[tls]
cert = "{pki}/servers/localhost.pem"
key = "{pki}/servers/localhost.key"
ca = "{pki}/ca.pem"
{tls_extra}

[ingest]
listen = "127.0.0.1:{port}"
{ingest_extra}

[api]
listen = "127.0.0.1:0"

{ledger}
[accounts.acme]
currency = "eur"

[accounts.globex]
currency = "eur"

[accounts.initech]
currency = "eur"

{assigned}"""
    path = workdir / "collector.toml"
    path.write_text(text)
    return path


# -- a clock that is off: libfaketime ----------------------------------------------------

IN_CI = os.environ.get("CI", "").lower() == "true"


def faketime_library() -> Path | None:
    """Debian's libfaketime (package ``faketime``), multi-threaded flavour."""
    for pattern in ("usr/lib/*/faketime/libfaketimeMT.so.1", "usr/lib/faketime/libfaketimeMT.so.1"):
        for found in sorted(Path("/").glob(pattern)):
            return found
    return None


def faketime_env(offset: str) -> dict[str, str]:
    """Environment that runs a process with its wall clock moved by ``offset``
    (libfaketime syntax: ``+3h``, ``-2d``). The monotonic clock is left alone, as an
    NTP-less host's would be: only the time of day is wrong."""
    library = faketime_library()
    if library is None:
        if IN_CI:
            pytest.fail("libfaketime is required under CI (apt-get install faketime)")
        pytest.skip("libfaketime not installed (apt-get install faketime)")
    return {
        "LD_PRELOAD": str(library),
        "FAKETIME": offset,
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


# -- agents ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SpoolView:
    exists: bool
    records: int
    in_flight: int
    dead_letters: int
    bytes: int
    produced: int  # records the sampler has made so far (its next seq)


@dataclass(frozen=True)
class DeadLetterRow:
    id: str
    key: Key
    quantity: Decimal
    reason: str


class AgentProcess:
    """One agent (``agent_process.py``) for one host, in its own folder.

    It samples every ``interval`` seconds and ships after every sample (``[shipping]
    interval_seconds = 0``; a real agent waits a minute or for a full batch), so every
    fault lands among calls in flight.
    """

    def __init__(
        self,
        workdir: Path,
        pki: Path,
        host: str,
        port: int,
        rng: random.Random,
        *,
        interfaces: int = 4,
        batch_max_records: int = 20,
        spool_max_bytes: int | None = None,
        read_seconds: float = 0.0,
        interval: str = "0.1",
        deadline: str = "5",
        env: Mapping[str, str] | None = None,
        batch_log: bool = False,
    ) -> None:
        self.host = host
        self.read_seconds = read_seconds
        self.env = dict(env or {})
        self.dir = workdir / host
        self.dir.mkdir(parents=True, exist_ok=True)
        self.counters = HostCounters(self.dir / "counters.json", host, rng, interfaces)
        self.config = self.dir / "agent.toml"
        self.spool = self.dir / "spool.db"
        self.ack_log = self.dir / "acks.log"
        self.log = self.dir / "agent.log"
        self.batch_log = self.dir / "batches.log" if batch_log else None
        self.spool_max_bytes = spool_max_bytes
        self.proc: subprocess.Popen[bytes] | None = None
        self._starts_before = 0
        self.config.write_text(f"""collector = "127.0.0.1:{port}"
interval_seconds = "{interval}"
spool_path = "spool.db"

[tls]
cert = "{pki}/agents/{host}.pem"
key = "{pki}/agents/{host}.key"
ca = "{pki}/ca.pem"

[shipping]
interval_seconds = "0"
batch_max_records = {batch_max_records}
deadline_seconds = "{deadline}"
backoff_initial_seconds = "0.05"
backoff_max_seconds = "0.5"
final_flush_seconds = "10"

[metrics]
enabled = ["cpu.seconds", "net.tx_bytes"]
""")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _started_count(self) -> int:
        return tail(self.log, 10**9).count('"agent_started"')

    def start(self, *, wait_ready: bool = False) -> AgentProcess:
        assert not self.running
        before = self._started_count()
        args = [sys.executable, "-m", "tests.reliability.agent_process",
                "--config", str(self.config), "--counters", str(self.counters.path),
                "--ack-log", str(self.ack_log)]
        if self.spool_max_bytes is not None:
            args += ["--spool-max-bytes", str(self.spool_max_bytes)]
        if self.read_seconds:
            args += ["--read-seconds", str(self.read_seconds)]
        if self.batch_log is not None:
            args += ["--batch-log", str(self.batch_log)]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                dies_with_us(args), cwd=ROOT, stdout=log, stderr=log,
                env={**os.environ, "PYTHONPATH": str(ROOT), **self.env},
            )
        self._starts_before = before
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        """Until the last start has installed its signal handlers and serves."""
        wait_until(lambda: self._started_count() > self._starts_before or not self.running,
                   30, f"agent {self.host} to start")
        assert self.running, f"agent {self.host} exited:\n{tail(self.log)}"

    def kill(self) -> None:
        """kill -9, wherever it is."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> int:
        """SIGTERM: a final sample, a final flush, a clean exit."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def view(self) -> SpoolView:
        if not self.spool.exists():
            return SpoolView(False, 0, 0, 0, 0, 0)
        db = sqlite3.connect(self.spool, timeout=30)
        try:
            records, in_flight, size = db.execute(
                "SELECT count(*), coalesce(sum(in_flight), 0), coalesce(sum(size), 0)"
                " FROM records"
            ).fetchone()
            dead = db.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
            row = db.execute("SELECT state FROM sampler_state WHERE id = 1").fetchone()
        except sqlite3.OperationalError:  # the agent has not created its tables yet
            return SpoolView(True, 0, 0, 0, 0, 0)
        finally:
            db.close()
        produced = int(json.loads(row[0])["next_seq"]) if row else 0
        return SpoolView(True, records, in_flight, dead, size, produced)

    def _state(self) -> dict[str, Any] | None:
        """The sampler state stored with the last sample (None before the first)."""
        if not self.spool.exists():
            return None
        db = sqlite3.connect(self.spool, timeout=30)
        try:
            row = db.execute("SELECT state FROM sampler_state WHERE id = 1").fetchone()
        except sqlite3.OperationalError:  # the agent has not created its tables yet
            return None
        finally:
            db.close()
        return None if row is None else dict(json.loads(row[0]))

    def has_baseline(self) -> bool:
        """The first sample (the counters' baseline) is durable in the spool."""
        return self._state() is not None

    def sampled_final(self) -> bool:
        """The last durable sample read the counters' current (final) values."""
        state = self._state()
        if state is None:
            return False
        seen = {
            (c["metric"], canonical_labels(c["labels"])): Decimal(c["value"])
            for c in state["counters"]
        }
        return all(
            seen.get((m, canonical_labels(labels))) == v
            for (m, labels), v in zip(self.counters.series, self.counters.values, strict=True)
        )

    def settled(self) -> bool:
        """Exited, or has sampled the final values and shipped everything."""
        return not self.running or (self.sampled_final() and self.view().records == 0)

    def dead_letters(self) -> list[DeadLetterRow]:
        """The records the collector rejected, with their reasons (the spool's table)."""
        if not self.spool.exists():
            return []
        db = sqlite3.connect(self.spool, timeout=30)
        try:
            rows = db.execute(
                "SELECT id, metric, labels, quantity, reason FROM dead_letters"
            ).fetchall()
        except sqlite3.OperationalError:  # the agent has not created its tables yet
            return []
        finally:
            db.close()
        return [DeadLetterRow(r[0], (self.host, r[1], canonical_labels(r[2])), Decimal(r[3]),
                              r[4]) for r in rows]

    def meta(self, key: str) -> str | None:
        """A value the agent keeps for its status (``clock_skew_us``, ``last_error``)."""
        if not self.spool.exists():
            return None
        db = sqlite3.connect(self.spool, timeout=30)
        try:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        except sqlite3.OperationalError:
            return None
        finally:
            db.close()
        return None if row is None else str(row[0])

    def acked(self) -> set[str]:
        if not self.ack_log.exists():
            return set()
        return {line for line in self.ack_log.read_text().splitlines() if line}

    def log_text(self) -> str:
        return tail(self.log, 10**9)


def start_agents(agents: Iterable[AgentProcess]) -> None:
    """Start agents and wait until each has made its baseline durable: usage counted
    from there on is the counters' advance from their initial values."""
    agents = list(agents)
    for a in agents:
        a.start()
    wait_until(lambda: all(a.has_baseline() or not a.running for a in agents), 60,
               "every agent to store its first sample")
    for a in agents:
        assert a.running, f"agent {a.host} exited:\n{tail(a.log)}"


def drain(agents: Sequence[AgentProcess], timeout: float = 90) -> None:
    """Let each agent sample the counters' final values and ship everything, then
    kill -9 it. (Not SIGTERM: a stop on a signal is a scenario of its own.)

    All agents at once: each is killed as soon as it has settled; one that sampled
    again just before the kill is started again, and waited for again."""
    deadline = time.monotonic() + timeout
    pending = list(agents)
    for a in pending:
        if not a.running:
            a.start()
    while pending:
        for a in list(pending):
            if not a.settled():
                continue
            assert a.running, f"agent {a.host} exited:\n{tail(a.log)}"
            a.kill()
            if a.view().records == 0:
                pending.remove(a)
            else:  # it sampled again before the kill: once more
                a.start()
        if pending:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout} s waiting for agents to sample the final "
                    f"counters and drain their spools: {[(a.host, a.view()) for a in pending]}")
            time.sleep(0.05)


# -- PostgreSQL --------------------------------------------------------------------------


class PgServer:
    """Stop and start a throwaway cluster (never the machine's shared server)."""

    def __init__(self, admin_dsn: str) -> None:
        self.admin_dsn = admin_dsn
        self.port = int(admin_dsn.rsplit(":", 1)[1].split("/", 1)[0])

        async def data_directory() -> str:
            conn = await asyncpg.connect(admin_dsn)
            try:
                return str(await conn.fetchval("SELECT current_setting('data_directory')"))
            finally:
                await conn.close()

        self.data = Path(asyncio.run(data_directory()))
        self.pg_ctl = shutil.which("pg_ctl") or "pg_ctl"
        self.run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _ctl(self, *args: str) -> None:
        result = subprocess.run(
            [*self.run_as, self.pg_ctl, "-D", str(self.data), *args],
            capture_output=True, text=True, check=False, timeout=120,
        )
        assert result.returncode == 0, f"pg_ctl {args}: {result.stdout}{result.stderr}"

    def stop(self) -> None:
        self._ctl("-w", "-m", "fast", "stop")

    def start(self) -> None:
        tmp = self.data.parent
        self._ctl("-w", "-l", str(tmp / "log"), "-o",
                  f"-p {self.port} -k {tmp} -c listen_addresses=127.0.0.1", "start")

    def restart(self) -> None:
        """``pg_ctl restart`` without the wait: stop (fast) and start again at once.
        (``restart`` itself cannot send the new server's output to the log file.)"""
        self.stop()
        self.start()
