"""cgroup v2 metering: per-VM or per-container usage from the unified hierarchy.

Each configured path or glob pattern, relative to the cgroup root (default
``/sys/fs/cgroup``), is matched against directories; every matching cgroup gets

- ``cpu.seconds`` from the ``usage_usec`` line of ``cpu.stat`` (exact: microseconds),
- ``mem.used_byte_seconds`` from ``memory.current`` (a gauge, integrated over time),
- ``disk.read_bytes`` / ``disk.write_bytes`` from the ``rbytes=`` / ``wbytes=`` fields
  of ``io.stat``, summed over devices,

labelled ``cgroup=<path relative to the root>``. The counter rules of
:mod:`agent.counters` apply. The directory's inode number is the instance token (on
cgroupfs it is the cgroup id, never reused), so a cgroup removed and re-created is a
reset even when its new counter is already higher. Each device line of ``io.stat`` is
a separate part of the sum, so a device leaving the file is not mistaken for a reset.
A cgroup created after the previous sample under a watched pattern is counted from
zero. A cgroup that disappears between listing and reading, or a controller file
that is absent (controller not enabled), yields no value and no error.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from decimal import Decimal
from pathlib import Path, PurePosixPath

from agent.counters import Counter, Readings, Series
from common.errors import ConfigError
from common.records import MAX_LABEL_TEXT

DEFAULT_ROOT = Path("/sys/fs/cgroup")
CGROUP_METRICS = frozenset(
    {"cpu.seconds", "mem.used_byte_seconds", "disk.read_bytes", "disk.write_bytes"}
)


def check_pattern(pattern: str, source: str = "cgroups") -> str:
    """A pattern relative to the cgroup root, or :class:`ConfigError` saying why not."""
    path = PurePosixPath(pattern)
    if not pattern or path.is_absolute() or ".." in path.parts:
        raise ConfigError(
            source, pattern or '""',
            "a cgroup path or glob relative to the cgroup root, without '..'",
        )
    return str(path)


def parse_cpu_usage_usec(text: str) -> int | None:
    """``usage_usec`` from the flat-keyed ``cpu.stat`` format (``key value`` lines)."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            return int(value)
    return None


def parse_io_stat(text: str) -> dict[str, tuple[int, int]]:
    """``{"MAJ:MIN": (rbytes, wbytes)}`` from the nested-keyed ``io.stat`` format:
    ``8:0 rbytes=1459200 wbytes=314773504 rios=192 wios=353 dbytes=0 dios=0``."""
    devices: dict[str, tuple[int, int]] = {}
    for line in text.splitlines():
        device, *fields = line.split()
        if not fields:
            continue
        values = dict(f.split("=", 1) for f in fields if "=" in f)
        devices[device] = (int(values.get("rbytes", 0)), int(values.get("wbytes", 0)))
    return devices


class CgroupSource:
    """Reads the configured cgroups (a :class:`~agent.sampler.Source`)."""

    def __init__(self, patterns: Iterable[str], *, root: Path = DEFAULT_ROOT) -> None:
        self.patterns: Sequence[str] = tuple(check_pattern(p) for p in patterns)
        self.root = root

    def matches(self) -> list[tuple[str, str]]:
        """(pattern, relative path) of every cgroup directory that matches, sorted."""
        found: dict[str, str] = {}
        for pattern in self.patterns:
            for path in sorted(self.root.glob(pattern)):
                if path.is_dir():
                    relative = path.relative_to(self.root).as_posix()
                    found.setdefault(relative, pattern)
        return sorted((pattern, rel) for rel, pattern in found.items())

    def read(self, metrics: AbstractSet[str]) -> Readings:
        wanted = CGROUP_METRICS & metrics
        counters: dict[Series, Counter] = {}
        gauges: dict[Series, Decimal] = {}
        scopes = {f"{m} cgroup {self.root}/{p}" for m in wanted for p in self.patterns}
        if not wanted:
            return Readings(scopes=frozenset(scopes))
        for pattern, relative in self.matches():
            if len(relative) > MAX_LABEL_TEXT:
                continue
            try:
                self._read_one(pattern, relative, wanted, counters, gauges)
            except (OSError, ValueError):
                continue
        return Readings(counters, gauges, frozenset(scopes))

    def _read_one(
        self,
        pattern: str,
        relative: str,
        wanted: AbstractSet[str],
        counters: dict[Series, Counter],
        gauges: dict[Series, Decimal],
    ) -> None:
        """Read one cgroup completely before adding anything, so a cgroup removed
        halfway through contributes nothing rather than half its metrics."""
        path = self.root / relative
        instance = str(path.stat().st_ino)
        labels = {"cgroup": relative}
        found_counters: dict[Series, Counter] = {}
        found_gauges: dict[Series, Decimal] = {}

        def scope(metric: str) -> str:
            return f"{metric} cgroup {self.root}/{pattern}"

        if "cpu.seconds" in wanted:
            usage = _optional(path / "cpu.stat")
            usec = None if usage is None else parse_cpu_usage_usec(usage)
            if usec is not None:
                found_counters[Series.of("cpu.seconds", labels)] = Counter(
                    Decimal(usec).scaleb(-6), instance=instance, scope=scope("cpu.seconds")
                )
        if "mem.used_byte_seconds" in wanted:
            current = _optional(path / "memory.current")
            if current is not None:
                found_gauges[Series.of("mem.used_byte_seconds", labels)] = Decimal(
                    int(current.strip())
                )
        io_wanted = wanted & {"disk.read_bytes", "disk.write_bytes"}
        if io_wanted:
            io = _optional(path / "io.stat")
            for device, (rbytes, wbytes) in ({} if io is None else parse_io_stat(io)).items():
                for metric, value in (("disk.read_bytes", rbytes), ("disk.write_bytes", wbytes)):
                    if metric in io_wanted:
                        found_counters[Series.of(metric, labels, part=device)] = Counter(
                            Decimal(value), instance=instance, scope=scope(metric)
                        )
        if str(path.stat().st_ino) != instance:
            return
        counters.update(found_counters)
        gauges.update(found_gauges)


def _optional(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
