"""Shared parts of the benchmarks: PKI, processes, CPU and memory readings, the machine.

CPU time of another process is read from its POSIX CPU clock
(``clock_gettime(MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED))``): nanosecond
resolution, all threads including those that have exited. ``/proc/<pid>/stat``
only counts in 10 ms ticks, too coarse for an agent that is idle most of the time.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from common import pki

ROOT = Path(__file__).resolve().parent.parent


def meterd_exe() -> str:
    """The ``meterd`` console script of this virtualenv, as a user runs it."""
    found = shutil.which("meterd", path=str(Path(sys.executable).parent))
    if found is None:
        raise SystemExit("the meterd console script is not installed in this virtualenv")
    return found


def process_cpu_ns(pid: int) -> int:
    """CPU time (user + system, every thread) of process ``pid`` in nanoseconds."""
    clock = ((~pid) << 3) | 2  # MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)
    try:
        return time.clock_gettime_ns(clock)
    except OSError:
        times = psutil.Process(pid).cpu_times()
        return int((times.user + times.system) * 1e9)


def tree_cpu_ns(pids: Sequence[int]) -> int:
    """Summed CPU time of ``pids`` (processes that vanished count as zero)."""
    total = 0
    for pid in pids:
        try:
            total += process_cpu_ns(pid)
        except (OSError, psutil.Error):
            continue
    return total


def postgres_pids() -> list[int]:
    """Every PostgreSQL server process on this machine (postmaster and backends)."""
    pids = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        name = proc.info["name"] or ""
        cmd = " ".join(proc.info["cmdline"] or [])
        if name == "postgres" or cmd.startswith("postgres:") or "/bin/postgres" in cmd:
            pids.append(proc.pid)
    return pids


def rss_bytes(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def uss_bytes(pid: int) -> int | None:
    try:
        return int(psutil.Process(pid).memory_full_info().uss)
    except (psutil.AccessDenied, AttributeError):
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_pki(root: Path, hosts: Sequence[str]) -> Path:
    """A CA, a collector certificate for localhost/127.0.0.1 and one per agent host."""
    pki.init_ca(root)
    pki.issue_server(root, "localhost", ip_addresses=["127.0.0.1"])
    for host in hosts:
        pki.issue_agent(root, host)
    return root


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30) -> int | None:
    """SIGTERM, then SIGKILL if it does not stop in time; its exit status."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)
        return None


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank; NaN when there are no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q * len(ordered) + 0.5) - 1))
    return ordered[rank]


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = psutil.virtual_memory().total / 2**30
    return (f"{os.cpu_count()} cores, {model}, {mem:.0f} GiB RAM, Python "
            f"{platform.python_version()}, {platform.system()} {platform.release()}")


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"
