"""The host sampler: reading sources (psutil, NVML, a fixed source for tests) and the
:class:`Sampler` that reads them once per cycle and feeds :class:`~agent.counters.Meter`.

Where floats become exact: psutil reports CPU times as floats in seconds that it
derived from the kernel's tick counts (``/proc/stat``, USER_HZ = 100). Each one is
converted once, here, with ``Decimal(repr(x))``: ``repr`` is the shortest decimal that
round-trips, which for ``ticks / 100`` is exactly the kernel's value (``69.55``).
Byte counts are already integers. Clocks are read as integer nanoseconds.

Busy CPU time is the sum of every ``cpu_times`` field except ``idle``, ``iowait``,
``guest`` and ``guest_nice``: the kernel already counts guest time inside ``user``
and ``nice``, and summing the busy fields directly (rather than total minus idle
and iowait, which is the same sum) keeps the counter monotonic when the kernel's
iowait figure moves backwards.

Raw counters are read with ``nowrap=False``: psutil's own wrap correction would add
the pre-reset value to a reset counter, hiding resets and 32-bit wraps from the
counter rules in :mod:`agent.counters`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from decimal import Decimal
from fnmatch import fnmatchcase
from importlib import import_module
from pathlib import Path
from typing import Any, Protocol

import psutil

from agent.counters import Boot, Counter, Meter, Readings, Series, Snapshot, merge
from common import logs
from common.ids import new_id
from common.records import UsageRecord

log = logs.get("agent.sampler")

NET_WRAP = 2**32
DISK_WRAP = 2**32 * 512
_IDLE_FIELDS = frozenset({"idle", "iowait", "guest", "guest_nice"})


class Source(Protocol):
    """Anything that reads raw values for the enabled metrics."""

    def read(self, metrics: AbstractSet[str]) -> Readings: ...


class HostSource(Source, Protocol):
    """A source that also knows which boot of the host it is reading."""

    def boot(self) -> Boot: ...


@dataclass(frozen=True, slots=True)
class NameFilter:
    """Shell-style patterns: a name passes when it matches some ``include`` pattern
    (or ``include`` is empty) and no ``exclude`` pattern."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def allows(self, name: str) -> bool:
        if self.include and not any(fnmatchcase(name, p) for p in self.include):
            return False
        return not any(fnmatchcase(name, p) for p in self.exclude)

    def describe(self) -> str:
        return f"include={','.join(self.include)};exclude={','.join(self.exclude)}"


def exact_seconds(value: float) -> Decimal:
    """A psutil float of seconds as the decimal it was derived from (see module doc)."""
    return Decimal(repr(value))


def distinct_filesystems(mounted: Iterable[tuple[str, int]]) -> list[str]:
    """One mount point per filesystem (device number): the shortest, then the first by name.

    Bind mounts, and the private ``/tmp`` and state directories a hardened systemd unit
    gets, are further views of a filesystem already mounted elsewhere: counting each
    view would bill the same disk several times.
    """
    chosen: dict[int, str] = {}
    for mountpoint, device in mounted:
        best = chosen.get(device)
        if best is None or (len(mountpoint), mountpoint) < (len(best), best):
            chosen[device] = mountpoint
    return sorted(chosen.values())


class PsutilSource:
    """Host metrics from psutil: CPU, memory, disk space and I/O, network, boot.

    Interfaces named ``lo`` (loopback) and block devices ``loop*`` and ``ram*`` are
    excluded by default. With ``whole_disks_only`` (default) only devices listed in
    ``/sys/block`` are read, so partitions are not counted again beside their disk.
    Disk space is labelled by mount point; I/O by device; network by interface, with
    the interface index as the instance token, so a re-created interface is a reset.

    What cannot change while the process runs is read once: the boot id and boot time
    (a reboot ends the process), and which device names are whole disks, kept until
    the set of devices in ``/proc/diskstats`` changes. Everything else is read every
    cycle, with one call per kind (``disk_io_counters(perdisk=True)``,
    ``net_io_counters(pernic=True)``).
    """

    def __init__(
        self,
        *,
        interfaces: NameFilter = NameFilter(exclude=("lo",)),
        mounts: NameFilter = NameFilter(),
        devices: NameFilter = NameFilter(exclude=("loop*", "ram*")),
        whole_disks_only: bool = True,
        sysfs: Path = Path("/sys"),
        procfs: Path = Path("/proc"),
    ) -> None:
        self.interfaces = interfaces
        self.mounts = mounts
        self.devices = devices
        self.whole_disks_only = whole_disks_only
        self.sysfs = sysfs
        self.procfs = procfs
        self._boot: tuple[str, int] | None = None
        self._whole_disks: tuple[frozenset[str], frozenset[str]] = (frozenset(), frozenset())

    def boot(self) -> Boot:
        """Boot id from the kernel (``/proc/sys/kernel/random/boot_id``), falling back
        to the boot time; uptime from CLOCK_BOOTTIME, which includes suspend."""
        if self._boot is None:
            boot_time_us = int(exact_seconds(psutil.boot_time()).scaleb(6))
            try:
                boot_id = (self.procfs / "sys/kernel/random/boot_id").read_text().strip()
            except OSError:
                boot_id = ""
            self._boot = (boot_id or f"boot-time:{boot_time_us // 1_000_000}", boot_time_us)
        boot_id, boot_time_us = self._boot
        if hasattr(time, "CLOCK_BOOTTIME"):
            uptime_ns = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        else:
            uptime_ns = max(0, time.time_ns() - boot_time_us * 1000)
        return Boot(boot_id=boot_id, uptime_ns=uptime_ns, boot_time_us=boot_time_us)

    def read(self, metrics: AbstractSet[str]) -> Readings:
        counters: dict[Series, Counter] = {}
        gauges: dict[Series, Decimal] = {}
        scopes: set[str] = set()
        held: frozenset[Series] = frozenset()
        if "cpu.seconds" in metrics:
            times = psutil.cpu_times()
            busy = sum(
                (exact_seconds(getattr(times, name))
                 for name in times._fields if name not in _IDLE_FIELDS),
                Decimal(0),
            )
            counters[Series.of("cpu.seconds")] = Counter(busy, reset_on_decrease=False)
        if "mem.used_byte_seconds" in metrics:
            gauges[Series.of("mem.used_byte_seconds")] = Decimal(psutil.virtual_memory().used)
        if "disk.used_byte_seconds" in metrics:
            space, held = self._disk_space()
            gauges.update(space)
        io_metrics = {"disk.read_bytes", "disk.write_bytes"} & metrics
        if io_metrics:
            scope = f"devices {self.devices.describe()} whole={self.whole_disks_only}"
            scopes.update(f"{m} {scope}" for m in io_metrics)
            counters.update(self._disk_io(io_metrics, scope))
        net_metrics = {"net.rx_bytes", "net.tx_bytes"} & metrics
        if net_metrics:
            scope = f"interfaces {self.interfaces.describe()}"
            scopes.update(f"{m} {scope}" for m in net_metrics)
            counters.update(self._net(net_metrics, scope))
        return Readings(counters, gauges, frozenset(scopes), held)

    def _disk_space(self) -> tuple[dict[Series, Decimal], frozenset[Series]]:
        mounted: list[tuple[str, int]] = []
        for part in psutil.disk_partitions(all=False):
            if not self.mounts.allows(part.mountpoint):
                continue
            try:
                mounted.append((part.mountpoint, os.stat(part.mountpoint).st_dev))
            except OSError:
                continue
        gauges: dict[Series, Decimal] = {}
        held: set[Series] = set()
        for mountpoint in distinct_filesystems(mounted):
            key = Series.of("disk.used_byte_seconds", {"mount": mountpoint})
            try:
                used = psutil.disk_usage(mountpoint).used
            except FileNotFoundError:  # unmounted since it was listed
                continue
            except OSError:  # mounted, but not answering now: held (agent.counters)
                held.add(key)
                continue
            gauges[key] = Decimal(used)
        return gauges, frozenset(held)

    def _disk_io(self, metrics: AbstractSet[str], scope: str) -> dict[Series, Counter]:
        counters: dict[Series, Counter] = {}
        per_disk = psutil.disk_io_counters(perdisk=True, nowrap=False) or {}
        whole = self._whole_disk_names(frozenset(per_disk)) if self.whole_disks_only else None
        for name, io in per_disk.items():
            if not self.devices.allows(name) or (whole is not None and name not in whole):
                continue
            for metric, value in (("disk.read_bytes", io.read_bytes),
                                  ("disk.write_bytes", io.write_bytes)):
                if metric in metrics:
                    counters[Series.of(metric, {"device": name})] = Counter(
                        Decimal(value), wrap=DISK_WRAP, scope=f"{metric} {scope}"
                    )
        return counters

    def _net(self, metrics: AbstractSet[str], scope: str) -> dict[Series, Counter]:
        counters: dict[Series, Counter] = {}
        per_nic = psutil.net_io_counters(pernic=True, nowrap=False) or {}
        for name, io in per_nic.items():
            if not self.interfaces.allows(name):
                continue
            instance = self._ifindex(name)
            for metric, value in (("net.rx_bytes", io.bytes_recv),
                                  ("net.tx_bytes", io.bytes_sent)):
                if metric in metrics:
                    counters[Series.of(metric, {"interface": name})] = Counter(
                        Decimal(value), instance=instance, wrap=NET_WRAP,
                        scope=f"{metric} {scope}",
                    )
        return counters

    def _whole_disk_names(self, names: frozenset[str]) -> frozenset[str] | None:
        """Which of ``names`` are listed in ``/sys/block`` (whole disks, not partitions);
        None when there is no ``/sys/block`` to ask."""
        known, whole = self._whole_disks
        if names != known:
            block = f"{self.sysfs}/block"
            if not os.path.isdir(block):
                return None
            whole = frozenset(n for n in names if os.path.exists(f"{block}/{n}"))
            self._whole_disks = (names, whole)
        return whole

    def _ifindex(self, name: str) -> str | None:
        try:
            fd = os.open(f"{self.sysfs}/class/net/{name}/ifindex", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            return os.read(fd, 64).decode().strip() or None
        except OSError:
            return None
        finally:
            os.close(fd)


class NvmlSource:
    """GPU metrics through NVML: ``gpu.seconds`` (utilisation × time) and
    ``gpu.mem_byte_seconds`` (memory in use × time), labelled ``gpu=<uuid>``.

    NVML reports utilisation as the percentage of its last sample period in which a
    kernel ran, so ``gpu.seconds`` is the integral of that gauge, not a counter.
    :meth:`open` returns ``None`` when ``pynvml`` is not installed, NVML does not
    initialise, or there is no GPU: the metrics are then absent, not an error.
    """

    def __init__(self, nvml: Any, count: int) -> None:
        self._nvml = nvml
        self._count = count
        self._labels: dict[int, dict[str, str]] = {}  # GPU index -> label, once read

    @classmethod
    def open(cls, importer: Callable[[str], Any] = import_module) -> NvmlSource | None:
        try:
            nvml = importer("pynvml")
        except ImportError:
            return None
        try:
            nvml.nvmlInit()
        except nvml.NVMLError:
            return None
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except nvml.NVMLError:
            count = 0
        if count <= 0:
            nvml.nvmlShutdown()
            return None
        return cls(nvml, count)

    def read(self, metrics: AbstractSet[str]) -> Readings:
        """Both gauges of every GPU; a GPU that does not answer is logged and its
        gauges are held (:mod:`agent.counters`), once its label is known."""
        gauges: dict[Series, Decimal] = {}
        held: set[Series] = set()
        nvml = self._nvml
        wanted = [m for m in ("gpu.seconds", "gpu.mem_byte_seconds") if m in metrics]
        for index in range(self._count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = nvml.nvmlDeviceGetUUID(handle)
                label = {"gpu": uuid.decode() if isinstance(uuid, bytes) else str(uuid)}
                self._labels[index] = label
                found: dict[Series, Decimal] = {}
                if "gpu.seconds" in metrics:
                    percent = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
                    found[Series.of("gpu.seconds", label)] = Decimal(percent).scaleb(-2)
                if "gpu.mem_byte_seconds" in metrics:
                    used = int(nvml.nvmlDeviceGetMemoryInfo(handle).used)
                    found[Series.of("gpu.mem_byte_seconds", label)] = Decimal(used)
                gauges.update(found)
            except nvml.NVMLError as exc:
                log.warning("gpu_read_failed", gpu=index, error=str(exc))
                known = self._labels.get(index)
                if known is not None:
                    held.update(Series.of(m, known) for m in wanted)
        return Readings(gauges=gauges, held=frozenset(held))

    def close(self) -> None:
        self._nvml.nvmlShutdown()


@dataclass
class FixedSource:
    """A host source whose readings are set by hand: for tests and replays."""

    boot_id: str = "boot-1"
    uptime_ns: int = 0
    boot_time_us: int | None = None
    counters: dict[Series, Counter] = field(default_factory=dict)
    gauges: dict[Series, Decimal] = field(default_factory=dict)
    scopes: set[str] = field(default_factory=set)

    def boot(self) -> Boot:
        return Boot(self.boot_id, self.uptime_ns, self.boot_time_us)

    def read(self, metrics: AbstractSet[str]) -> Readings:
        return Readings(dict(self.counters), dict(self.gauges), frozenset(self.scopes))

    def counter(
        self,
        metric: str,
        value: int | Decimal,
        labels: Mapping[str, str] | None = None,
        **options: Any,
    ) -> None:
        self.counters[Series.of(metric, labels)] = Counter(Decimal(value), **options)

    def gauge(
        self, metric: str, value: int | Decimal, labels: Mapping[str, str] | None = None
    ) -> None:
        self.gauges[Series.of(metric, labels)] = Decimal(value)

    def remove(self, metric: str, labels: Mapping[str, str] | None = None) -> None:
        key = Series.of(metric, labels)
        self.counters.pop(key, None)
        self.gauges.pop(key, None)


class Sampler:
    """Reads the host source and any extra sources once per :meth:`sample` and turns
    the values into records with one :class:`Meter` (one seq for the whole host).

    A source other than the host source that fails with ``OSError`` or a psutil error
    is logged and left out of that cycle: its counters resume from their dormant
    values next cycle, and its gauges (those it returned last time) are held, so
    their integral over the failed window is counted when they are read again
    (:mod:`agent.counters`). A failing host source fails the whole cycle; the next one
    covers its window.
    """

    def __init__(
        self,
        host_id: str,
        host: HostSource,
        *,
        sources: Sequence[Source] = (),
        metrics: Iterable[str] | None = None,
        labels: Mapping[str, str] | None = None,
        state: Mapping[str, object] | None = None,
        max_clock_divergence_us: int = 1_000_000,
        wall_ns: Callable[[], int] = time.time_ns,
        mono_ns: Callable[[], int] = time.monotonic_ns,
        id_factory: Callable[[], str] = new_id,
    ) -> None:
        self.meter = Meter(
            host_id,
            labels=labels,
            metrics=None if metrics is None else frozenset(metrics),
            state=state,
            max_clock_divergence_us=max_clock_divergence_us,
            id_factory=id_factory,
        )
        self.host = host
        self.sources = tuple(sources)
        self._wall_ns = wall_ns
        self._mono_ns = mono_ns
        # Per extra source: what it last returned, to stand in for it when it fails.
        self._last: list[Readings] = [Readings() for _ in self.sources]

    @property
    def metrics(self) -> frozenset[str]:
        return self.meter.metrics

    def sample(self) -> list[UsageRecord]:
        """One cycle: records for the window since the previous cycle."""
        mono = self._mono_ns()
        wall_us = self._wall_ns() // 1000
        boot = self.host.boot()
        parts = [self.host.read(self.metrics)]
        for index, source in enumerate(self.sources):
            try:
                part = source.read(self.metrics)
            except (OSError, psutil.Error) as exc:
                log.warning("source_failed", source=type(source).__name__, error=str(exc))
                last = self._last[index]
                # Its watches still stand and its gauges still exist: hold them.
                part = Readings(scopes=last.scopes, held=frozenset(last.gauges) | last.held)
            self._last[index] = part
            parts.append(part)
        records = self.meter.observe(Snapshot(mono, wall_us, boot, merge(parts)))
        for series in self.meter.rejected:
            log.warning("series_rejected", metric=series.metric, labels=dict(series.labels))
        return records

    def state(self) -> dict[str, object]:
        return self.meter.state()

    def close(self) -> None:
        for source in (self.host, *self.sources):
            close = getattr(source, "close", None)
            if callable(close):
                close()
