"""The counter engine: successive raw readings in, usage records out. Pure: no I/O.

A :class:`Meter` receives one :class:`Snapshot` per sampling cycle (clock readings,
boot identity, raw counter and gauge values) and returns the usage of the window
``[previous sample, this sample)`` as :class:`~common.records.UsageRecord` values.

Windows and clocks
    Durations come only from the monotonic clock (integer nanoseconds). Window
    timestamps are one wall-clock anchor plus monotonic time elapsed since it, so
    consecutive windows are contiguous and exactly as long as the measured interval.
    A wall-clock step smaller than ``max_clock_divergence_us`` leaves the timestamps
    alone. A larger step re-anchors the timeline at the next sample: forward (NTP step
    forward, resume from suspend, during which CLOCK_MONOTONIC stops) the window that
    saw the step ends at the new wall time, so it spans more wall time than it
    measured; backward, the window ends where the previous one ended (zero length)
    and windows stay zero-length until the wall clock passes the timeline again.
    Windows never overlap and never run backwards. Quantities are untouched by either
    case: they come from counters and monotonic durations, so a step neither creates
    nor loses usage.

Counters (cumulative values: CPU seconds, bytes)
    The delta is ``new - previous``. When a counter goes down it was reset (reboot,
    interface or cgroup re-created) and the delta is the new value: the usage since
    the reset, never negative and never the wrapped huge value. A changed
    ``instance`` token (interface index, cgroup inode) is a reset even when the value
    went up. 32-bit wrap: a counter declaring ``wrap=m`` whose previous value lay in
    the top quarter of ``[0, m)`` and whose new value lies in the bottom quarter is
    taken to have wrapped once, delta ``m - previous + new``; any other decrease is a
    reset. The rule is a guess with two known limits. It counts a wrap exactly only
    when less than ``m / 4`` was added in the interval (1 GiB for a 32-bit byte
    counter: 10 s at 860 Mbit/s; 512 GiB for disk bytes): a counter that wrapped
    after a larger advance, or wrapped more than once, is taken for a reset and the
    usage before the wrap is lost. And a genuine reset (a driver reloaded under the
    same interface index) of a counter that stood in the top quarter below ``m`` and
    came back in the bottom quarter is taken for a wrap and over-counts by
    ``m - previous``, less than ``m / 4``. Linux on 64-bit machines keeps network
    and disk counters in 64 bits, so the second limit only bites while a counter
    stands below ``m`` (4 GiB of network bytes, 2 TiB of disk bytes since it was
    created).

    A counter that can only be reset by a reboot (``reset_on_decrease=False``:
    host CPU time) and goes down without one is a kernel glitch: delta 0 and the
    higher value stays the baseline, so the dip is not counted twice.

    A series that vanishes (interface removed, cgroup gone, read failed) yields no
    record and no error; its last value is kept as *dormant* (at most ``max_dormant``
    of them, oldest evicted first). When it returns, the ordinary rules apply against
    the dormant value: higher with the same instance counts the difference (usage
    while unseen is attributed to the window it was seen again), lower or a new
    instance counts from zero. A series never seen before starts a baseline (no
    record), except when its ``scope`` (the source's watch, e.g. one cgroup pattern
    for one metric) was already declared by the previous sample: then the series was
    created since that sample, its counters started at zero, and its value is counted
    whole. A newly configured watch or metric therefore never bills history.

Gauges (instantaneous values: bytes in use, GPU utilisation)
    Integrals use the trapezoid rule between the two samples that bound the window:
    ``(previous + current) / 2 * duration_ns / 10**9``, exact in Decimal because
    ``2 * 10**9`` has only the prime factors 2 and 5. A gauge with no previous value
    (new, or returning after vanishing) starts a baseline.

    A gauge that still exists but could not be read (its source's read failed: an
    I/O error, an unparsable file, a GPU that did not answer) is *held*: the source
    names it in :attr:`Readings.held`, it yields no record for that window, and its
    last value and the monotonic time it was read are kept. When it is read again,
    the trapezoid between the two readings covers the whole time since the last one
    and is attributed to that window, as a counter's usage while unseen is. So a
    failed read moves a gauge's usage to a later window and loses none of it. A held
    gauge must be named as held in every cycle it stays unread (at most
    ``max_dormant`` of them are kept, oldest read first); one that is neither read
    nor held has vanished and starts a baseline when it returns, since nothing is
    known of it in between.

Restart and reboot
    :meth:`Meter.state` is a JSON-serialisable dict (last counter and gauge values,
    the timeline anchor, last window end, boot identity, next seq); a meter built from
    it continues exactly. The first window after a restart starts at the persisted
    window end. On Linux CLOCK_MONOTONIC counts from boot for the whole system, so
    within the same boot the persisted monotonic reading still measures the gap
    exactly and the timeline continues unchanged. After a reboot (boot id changed)
    every counter started again from zero, so each counts its whole value (usage
    since boot); the part of the window the host was up is
    ``min(uptime, window length)``, gauges are integrated as current value times that
    up-time (the value before the reboot says nothing about the new boot), and
    ``host.uptime_seconds`` is that up-time. Usage between the last sample before
    shutdown and the shutdown itself is unknowable and not counted. With no state at
    all (first start) every series starts a baseline: nothing already counted by an
    earlier installation is counted again.
"""

from __future__ import annotations

import decimal
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from decimal import Decimal

from common.errors import MoneyError, ValidationError
from common.ids import new_id
from common.money import CONTEXT, canonical_text, to_decimal
from common.records import HOST_ID, MAX_LABEL_TEXT, MAX_LABELS, UsageRecord

STATE_VERSION = 1

METRIC_UNITS: Mapping[str, str] = {
    "cpu.seconds": "seconds",
    "mem.used_byte_seconds": "byte_seconds",
    "disk.used_byte_seconds": "byte_seconds",
    "disk.read_bytes": "bytes",
    "disk.write_bytes": "bytes",
    "net.rx_bytes": "bytes",
    "net.tx_bytes": "bytes",
    "host.uptime_seconds": "seconds",
    "gpu.seconds": "seconds",
    "gpu.mem_byte_seconds": "byte_seconds",
}
METRICS = frozenset(METRIC_UNITS)
UPTIME = "host.uptime_seconds"

_NS_PER_S = Decimal(1_000_000_000)
_EXACT = CONTEXT.copy()
_EXACT.traps[decimal.Inexact] = True

Labels = tuple[tuple[str, str], ...]


def check_metrics(names: Iterable[str]) -> frozenset[str]:
    """The set of metric names, or :class:`ValidationError` naming the unknown ones."""
    chosen = frozenset(names)
    unknown = sorted(chosen - METRICS)
    if unknown:
        raise ValidationError(f"unknown metrics {unknown}: expected some of {sorted(METRICS)}")
    return chosen


@dataclass(frozen=True, slots=True, order=True)
class Series:
    """One metered series: metric, its labels, and an unlabelled ``part``.

    Parts of one (metric, labels) are counted separately and summed into one record:
    the per-device lines of a cgroup's ``io.stat`` are parts, so a device leaving the
    file does not look like a reset of the sum.
    """

    metric: str
    labels: Labels = ()
    part: str = ""

    @classmethod
    def of(cls, metric: str, labels: Mapping[str, str] | None = None, part: str = "") -> Series:
        return cls(metric, tuple(sorted((labels or {}).items())), part)

    @property
    def output(self) -> tuple[str, Labels]:
        return self.metric, self.labels


@dataclass(frozen=True, slots=True)
class Counter:
    """A raw cumulative reading in the metric's unit (seconds or bytes)."""

    value: Decimal
    instance: str | None = None
    wrap: int | None = None
    scope: str | None = None
    reset_on_decrease: bool = True

    def __post_init__(self) -> None:
        value = _quantity(self.value, "counter value")
        object.__setattr__(self, "value", value)
        if self.wrap is not None and self.wrap <= 0:
            raise ValidationError(f"counter wrap {self.wrap} must be positive")


@dataclass(frozen=True, slots=True)
class Boot:
    """Which boot of the host a snapshot belongs to, and how long it has been up."""

    boot_id: str
    uptime_ns: int
    boot_time_us: int | None = None


@dataclass(frozen=True, slots=True)
class Readings:
    """Raw values from one or more sources. ``scopes`` are the watches that were read;
    ``held`` the gauges that exist but could not be read this time (see the module
    docstring)."""

    counters: Mapping[Series, Counter] = field(default_factory=dict)
    gauges: Mapping[Series, Decimal] = field(default_factory=dict)
    scopes: frozenset[str] = frozenset()
    held: frozenset[Series] = frozenset()


def merge(parts: Iterable[Readings]) -> Readings:
    """One :class:`Readings` from several; the first source to name a series wins."""
    counters: dict[Series, Counter] = {}
    gauges: dict[Series, Decimal] = {}
    scopes: set[str] = set()
    held: set[Series] = set()
    for part in parts:
        for key, counter in part.counters.items():
            counters.setdefault(key, counter)
        for key, gauge in part.gauges.items():
            gauges.setdefault(key, gauge)
        scopes |= part.scopes
        held |= part.held
    return Readings(counters, gauges, frozenset(scopes), frozenset(held))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one sampling cycle read: clocks, boot identity and raw values."""

    mono_ns: int
    wall_us: int
    boot: Boot
    readings: Readings


@dataclass(slots=True)
class _Kept:
    value: Decimal
    instance: str | None
    vanished_us: int | None = None


def _quantity(value: object, what: str) -> Decimal:
    try:
        result = to_decimal(value, what)
    except MoneyError as exc:
        raise ValidationError(str(exc)) from None
    if result < 0:
        raise ValidationError(f"{what} {value} is negative")
    return result


class Meter:
    """Turns successive snapshots into usage records; see the module docstring."""

    def __init__(
        self,
        host_id: str,
        *,
        labels: Mapping[str, str] | None = None,
        metrics: AbstractSet[str] | None = None,
        state: Mapping[str, object] | None = None,
        max_clock_divergence_us: int = 1_000_000,
        max_dormant: int = 256,
        id_factory: Callable[[], str] = new_id,
    ) -> None:
        if not HOST_ID.fullmatch(host_id):
            raise ValidationError(f"host id {host_id!r} is not a valid host id")
        self.host_id = host_id
        self.labels = dict(labels or {})
        if not _labels_ok(self.labels.items(), 0):
            raise ValidationError(
                f"labels {self.labels!r}: at most {MAX_LABELS}, keys non-empty, "
                f"keys and values at most {MAX_LABEL_TEXT} characters"
            )
        self.rejected: list[Series] = []
        self.metrics = METRICS if metrics is None else check_metrics(metrics)
        self.max_clock_divergence_us = max_clock_divergence_us
        self.max_dormant = max_dormant
        self._new_id = id_factory
        self._boot_id: str | None = None
        self._boot_time_us: int | None = None
        self._mono_ns = 0
        self._end_us = 0
        self._anchor_wall_us = 0
        self._anchor_mono_ns = 0
        self._next_seq = 0
        self._scopes: frozenset[str] = frozenset()
        self._counters: dict[Series, _Kept] = {}
        self._gauges: dict[Series, Decimal] = {}
        self._held_read_ns: dict[Series, int] = {}  # held gauges: when last read (mono)
        if state is not None:
            self._load(state)

    @property
    def next_seq(self) -> int:
        return self._next_seq

    # -- sampling -----------------------------------------------------------------

    def observe(self, snap: Snapshot) -> list[UsageRecord]:
        """Records for the window since the previous snapshot (none for the first)."""
        readings = self._enabled(snap.readings)
        if self._boot_id is None:
            self._baseline(snap, readings)
            return []
        rebooted = snap.boot.boot_id != self._boot_id
        start_us = self._end_us
        if not rebooted and snap.mono_ns >= self._mono_ns:
            elapsed_ns = snap.mono_ns - self._mono_ns
            up_ns = elapsed_ns
            end_us = self._timeline_end(snap)
        else:
            end_us = max(start_us, snap.wall_us)
            self._anchor_wall_us, self._anchor_mono_ns = end_us, snap.mono_ns
            elapsed_ns = (end_us - start_us) * 1000
            up_ns = min(max(snap.boot.uptime_ns, 0), elapsed_ns) if rebooted else elapsed_ns
        quantities: dict[tuple[str, Labels], Decimal] = {}
        self._count(snap, readings, rebooted, quantities)
        self._integrate(snap, readings, rebooted, elapsed_ns, up_ns, quantities)
        if UPTIME in self.metrics:
            quantities[(UPTIME, ())] = _EXACT.divide(Decimal(up_ns), _NS_PER_S)
        self._boot_id = snap.boot.boot_id
        self._boot_time_us = snap.boot.boot_time_us
        self._mono_ns = snap.mono_ns
        self._end_us = end_us
        self._scopes = readings.scopes
        return [self._record(metric, labels, quantity, start_us, end_us)
                for (metric, labels), quantity in sorted(quantities.items())]

    def _enabled(self, readings: Readings) -> Readings:
        """The readings of enabled metrics; series whose labels no record could carry
        are left out and listed in :attr:`rejected` (checked before any state changes)."""
        self.rejected = []
        for key in (*readings.counters, *readings.gauges):
            if key.metric not in METRIC_UNITS:
                raise ValidationError(f"reading for unknown metric {key.metric!r}")
            if not _labels_ok(key.labels, len(set(self.labels) - {k for k, _ in key.labels})):
                self.rejected.append(key)
        rejected = set(self.rejected)
        return Readings(
            {
                k: v
                for k, v in readings.counters.items()
                if k.metric in self.metrics and k not in rejected
            },
            {
                k: _quantity(v, "gauge value")
                for k, v in readings.gauges.items()
                if k.metric in self.metrics and k not in rejected
            },
            readings.scopes,
            frozenset(
                k for k in readings.held
                if k.metric in self.metrics and k not in readings.gauges
            ),
        )

    def _baseline(self, snap: Snapshot, readings: Readings) -> None:
        self._boot_id = snap.boot.boot_id
        self._boot_time_us = snap.boot.boot_time_us
        self._mono_ns = snap.mono_ns
        self._end_us = snap.wall_us
        self._anchor_wall_us, self._anchor_mono_ns = snap.wall_us, snap.mono_ns
        self._scopes = readings.scopes
        self._counters = {k: _Kept(c.value, c.instance) for k, c in readings.counters.items()}
        self._gauges = dict(readings.gauges)
        self._held_read_ns = {}

    def _timeline_end(self, snap: Snapshot) -> int:
        derived = self._anchor_wall_us + (snap.mono_ns - self._anchor_mono_ns) // 1000
        if abs(snap.wall_us - derived) <= self.max_clock_divergence_us:
            return max(derived, self._end_us)
        end_us = max(self._end_us, snap.wall_us)
        self._anchor_wall_us, self._anchor_mono_ns = end_us, snap.mono_ns
        return end_us

    def _count(
        self,
        snap: Snapshot,
        readings: Readings,
        rebooted: bool,
        out: dict[tuple[str, Labels], Decimal],
    ) -> None:
        kept = {} if rebooted else self._counters
        for key, reading in readings.counters.items():
            previous = kept.pop(key, None)
            if rebooted:
                delta: Decimal | None = reading.value
                baseline = reading.value
            else:
                delta, baseline = self._delta(previous, reading)
            if delta is not None:
                out[key.output] = _EXACT.add(out.get(key.output, Decimal(0)), delta)
            kept_value = _Kept(baseline, reading.instance)
            kept[key] = kept_value
        for key, old in list(kept.items()):
            if key not in readings.counters and old.vanished_us is None:
                old.vanished_us = snap.wall_us
        dormant = sorted(
            (k for k, v in kept.items() if v.vanished_us is not None),
            key=lambda k: (kept[k].vanished_us or 0, k),
        )
        for key in dormant[: max(0, len(dormant) - self.max_dormant)]:
            del kept[key]
        for key in [k for k in kept if k.metric not in self.metrics]:
            del kept[key]
        self._counters = kept

    def _delta(self, previous: _Kept | None, reading: Counter) -> tuple[Decimal | None, Decimal]:
        """(delta or None for a baseline, value to keep as the next baseline)."""
        value = reading.value
        if previous is None:
            if reading.scope is not None and reading.scope in self._scopes:
                return value, value
            return None, value
        if (
            previous.instance is not None
            and reading.instance is not None
            and previous.instance != reading.instance
        ):
            return value, value
        if value >= previous.value:
            return _EXACT.subtract(value, previous.value), value
        wrap = reading.wrap
        if (
            wrap is not None
            and 4 * previous.value >= 3 * wrap
            and previous.value < wrap
            and 4 * value < wrap
        ):
            return _EXACT.add(_EXACT.subtract(wrap, previous.value), value), value
        if reading.reset_on_decrease:
            return value, value
        return Decimal(0), previous.value

    def _integrate(
        self,
        snap: Snapshot,
        readings: Readings,
        rebooted: bool,
        elapsed_ns: int,
        up_ns: int,
        out: dict[tuple[str, Labels], Decimal],
    ) -> None:
        continuous = not rebooted and snap.mono_ns >= self._mono_ns
        for key, value in readings.gauges.items():
            if rebooted:
                quantity: Decimal | None = _EXACT.divide(_EXACT.multiply(value, up_ns), _NS_PER_S)
            else:
                previous = self._gauges.get(key)
                quantity = None
                if previous is not None:
                    read_ns = self._held_read_ns.get(key)
                    span_ns = (
                        snap.mono_ns - read_ns if continuous and read_ns is not None
                        else elapsed_ns
                    )
                    total = _EXACT.add(previous, value)
                    quantity = _EXACT.divide(_EXACT.multiply(total, span_ns), 2 * _NS_PER_S)
            if quantity is not None:
                out[key.output] = _EXACT.add(out.get(key.output, Decimal(0)), quantity)
        gauges = dict(readings.gauges)
        held: dict[Series, int] = {}
        if continuous:
            for key in readings.held:
                previous = self._gauges.get(key)
                if previous is not None:
                    gauges[key] = previous
                    held[key] = self._held_read_ns.get(key, self._mono_ns)
            oldest = sorted(held, key=lambda k: (held[k], k))
            for key in oldest[: max(0, len(held) - self.max_dormant)]:
                del held[key], gauges[key]
        self._gauges = gauges
        self._held_read_ns = held

    def _record(
        self, metric: str, labels: Labels, quantity: Decimal, start_us: int, end_us: int
    ) -> UsageRecord:
        seq = self._next_seq
        self._next_seq += 1
        return UsageRecord(
            id=self._new_id(),
            host_id=self.host_id,
            metric=metric,
            quantity=quantity,
            unit=METRIC_UNITS[metric],
            start_us=start_us,
            end_us=end_us,
            seq=seq,
            labels={**self.labels, **dict(labels)},
        )

    # -- state --------------------------------------------------------------------

    def state(self) -> dict[str, object]:
        """Everything needed to continue exactly, as plain JSON values."""
        return {
            "version": STATE_VERSION,
            "boot_id": self._boot_id,
            "boot_time_us": self._boot_time_us,
            "mono_ns": self._mono_ns,
            "end_us": self._end_us,
            "anchor_wall_us": self._anchor_wall_us,
            "anchor_mono_ns": self._anchor_mono_ns,
            "next_seq": self._next_seq,
            "scopes": sorted(self._scopes),
            "counters": [
                {
                    **_series_state(key),
                    "value": canonical_text(kept.value),
                    "instance": kept.instance,
                    "vanished_us": kept.vanished_us,
                }
                for key, kept in sorted(self._counters.items())
            ],
            "gauges": [
                {
                    **_series_state(key),
                    "value": canonical_text(value),
                    **({"read_mono_ns": self._held_read_ns[key]}
                       if key in self._held_read_ns else {}),
                }
                for key, value in sorted(self._gauges.items())
            ],
        }

    def _load(self, state: Mapping[str, object]) -> None:
        try:
            if state.get("version") != STATE_VERSION:
                raise ValidationError(f"sampler state version {state.get('version')!r}")
            boot_id = state["boot_id"]
            self._boot_id = None if boot_id is None else _text(boot_id)
            self._boot_time_us = _opt_int(state.get("boot_time_us"))
            self._mono_ns = _int(state["mono_ns"])
            self._end_us = _int(state["end_us"])
            self._anchor_wall_us = _int(state["anchor_wall_us"])
            self._anchor_mono_ns = _int(state["anchor_mono_ns"])
            self._next_seq = _int(state["next_seq"])
            self._scopes = frozenset(_text(s) for s in _list(state["scopes"]))
            for item in _list(state["counters"]):
                entry = _dict(item)
                self._counters[_series_from(entry)] = _Kept(
                    _quantity(entry["value"], "counter value"),
                    None if entry.get("instance") is None else _text(entry["instance"]),
                    _opt_int(entry.get("vanished_us")),
                )
            for item in _list(state["gauges"]):
                entry = _dict(item)
                key = _series_from(entry)
                self._gauges[key] = _quantity(entry["value"], "gauge value")
                read_ns = _opt_int(entry.get("read_mono_ns"))
                if read_ns is not None:
                    self._held_read_ns[key] = read_ns
        except (KeyError, TypeError, ValidationError) as exc:
            raise ValidationError(f"sampler state is not usable: {exc}") from None


def _labels_ok(labels: Iterable[tuple[str, str]], extra: int) -> bool:
    items = list(labels)
    return len(items) + extra <= MAX_LABELS and all(
        0 < len(k) <= MAX_LABEL_TEXT and len(v) <= MAX_LABEL_TEXT for k, v in items
    )


def _series_state(key: Series) -> dict[str, object]:
    return {"metric": key.metric, "labels": dict(key.labels), "part": key.part}


def _series_from(entry: Mapping[str, object]) -> Series:
    labels = _dict(entry.get("labels", {}))
    return Series.of(
        _text(entry["metric"]),
        {_text(k): _text(v) for k, v in labels.items()},
        _text(entry.get("part", "")),
    )


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected text, got {value!r}")
    return value


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _opt_int(value: object) -> int | None:
    return None if value is None else _int(value)


def _list(value: object) -> list[object]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    return value


def _dict(value: object) -> dict[str, object]:
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, got {type(value).__name__}")
    return value
