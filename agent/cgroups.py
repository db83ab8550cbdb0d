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
that is absent (controller not enabled), yields no value and no error. A cgroup that
is there but cannot be read (an I/O error, a file that does not parse) yields no
value either, and its memory gauge is held, so its integral over that window is
counted with the next reading (:mod:`agent.counters`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from decimal import Decimal
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath

from agent.counters import Counter, Readings, Series
from common.errors import ConfigError
from common.records import MAX_LABEL_TEXT

DEFAULT_ROOT = Path("/sys/fs/cgroup")
CGROUP_METRICS = frozenset(
    {"cpu.seconds", "mem.used_byte_seconds", "disk.read_bytes", "disk.write_bytes"}
)
IO_METRICS = frozenset({"disk.read_bytes", "disk.write_bytes"})
_WILDCARD = re.compile(r"[*?[]")


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
    """Reads the configured cgroups (a :class:`~agent.sampler.Source`).

    It runs every sampling cycle on hosts with hundreds of tenants, so it reads with
    plain ``os`` calls (one ``scandir`` per wildcard level, one ``open``/``read`` per
    file) rather than ``pathlib``, and keeps the series keys of the cgroups it saw in
    the previous cycle instead of building them again. Patterns are matched one path
    component at a time with :func:`fnmatch.fnmatchcase`, as ``pathlib.Path.glob``
    matches them (``*`` also matches names that start with a dot); a pattern with
    ``**`` is handed to ``pathlib``.
    """

    def __init__(self, patterns: Iterable[str], *, root: Path = DEFAULT_ROOT) -> None:
        self.patterns: Sequence[str] = tuple(check_pattern(p) for p in patterns)
        self.root = root
        self._keys: dict[str, _Keys] = {}

    def matches(self) -> list[tuple[str, str]]:
        """(pattern, relative path) of every cgroup directory that matches, sorted."""
        found: dict[str, str] = {}
        root = str(self.root)
        for pattern in self.patterns:
            if "**" in pattern:
                relatives = sorted(
                    p.relative_to(self.root).as_posix()
                    for p in self.root.glob(pattern) if p.is_dir()
                )
            else:
                relatives = sorted(_glob_dirs(root, pattern.split("/")))
            for relative in relatives:
                found.setdefault(relative, pattern)
        return sorted((pattern, rel) for rel, pattern in found.items())

    def read(self, metrics: AbstractSet[str]) -> Readings:
        wanted = CGROUP_METRICS & metrics
        counters: dict[Series, Counter] = {}
        gauges: dict[Series, Decimal] = {}
        held: set[Series] = set()
        scopes = {f"{m} cgroup {self.root}/{p}" for m in wanted for p in self.patterns}
        if not wanted:
            return Readings(scopes=frozenset(scopes))
        previous, self._keys = self._keys, {}
        for pattern, relative in self.matches():
            if len(relative) > MAX_LABEL_TEXT:
                continue
            keys = previous.get(relative)
            if keys is None or keys.pattern != pattern:
                keys = _Keys(relative, pattern, f"cgroup {self.root}/{pattern}")
            self._keys[relative] = keys
            try:
                self._read_one(keys, wanted, counters, gauges)
            except FileNotFoundError:  # removed since it was listed
                continue
            except (OSError, ValueError):  # there, but not readable now
                if "mem.used_byte_seconds" in wanted:
                    held.add(keys.series("mem.used_byte_seconds"))
        return Readings(counters, gauges, frozenset(scopes), frozenset(held))

    def _read_one(
        self,
        keys: _Keys,
        wanted: AbstractSet[str],
        counters: dict[Series, Counter],
        gauges: dict[Series, Decimal],
    ) -> None:
        """Read one cgroup completely before adding anything, so a cgroup removed
        halfway through contributes nothing rather than half its metrics."""
        path = f"{self.root}/{keys.relative}"
        instance = str(os.stat(path).st_ino)
        found_counters: dict[Series, Counter] = {}
        found_gauges: dict[Series, Decimal] = {}
        if "cpu.seconds" in wanted:
            usage = _read_text(f"{path}/cpu.stat")
            usec = None if usage is None else parse_cpu_usage_usec(usage)
            if usec is not None:
                found_counters[keys.series("cpu.seconds")] = Counter(
                    Decimal(usec).scaleb(-6), instance=instance, scope=keys.scope("cpu.seconds")
                )
        if "mem.used_byte_seconds" in wanted:
            current = _read_text(f"{path}/memory.current")
            if current is not None:
                found_gauges[keys.series("mem.used_byte_seconds")] = Decimal(int(current))
        io_wanted = wanted & IO_METRICS
        if io_wanted:
            io = _read_text(f"{path}/io.stat")
            for device, (rbytes, wbytes) in ({} if io is None else parse_io_stat(io)).items():
                for metric, value in (("disk.read_bytes", rbytes), ("disk.write_bytes", wbytes)):
                    if metric in io_wanted:
                        found_counters[keys.series(metric, device)] = Counter(
                            Decimal(value), instance=instance, scope=keys.scope(metric)
                        )
        if str(os.stat(path).st_ino) != instance:
            return
        counters.update(found_counters)
        gauges.update(found_gauges)


class _Keys:
    """The series keys and scopes of one matched cgroup, made once and reused."""

    __slots__ = ("_scopes", "_series", "labels", "pattern", "relative", "watch")

    def __init__(self, relative: str, pattern: str, watch: str) -> None:
        self.relative = relative
        self.pattern = pattern
        self.watch = watch
        self.labels = {"cgroup": relative}
        self._series: dict[tuple[str, str], Series] = {}
        self._scopes: dict[str, str] = {}

    def series(self, metric: str, part: str = "") -> Series:
        key = (metric, part)
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = Series.of(metric, self.labels, part=part)
        return found

    def scope(self, metric: str) -> str:
        found = self._scopes.get(metric)
        if found is None:
            found = self._scopes[metric] = f"{metric} {self.watch}"
        return found


def _glob_dirs(directory: str, parts: Sequence[str], prefix: str = "") -> Iterator[str]:
    """Relative paths of the directories under ``directory`` that match ``parts``."""
    head, rest = parts[0], parts[1:]
    if not _WILDCARD.search(head):
        path = f"{directory}/{head}"
        if rest:
            yield from _glob_dirs(path, rest, f"{prefix}{head}/")
        elif os.path.isdir(path):
            yield f"{prefix}{head}"
        return
    try:
        with os.scandir(directory) as entries:
            names = [e.name for e in entries if fnmatchcase(e.name, head) and e.is_dir()]
    except OSError:
        return
    for name in names:
        if rest:
            yield from _glob_dirs(f"{directory}/{name}", rest, f"{prefix}{name}/")
        else:
            yield f"{prefix}{name}"


def _read_text(path: str) -> str | None:
    """A small kernel interface file, or None when it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        return os.read(fd, 65536).decode()
    finally:
        os.close(fd)
